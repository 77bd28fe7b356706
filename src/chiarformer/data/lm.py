"""Language-model windows: the one definition of how a token stream becomes batches, for training
and evaluation alike (the engine scores them in chiarformer.train.evaluate).

    ds = LMWindows(tokens, context=256)             # stride == context: the published windows
    ds = LMWindows(tokens, context=256, stride=128) # sliding-window evaluation
    batch = ds.batch([0, 1, 2])                     # {"input_ids", "labels"}, int64

Windows, for context C and stride S:
- S == C: the published protocol. Windows of C + 1 tokens start every C tokens, (N - 1) // C
  of them (the remainder dropped): the model reads x = t[s : s+C] and predicts y = t[s+1 : s+C+1],
  C targets per window, so every token but the first is scored once (the batches' labels are
  one longer than the input, see model.next_token_pairs). Training uses these windows too.
- S < C: sliding windows. Windows start every S tokens; each scores only the tokens that no
  earlier window scored, so every token after the first is scored exactly once, with at least
  C - S tokens of context (fewer only at the start). The last window is moved back to end at
  the last token, so every window has the same length and needs no padding.
Labels are -100 where a token is context only.

PPL = exp(mean cross-entropy per scored token), with the tokenizer's tokens. Bits per byte =
total cross-entropy in bits / number of UTF-8 bytes of the scored tokens, i.e. of the decoded
scored text (byte-level BPE tokens stand for exact byte strings; <|endoftext|> counts 0 bytes).
It compares models across tokenizers.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError

IGNORE = -100


def window_spans(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first_scored, end) per window; tokens[first_scored:end] are scored by that window."""
    if not 1 <= stride <= context:
        raise UserError(f"stride must be between 1 and the context ({context}), got {stride}")
    if n_tokens < 2:
        raise UserError(f"{n_tokens} tokens are too few to evaluate")
    if stride == context:
        if n_tokens < context + 1:
            raise UserError(f"{n_tokens} tokens are fewer than one window of {context} inputs and their targets")
        return [(b, b + 1, b + context + 1) for b in range(0, (n_tokens - 1) // context * context, context)]
    windows = []
    scored_until = 1  # the first token has no context and is never scored
    begin = 0
    while scored_until < n_tokens:
        end = min(begin + context, n_tokens)
        begin = max(0, end - context)
        windows.append((begin, scored_until, end))
        scored_until = end
        begin += stride
    return windows


class LMWindows:
    """A 1-D token stream seen as the indexable windows of window_spans (all of one length)."""

    kind = "lm"

    def __init__(self, tokens: np.ndarray, context: int, stride: int | None = None):
        self.tokens = np.asarray(tokens)
        if self.tokens.ndim != 1:
            raise ValueError("LMWindows expects a 1-D token array")
        self.seq_len = int(context)
        spans = window_spans(len(self.tokens), self.seq_len, int(stride or context))
        self.span = spans[0][2] - spans[0][0]  # tokens per row: the model reads the first seq_len
        self.starts = np.asarray([b for b, _, _ in spans], dtype=np.int64)
        self.score_from = np.asarray([f - b for b, f, _ in spans], dtype=np.int64)  # first scored, in the row

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def n_scored(self) -> int:
        return int(np.sum(self.span - self.score_from))

    def batch(self, indices) -> dict[str, torch.Tensor]:
        """input_ids: the first seq_len tokens of each window; labels: all of them (one longer in the
        published protocol, see model.next_token_pairs), -100 where a token is context only."""
        rows = np.stack([self.tokens[s : s + self.span] for s in self.starts[indices]]).astype(np.int64)
        labels = torch.from_numpy(rows)
        input_ids = labels[:, : self.seq_len].clone()
        score_from = torch.from_numpy(self.score_from[indices])
        positions = torch.arange(self.span)[None, :]
        labels[positions < score_from[:, None]] = IGNORE
        return {"input_ids": input_ids, "labels": labels}

    def n_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return batch["input_ids"].numel()
