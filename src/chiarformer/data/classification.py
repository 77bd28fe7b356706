"""Sequence-classification examples stored back to back, batched with padding masks.

    data = ClassificationData.from_sequences([[5, 6, 7], [8]], labels=[1, 0], pad_id=0)
    b = data.batch([0, 1])          # pads to the longest example in the batch
    b["input_ids"]                  # LongTensor (B, L); pad_id where b["attention_mask"] is False
    b["attention_mask"]             # BoolTensor (B, L), True on real tokens
    b["labels"]                     # LongTensor (B,)

Keeping examples as one flat uint16 array plus offsets holds 96k ListOps trees of up to 2000
tokens in about 200 MB instead of a padded 96k x 2000 int64 matrix (1.5 GB).
`stratified_split` carves a seeded validation set with each class's share preserved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError


@dataclass
class ClassificationData:
    tokens: np.ndarray  # all examples' ids, back to back (uint16)
    offsets: np.ndarray  # int64, len N + 1: example i is tokens[offsets[i]:offsets[i + 1]]
    labels: np.ndarray  # int64, len N
    pad_id: int

    @classmethod
    def from_sequences(cls, sequences: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int) -> ClassificationData:
        lengths = np.fromiter((len(s) for s in sequences), np.int64, len(sequences))
        if len(sequences) != len(labels):
            raise UserError(f"{len(sequences)} examples but {len(labels)} labels")
        if len(lengths) and lengths.min() == 0:
            raise UserError(f"example {int(np.argmin(lengths))} is empty (no tokens)")
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tokens = np.fromiter((t for s in sequences for t in s), np.uint16, int(offsets[-1]))
        return cls(tokens, offsets, np.asarray(labels, np.int64), pad_id)

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]])

    def select(self, indices, max_len: int | None = None) -> ClassificationData:
        """The examples at `indices`, each cut to its first max_len tokens when given."""
        indices = np.asarray(indices, np.int64)
        starts = self.offsets[indices]
        lengths = self.offsets[indices + 1] - starts
        if max_len is not None:
            lengths = np.minimum(lengths, max_len)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # Position of every kept token in the old flat array, without a Python loop.
        positions = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        return ClassificationData(np.asarray(self.tokens[positions]), offsets, np.asarray(self.labels[indices]), self.pad_id)

    def truncated(self, max_len: int | None) -> ClassificationData:
        """Every example, cut to its first max_len tokens."""
        return self.select(np.arange(len(self)), max_len)

    def batch(self, indices, pad_to: int | None = None) -> dict[str, torch.Tensor]:
        """Padded tensors for the examples at `indices` (see the module docstring)."""
        sub = self.select(indices)
        lengths = sub.lengths()
        width = int(lengths.max()) if pad_to is None else pad_to
        if width < lengths.max():
            raise UserError(f"pad_to={pad_to} is shorter than the longest example ({int(lengths.max())})")
        ids = np.full((len(sub), width), self.pad_id, np.int64)
        mask = np.arange(width)[None, :] < lengths[:, None]
        ids[mask] = sub.tokens
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(np.asarray(sub.labels, np.int64)),
        }


def stratified_split(labels, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held_out) sorted index arrays; each class gives round(fraction * count) examples."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"validation fraction must be between 0 and 1, got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        held.append(rng.permutation(members)[: int(round(fraction * len(members)))])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    if len(kept) == 0 or len(held_out) == 0:
        raise UserError(f"{len(labels)} examples are too few to hold out {fraction:.0%} for validation")
    return kept, held_out
