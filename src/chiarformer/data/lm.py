"""Language-model batches: training windows, (sliding-)window evaluation, PPL and bits per byte.

    x = train_windows(tokens, seq_len)          # (N, seq_len) view: non-overlapping, remainder dropped
    for b in eval_batches(tokens, context=256, stride=128, batch_size=32):
        out = model(b["input_ids"])             # labels are shifted inside the loss, as the model does
        score.add(out.logits, b["labels"])      # score = LMScore(tokenizer.token_byte_lengths())
    score.result()                              # {"loss", "ppl", "bpb", "tokens", "bytes"}

Evaluation protocol, (context C, stride S):
- S == C: the published protocol. Windows of C + 1 tokens start every C tokens, (N - 1) // C
  of them (the remainder dropped): the model reads x = t[s : s+C] and predicts y = t[s+1 : s+C+1],
  C targets per window, so every token but the first is scored once (its batches' labels are
  one longer than the input, see model.next_token_pairs).
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

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

IGNORE = -100


def train_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows of seq_len tokens as an (N, seq_len) view; the remainder is dropped."""
    n = len(tokens) // seq_len
    if n == 0:
        raise UserError(f"{len(tokens)} tokens are fewer than one window of {seq_len}")
    return tokens[: n * seq_len].reshape(n, seq_len)


def eval_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
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


def eval_batches(tokens: np.ndarray, context: int, stride: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Batches {"input_ids", "labels"} (int64, (B, T)) covering eval_windows(len(tokens), ...)."""
    windows = eval_windows(len(tokens), context, stride)
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        labels = np.stack([np.asarray(tokens[b:e], np.int64) for b, _, e in chunk])
        ids = labels[:, :context].copy()  # the published windows' last token is a target only
        for row, (b, first, _) in enumerate(chunk):
            labels[row, : first - b] = IGNORE
        yield {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels)}


def scored_tokens(tokens: np.ndarray, context: int, stride: int) -> np.ndarray:
    """The ids that eval_batches scores, in order (for byte counts and checks)."""
    return np.concatenate([np.asarray(tokens[f:e]) for _, f, e in eval_windows(len(tokens), context, stride)])


def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Total cross-entropy (nats) converted to bits, per UTF-8 byte."""
    return nll_nats / math.log(2) / n_bytes if n_bytes else float("nan")


class LMScore:
    """Sums cross-entropy (labels shifted by one, -100 ignored) and scored bytes over batches."""

    def __init__(self, token_byte_lengths: np.ndarray):
        self._bytes_per_id = torch.as_tensor(np.asarray(token_byte_lengths), dtype=torch.int64)
        self.nll = 0.0
        self.tokens = 0
        self.bytes = 0

    @torch.no_grad()
    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        from ..model import next_token_pairs

        logits, targets = next_token_pairs(logits.float(), labels.to(logits.device))
        self.nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                                    reduction="sum").item()
        scored = targets[targets != IGNORE].cpu()
        self.tokens += scored.numel()
        self.bytes += int(self._bytes_per_id[scored].sum())

    def result(self) -> dict[str, float]:
        loss = self.nll / self.tokens if self.tokens else float("nan")
        return {
            "loss": loss,
            "ppl": math.exp(loss) if self.tokens else float("nan"),
            "bpb": bits_per_byte(self.nll, self.bytes),
            "tokens": self.tokens,
            "bytes": self.bytes,
        }
