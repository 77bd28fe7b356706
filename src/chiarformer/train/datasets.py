"""What the training loop consumes: the task bundle (`TaskData`) of indexable datasets that build
tensor batches, and a resumable, shardable sampler.

- Language models: chiarformer.data.LMWindows (data/lm.py), for training and evaluation.
- Classification datasets are chiarformer.data.ClassificationData seen through
  train.task_data.ClassificationView (batches padded to their longest sequence, with a mask).
- `BatchSampler`: a seeded permutation per epoch; the position (epoch, offset) is all the state
  a resume needs. Each global batch is split across processes by rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError


@dataclass
class TaskData:
    """Everything the engine needs from a task."""

    kind: str  # "lm" or "cls"
    train: Any
    val: Any
    test: Any | None
    vocab_size: int
    n_classes: int = 2
    protocol: dict = field(default_factory=dict)  # tokenizer, context, stride, splits, source, proxy label
    token_bytes: np.ndarray | None = None  # LM: UTF-8 bytes of each vocabulary entry (for bits per byte)


class BatchSampler:
    """Global batches of example indices from seeded per-epoch permutations; resumable.

    With `lengths` and bucket > 1, each epoch's permutation is cut into groups of
    bucket * batch_size examples, each group is sorted by length and cut into batches, and the
    batches of a group are shuffled: batches hold examples of similar length (less padding)
    while the order stays a pure function of (seed, epoch), so (epoch, offset) still resumes it.
    """

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = True, lengths=None, bucket: int = 0):
        if n <= 0:
            raise ValueError("empty dataset")
        self.n, self.batch_size, self.seed, self.shuffle = n, batch_size, seed, shuffle
        self.lengths = None if lengths is None or bucket <= 1 else np.asarray(lengths)
        self.bucket = bucket
        self.epoch, self.offset = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch, 0x5EED])
            perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            if self.lengths is not None:
                group = self.bucket * self.batch_size
                parts = []
                for start in range(0, self.n, group):
                    chunk = perm[start : start + group]
                    chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
                    batches = [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
                    parts += [batches[i] for i in rng.permutation(len(batches))]
                perm = np.concatenate(parts)
            self._perm, self._perm_epoch = perm, self.epoch
        return self._perm

    def next_batch(self) -> np.ndarray:
        out = []
        need = self.batch_size
        while need:
            perm = self._permutation()
            take = perm[self.offset : self.offset + need]
            out.append(take)
            need -= len(take)
            self.offset += len(take)
            if self.offset >= self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        return np.concatenate(out)

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "n": self.n, "seed": self.seed}

    def load_state(self, state: dict) -> None:
        if state.get("n") not in (None, self.n):
            raise UserError(f"the checkpoint's data has {state['n']} training examples but the task now has {self.n}; "
                            "the data or data.* settings changed since the run started")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def shard(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This process's share of a global batch (strided, so shares differ by at most one)."""
    return indices[rank::world]
