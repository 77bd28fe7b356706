"""LM windows as the engine uses them (data.LMWindows: training and evaluation), and the engine's
bits per byte (train.evaluate) against an independent count."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from chiarformer import ChiarConfig, ChiarForCausalLM
from chiarformer.data import ByteTokenizer, LMWindows, gpt2_tokenizer, window_spans
from chiarformer.errors import UserError
from chiarformer.train.evaluate import evaluate

GPT2_DIR = Path(os.environ.get("CHIAR_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data") / "gpt2_tokenizer"
CPU = torch.device("cpu")


def scored_ids(ds: LMWindows) -> list[int]:
    """The target ids the engine scores, in order, read off the batches (next_token_pairs' targets)."""
    labels = ds.batch(np.arange(len(ds)))["labels"][:, 1:]
    return labels[labels != -100].tolist()


def test_stride_equal_context_is_the_published_protocol():
    assert window_spans(1000, 256, 256) == [(0, 1, 257), (256, 257, 513), (512, 513, 769)]  # (N - 1) // C windows
    ds = LMWindows(np.arange(1000), 256)
    # x = t[s:s+C], y = t[s+1:s+C+1]: C targets per window, every token from 1 to 3C once.
    assert scored_ids(ds) == list(range(1, 769)) and ds.n_scored == 768
    batch = ds.batch([0, 1])
    assert batch["input_ids"].shape == (2, 256) and batch["labels"].shape == (2, 257)
    assert batch["input_ids"][1, 0] == 256 and batch["labels"][1, -1] == 512
    assert len(LMWindows(np.arange(769), 256)) == 3 and len(LMWindows(np.arange(768), 256)) == 2


@pytest.mark.parametrize(("n", "context", "stride"),
                         [(1000, 256, 128), (1000, 256, 1), (300, 256, 100), (100, 256, 64), (257, 256, 255),
                          (1000, 64, 16), (1000, 50, 7)])
def test_sliding_windows_score_every_token_once(n, context, stride):
    tokens = np.arange(n, dtype=np.int64)
    ds = LMWindows(tokens, context, stride)
    b = ds.batch(np.arange(len(ds)))
    ids, labels = b["input_ids"], b["labels"]
    assert ids.shape == labels.shape and ids.shape[1] == min(n, context)  # no padding needed
    for start, row_ids, row_labels in zip(ds.starts, ids, labels, strict=True):
        assert torch.equal(row_ids, torch.as_tensor(tokens[start : start + min(n, context)]))
        scored = row_labels != -100
        assert not scored[0]  # position 0 has nothing to predict it
        assert torch.equal(row_labels[scored], row_ids[scored])
        first = int(scored.nonzero()[0])
        # Each scored token sees at least context - stride tokens, unless the text is shorter.
        assert first >= min(context - stride, int(row_ids[first]))
    assert scored_ids(ds) == list(range(1, n)) and ds.n_scored == n - 1


def test_bad_stride_and_tiny_inputs():
    with pytest.raises(UserError, match="stride"):
        LMWindows(np.arange(100), 16, 17)
    with pytest.raises(UserError, match="stride"):
        window_spans(100, 16, 0)
    with pytest.raises(UserError):
        window_spans(1, 16, 8)
    with pytest.raises(UserError, match="fewer than one window"):
        LMWindows(np.arange(16), 16)  # 16 inputs need a 17th token as the last target


def test_uniform_model_scores_log2_vocab_bits_per_byte():
    class Uniform(torch.nn.Module):  # what evaluate() reads of a model: .cfg.n_layers and .logits
        cfg = ChiarConfig.from_preset("tiny", n_layers=3)

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 257), "routing": None})()

    tokens = np.array(ByteTokenizer().encode("héllo wörld, " * 40), np.uint16)
    r = evaluate(Uniform(), LMWindows(tokens, 64, 32), batch_size=4, device=CPU,
                 token_bytes=ByteTokenizer().token_byte_lengths())
    assert r["tokens"] == len(tokens) - 1 and r["bytes"] == len(tokens) - 1
    assert math.isclose(r["ppl"], 257, rel_tol=1e-5) and math.isclose(r["bpb"], math.log2(257), rel_tol=1e-5)


@pytest.mark.skipif(not (GPT2_DIR / "encoder.json").is_file(), reason="GPT-2 tokenizer files absent")
@pytest.mark.parametrize("stride", [32, 8])
def test_bits_per_byte_against_an_independent_count(stride):
    """evaluate()'s bpb = nats of the scored targets / ln 2 / UTF-8 bytes of the decoded scored text,
    both counted here without the engine: a per-window float64 log-softmax and the tokenizer's bytes."""
    tok = gpt2_tokenizer(GPT2_DIR)
    tokens = np.array(tok.encode("Zürich — 東京 and naïve cafés. " * 30), np.uint16)
    torch.manual_seed(0)
    model = ChiarForCausalLM(ChiarConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=3, n_heads=2,
                                         layout="dct_attn", max_seq_len=64)).eval()
    ds = LMWindows(tokens, 32, stride)
    r = evaluate(model, ds, batch_size=4, device=CPU, token_bytes=tok.token_byte_lengths())

    nats, scored = 0.0, []
    with torch.no_grad():
        for begin, first, end in window_spans(len(tokens), 32, stride):
            window = torch.as_tensor(tokens[begin:end].astype(np.int64))
            logp = model(window[None, :32]).logits[0].double().log_softmax(-1)
            for pos in range(first, end):  # token `pos` is predicted at position pos - 1
                nats -= float(logp[pos - 1 - begin, window[pos - begin]])
                scored.append(int(window[pos - begin]))
    n_bytes = len(b"".join(tok._enc.decode_single_token_bytes(i) for i in scored))  # may split characters
    assert r["tokens"] == len(scored) == ds.n_scored
    assert r["bytes"] == n_bytes
    assert r["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-5)
    assert r["loss"] == pytest.approx(nats / len(scored), rel=1e-5)
