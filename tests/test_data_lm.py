"""LM batching: training windows, (sliding-)window evaluation and bits per byte."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from chiarformer.data import (
    ByteTokenizer,
    LMScore,
    bits_per_byte,
    eval_batches,
    eval_windows,
    gpt2_tokenizer,
    scored_tokens,
    train_windows,
)
from chiarformer.errors import UserError

GPT2_DIR = Path(os.environ.get("CHIAR_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data") / "gpt2_tokenizer"


def test_train_windows_are_non_overlapping_views():
    tokens = np.arange(1000, dtype=np.uint16)
    w = train_windows(tokens, 256)
    assert w.shape == (3, 256) and np.shares_memory(w, tokens)
    assert w[1, 0] == 256 and w[2, -1] == 767  # remainder (768..999) dropped
    with pytest.raises(UserError):
        train_windows(tokens[:10], 256)


def test_stride_equal_context_is_the_published_protocol():
    windows = eval_windows(1000, 256, 256)
    assert windows == [(0, 1, 257), (256, 257, 513), (512, 513, 769)]  # (N - 1) // C windows
    # x = t[s:s+C], y = t[s+1:s+C+1]: C targets per window, every token from 1 to 3C once.
    assert scored_tokens(np.arange(1000), 256, 256).tolist() == list(range(1, 769))
    batch = next(eval_batches(np.arange(1000), 256, 256, batch_size=2))
    assert batch["input_ids"].shape == (2, 256) and batch["labels"].shape == (2, 257)
    assert batch["input_ids"][1, 0] == 256 and batch["labels"][1, -1] == 512
    assert len(eval_windows(769, 256, 256)) == 3 and len(eval_windows(768, 256, 256)) == 2


@pytest.mark.parametrize(("n", "context", "stride"),
                         [(1000, 256, 128), (1000, 256, 1), (300, 256, 100), (100, 256, 64), (257, 256, 255)])
def test_sliding_windows_score_every_token_once(n, context, stride):
    tokens = np.arange(n, dtype=np.int64)
    seen = []
    for b in eval_batches(tokens, context, stride, batch_size=7):
        ids, labels = b["input_ids"], b["labels"]
        assert ids.shape == labels.shape and ids.shape[1] == min(n, context)  # no padding needed
        for row_ids, row_labels in zip(ids, labels, strict=True):
            scored = row_labels != -100
            assert not scored[0]  # position 0 has nothing to predict it
            assert torch.equal(row_labels[scored], row_ids[scored])
            first = int(scored.nonzero()[0])
            # Each scored token sees at least context - stride tokens, unless the text is shorter.
            assert first >= min(context - stride, int(row_ids[first]))
            seen += row_ids[scored].tolist()
    assert seen == list(range(1, n))
    assert scored_tokens(tokens, context, stride).tolist() == seen


def test_bad_stride_and_tiny_inputs():
    with pytest.raises(UserError, match="stride"):
        eval_windows(100, 16, 17)
    with pytest.raises(UserError, match="stride"):
        eval_windows(100, 16, 0)
    with pytest.raises(UserError):
        eval_windows(1, 16, 8)


def test_uniform_model_scores():
    vocab = 257
    text = "héllo wörld, " * 40
    tokens = np.array(ByteTokenizer().encode(text), np.uint16)
    score = LMScore(ByteTokenizer().token_byte_lengths())
    for b in eval_batches(tokens, 64, 32, batch_size=4):
        score.add(torch.zeros(*b["input_ids"].shape, vocab), b["labels"])
    r = score.result()
    assert r["tokens"] == len(tokens) - 1 and r["bytes"] == len(tokens) - 1
    assert math.isclose(r["ppl"], vocab, rel_tol=1e-5)
    assert math.isclose(r["bpb"], math.log2(vocab), rel_tol=1e-5)
    assert math.isclose(bits_per_byte(r["loss"] * r["tokens"], r["bytes"]), r["bpb"])


@pytest.mark.skipif(not (GPT2_DIR / "encoder.json").is_file(), reason="GPT-2 tokenizer files absent")
def test_bytes_are_those_of_the_decoded_scored_text():
    tok = gpt2_tokenizer(GPT2_DIR)
    tokens = np.array(tok.encode("Zürich — 東京 and naïve cafés. " * 30), np.uint16)
    score = LMScore(tok.token_byte_lengths())
    for b in eval_batches(tokens, 32, 32, batch_size=8):
        score.add(torch.zeros(*b["input_ids"].shape, tok.vocab_size), b["labels"])
    scored = scored_tokens(tokens, 32, 32)
    # The scored ids may split characters; their bytes joined are exact UTF-8.
    scored_bytes = b"".join(tok._enc.decode_single_token_bytes(int(i)) for i in scored)
    assert score.result()["bytes"] == len(scored_bytes)
