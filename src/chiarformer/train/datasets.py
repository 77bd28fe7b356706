"""What the training loop consumes: indexable datasets that build padded tensor batches, the
task bundle (`TaskData`), and a resumable, shardable sampler.

- `LMWindows`: a 1-D token stream cut into windows that start every `stride` tokens. With
  stride == seq_len, the published protocol: windows of seq_len + 1 tokens, x = t[s : s+C] and
  y = t[s+1 : s+C+1], (N - 1) // C of them, each scoring its C next-token targets. With
  stride < seq_len, windows of seq_len tokens; each token is scored exactly once, by the first
  window whose scoring span contains it, with at least seq_len - stride tokens of context (the
  usual sliding-window evaluation).
- Classification datasets are chiarformer.data.ClassificationData seen through
  train.tasks.ClassificationView (batches padded to their longest sequence, with a mask).
- `BatchSampler`: a seeded permutation per epoch; the position (epoch, offset) is all the state
  a resume needs. Each global batch is split across processes by rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


class LMWindows:
    kind = "lm"

    def __init__(self, tokens: np.ndarray, seq_len: int, stride: int | None = None):
        tokens = np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError("LMWindows expects a 1-D token array")
        self.tokens = tokens
        self.seq_len = int(seq_len)
        self.stride = int(stride or seq_len)
        n = len(tokens)
        published = self.stride == self.seq_len
        # tokens per window row: the model reads the first seq_len, labels cover them all
        self.span = min(self.seq_len + 1 if published else self.seq_len, n)
        if n < 2:
            self.starts = np.zeros(0, dtype=np.int64)
        elif n <= self.span:
            self.starts = np.zeros(1, dtype=np.int64)
        elif published:
            self.starts = np.arange(0, (n - 1) // self.seq_len * self.seq_len, self.seq_len, dtype=np.int64)
        else:  # sliding windows cover the tail
            starts = list(range(0, n - self.seq_len + 1, self.stride))
            if starts[-1] + self.seq_len < n:
                starts.append(n - self.seq_len)
            self.starts = np.asarray(starts, dtype=np.int64)
        # first scored position (inside the window) of each window
        ends = self.starts + self.span
        prev_end = np.concatenate([[0], ends[:-1]]) if len(ends) else ends
        self.score_from = np.maximum(1, prev_end - self.starts).astype(np.int64)

    @classmethod
    def for_eval(cls, tokens: np.ndarray, seq_len: int, stride: int) -> LMWindows:
        """Evaluation windows exactly as chiarformer.data.lm.eval_windows defines them (the protocol)."""
        from ..data.lm import eval_windows

        windows = eval_windows(len(tokens), seq_len, stride)
        obj = cls.__new__(cls)
        obj.tokens = np.asarray(tokens)
        obj.seq_len = seq_len
        obj.stride = stride
        obj.span = windows[0][2] - windows[0][0]
        obj.starts = np.asarray([b for b, _, _ in windows], dtype=np.int64)
        obj.score_from = np.asarray([f - b for b, f, _ in windows], dtype=np.int64)
        return obj

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def n_scored(self) -> int:
        return int(np.sum(self.span - self.score_from)) if len(self.starts) else 0

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """input_ids: the first seq_len tokens of each window; labels: all of them (one longer in the
        published protocol, see model.next_token_pairs), -100 where a token is context only."""
        rows = np.stack([self.tokens[s : s + self.span] for s in self.starts[indices]]).astype(np.int64)
        labels = torch.from_numpy(rows)
        input_ids = labels[:, : self.seq_len].clone()
        score_from = torch.from_numpy(self.score_from[indices])
        positions = torch.arange(self.span)[None, :]
        labels[positions < score_from[:, None]] = -100
        return {"input_ids": input_ids, "labels": labels}

    def n_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()


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
            from ..errors import UserError

            raise UserError(f"the checkpoint's data has {state['n']} training examples but the task now has {self.n}; "
                            "the data or data.* settings changed since the run started")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])


def shard(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This process's share of a global batch (strided, so shares differ by at most one)."""
    return indices[rank::world]
