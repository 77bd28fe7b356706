"""`chiar import-reference` and the published-code options, against an independent forward.

Checkpoints are built here in the published code's exact format (key names, shapes, dict layout,
tied head) with random trained-like weights; the converted model is compared with a forward
written below from the published equations (SPEC §7), not with chiarformer's own code.
"""

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chiarformer import ChiarForSequenceClassification
from chiarformer.cli import main
from chiarformer.data.tokenizer import gpt2_tokenizer
from chiarformer.errors import UserError
from chiarformer.reference import TAU_400M, convert, model_state
from chiarformer.train.checkpoint import load_into_model, load_tensors
from chiarformer.train.runs import load_run

V, D, H, L, T, CTX = 97, 32, 4, 4, 24, 32  # vocab, width, heads, layers, tokens, RoPE cache
LAYERS = ["D", "DA", "DA", "A"]


# ---------------------------------------------------------------- the published equations
def dct_matrices(d):
    """The published DCT (rfft of the mirrored vector) and its inverse, as matrices:
    X_k = (4 / sqrt(2d)) sum_n x_n cos(pi k (2n + 1) / 2d); x_n = (X_0 + 2 sum_k X_k cos(...)) / sqrt(2d)."""
    n = torch.arange(d, dtype=torch.float64)
    cos = torch.cos(math.pi * n[:, None] * (2 * n[None, :] + 1) / (2 * d))  # [k, n]
    forward = 4.0 / math.sqrt(2 * d) * cos
    inverse = cos.T.clone() * 2.0 / math.sqrt(2 * d)
    inverse[:, 0] /= 2.0
    return forward.float(), inverse.float()


def published_forward(sd, ids, routing, tau, meta, classifier=False):
    """Logits of the published model from its state dict sd (reference key names)."""
    fwd, inv = dct_matrices(D)
    pre = "backbone." if classifier else ""
    baseline = f"{pre}attns.0.qkv.weight" in sd

    def ln(x, name):
        return F.layer_norm(x, (D,), sd[name + ".weight"], sd[name + ".bias"])

    def linear(x, name):
        return x @ sd[name + ".weight"].T + sd[name + ".bias"]

    def attention(x, p):
        b, t, _ = x.shape
        q, k, v = (z.view(b, t, H, D // H).transpose(1, 2) for z in linear(x, p + "qkv").chunk(3, dim=-1))
        cos, sin = sd[p + "rope.cos_cache"][:t], sd[p + "rope.sin_cache"][:t]

        def rot(z):
            z1, z2 = z.chunk(2, dim=-1)
            return z * cos + torch.cat([-z2, z1], dim=-1) * sin

        scores = rot(q) @ rot(k).transpose(-1, -2) / math.sqrt(D // H)
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, D)
        return ln(x + linear(out, p + "out_proj"), p + "norm")

    def dct_op(x, p):
        return ln(x + (x @ fwd.T * sd[p + "w"]) @ inv.T, p + "norm")

    def ffn(x, p, norm):
        return ln(x + linear(F.gelu(linear(x, p + "0")), p + "3"), norm)

    def entropy(x):
        power = (x @ fwd.T) ** 2
        prob = power / (power.sum(-1, keepdim=True) + 1e-8)
        return -(prob * (prob + 1e-8).log()).sum(-1) / (math.log(D) + 1e-8)

    x = sd[f"{pre}token_emb.weight"][ids]
    gate = torch.sigmoid(linear(x.mean((0, 1)), f"{pre}meta_router.gate_proj")) if meta else None
    chosen = []
    for i in range(L):
        if baseline:
            x = ffn(attention(x, f"attns.{i}."), f"ffns.{i}.", f"ffn_norms.{i}")
            continue
        p = f"{pre}layers.{i}."
        ops = LAYERS[i]
        if ops == "D":
            y = dct_op(x, p + "dct_mix.")
        elif ops == "A":
            y = attention(x, p + "attn.")
        else:
            h = entropy(x)
            outs = [dct_op(x, p + "dct_mix."), attention(x, p + "attn.")]
            if routing == "threshold":
                gates = F.one_hot((h > tau).long(), 2).float()
            else:
                probs = linear(torch.cat([x, h[..., None]], -1), p + "router.gate_proj").softmax(-1)
                gates = probs
                if routing == "hard":
                    gates = F.one_hot(probs.argmax(-1), 2).float() - probs.detach() + probs
            chosen.append(gates.argmax(-1))
            y = sum(gates[..., j, None] * outs[j] for j in range(2))
        y = ffn(y, p + "ffn.", p + "ffn_norm")
        x = gate * y + (1 - gate) * x if (i == 0 and meta) else y
    final = ln(x, f"{pre}norm")
    if classifier:
        return linear(F.gelu(linear(final.mean(1), "classifier.0")), "classifier.3"), chosen
    return final @ sd["token_emb.weight"].T, chosen


# ---------------------------------------------------------------- checkpoints in the published format
def rope_buffers(sd, prefix):
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D // H, 2).float() / (D // H)))
    angles = torch.outer(torch.arange(CTX).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    sd[prefix + "rope.inv_freq"] = inv_freq
    sd[prefix + "rope.cos_cache"], sd[prefix + "rope.sin_cache"] = angles.cos(), angles.sin()


def published_state(seed, routing="threshold", meta=True, baseline=False, n_classes=None, vocab=V):
    """A trained-like state dict with the published key names: every LayerNorm different (with a
    shared bias offset, so hidden vectors have a non-zero feature mean and DC weighting matters)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g) * std + mean

    sd = {}

    def linear(name, n_in, n_out, std=0.15):
        sd[name + ".weight"], sd[name + ".bias"] = randn(n_out, n_in, std=std), randn(n_out, std=0.1)

    def norm(name):
        sd[name + ".weight"], sd[name + ".bias"] = randn(D, std=0.3, mean=1.0), randn(D, std=0.1, mean=0.15)

    sd["token_emb.weight"] = randn(vocab, D, std=0.5) + randn(D, std=0.3)
    for i in range(L):
        ops = "A" if baseline else LAYERS[i]
        p = f"attns.{i}." if baseline else f"layers.{i}.attn."
        if "A" in ops:
            linear(p + "qkv", D, 3 * D)
            linear(p + "out_proj", D, D)
            norm(p + "norm")
            rope_buffers(sd, p)
        if "D" in ops:
            sd[f"layers.{i}.dct_mix.w"] = randn(D, std=0.5, mean=1.0)
            norm(f"layers.{i}.dct_mix.norm")
        f = f"ffns.{i}." if baseline else f"layers.{i}.ffn."
        linear(f + "0", D, 4 * D)
        linear(f + "3", 4 * D, D)
        norm(f"ffn_norms.{i}" if baseline else f"layers.{i}.ffn_norm")
        if len(ops) > 1 and routing != "threshold":
            linear(f"layers.{i}.router.gate_proj", D + 1, 2, std=0.5)
    norm("norm")
    if meta and not baseline:
        linear("meta_router.gate_proj", D, 1, std=0.5)
    sd["lm_head.weight"] = sd["token_emb.weight"]  # tied: one storage
    if n_classes:
        sd = {f"backbone.{k}": v for k, v in sd.items()}
        sd["backbone.lm_head.weight"] = sd["backbone.token_emb.weight"]
        linear("classifier.0", D, D)
        linear("classifier.3", D, n_classes)
    return sd


def median_tau(sd, ids, meta, classifier=False):
    """A tau near the median routed-layer entropy of the published forward, in the widest gap of
    the middle half, so both operators run and no entropy sits within float error of it."""
    tau = 0.9
    for _ in range(5):  # entropies of later layers depend on tau itself
        h = torch.cat(taus_entropies(sd, ids, meta, classifier, tau))
        if (h - tau).abs().min() > 1e-4 and (h > tau).any() and (h <= tau).any():
            return tau
        mid = h.sort().values[len(h) // 4 : 3 * len(h) // 4]
        gap = int((mid[1:] - mid[:-1]).argmax())
        tau = float(mid[gap] + mid[gap + 1]) / 2
    raise AssertionError("no tau separates the entropies")


def taus_entropies(sd, ids, meta, classifier, tau):
    captured = []
    original = torch.Tensor.__gt__

    def spy(self, other):  # the threshold comparison sees each routed layer's entropies
        if isinstance(other, float) and self.dim() == 2:
            captured.append(self.detach().flatten())
        return original(self, other)

    torch.Tensor.__gt__ = spy
    try:
        published_forward(sd, ids, "threshold", tau, meta, classifier)
    finally:
        torch.Tensor.__gt__ = original
    return captured


def import_run(tmp_path, ckpt, *args, name="run"):
    path = tmp_path / f"{name}.pt"
    torch.save(ckpt, path)
    out = tmp_path / name
    assert main(["import-reference", str(path), "--out", str(out), *args]) == 0
    return out


def model_with(run_dir, **changes):
    run = load_run(run_dir)
    cfg = run.model.cfg.replace(**changes)
    model = type(run.model)(cfg)
    load_into_model(model, run.model.state_dict(), run_dir)
    return model


def check_both_operators(chosen):
    assert chosen and all((c == 0).any() and (c == 1).any() for c in chosen), "a routed layer took one operator only"


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("routing", ["threshold", "soft", "hard"])
@pytest.mark.parametrize("meta", [True, False])
def test_imported_lm_matches_the_published_equations(tmp_path, capsys, routing, meta):
    sd = published_state(1, routing, meta)
    ids = torch.randint(0, V, (3, T + 1), generator=torch.Generator().manual_seed(2))
    x, y = ids[:, :-1], ids[:, 1:]
    tau = median_tau(sd, x, meta) if routing == "threshold" else None
    ckpt = {"step": 7, "model": sd, "val_ppl": 40.0,
            "cfg": {"vocab_size": V, "routing_mode": routing, "use_collapse_reg": False, "layer_variant": "dct_attn"}}
    run_dir = import_run(tmp_path, ckpt, *(["--tau", repr(tau)] if tau is not None else []))
    assert "meta_router" not in capsys.readouterr().out or meta
    model = load_run(run_dir).model
    expected, chosen = published_forward(sd, x, routing, tau, meta)
    check_both_operators(chosen)
    with torch.no_grad():
        got = model(x).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # The deviation matters on these weights: the orthonormal entropy flips routes (threshold) or
    # moves the router's input (soft, hard).
    with torch.no_grad():
        assert (model_with(run_dir, entropy="ortho")(x).logits - expected).abs().max() > 1e-4

    # gradients in train mode, dropout 0, published loss (C targets per window)
    params = {k: v.clone().requires_grad_(True) for k, v in sd.items() if "rope" not in k and k != "lm_head.weight"}
    params["lm_head.weight"] = params["token_emb.weight"]
    logits, _ = published_forward({**sd, **params}, x, routing, tau, meta)
    F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)).backward()
    ours = model_with(run_dir, dropout=0.0).train()
    out = ours(x, labels=ids)  # labels one longer than the input: every position is scored
    out.loss.backward()
    named = dict(ours.named_parameters())
    pairs = {"token_emb.weight": "model.embed.weight", "norm.weight": "model.norm_out.weight"}
    for i, ops in enumerate(LAYERS):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        pairs[p + "ffn.0.weight"] = q + "ffn.up.weight"
        pairs[p + "ffn_norm.bias"] = q + "norm_ffn.bias"
        if "D" in ops:
            pairs[p + "dct_mix.w"] = q + "dct.filter"
            pairs[p + "dct_mix.norm.weight"] = q + "op_norms.dct.weight"
        if "A" in ops:
            pairs[p + "attn.norm.bias"] = q + "op_norms.attention.bias"
            pairs[p + "attn.out_proj.weight"] = q + "mixer.out.weight"
            qkv = params[p + "attn.qkv.weight"].grad
            torch.testing.assert_close(torch.cat([named[q + "mixer.q.weight"].grad, named[q + "mixer.kv.weight"].grad]),
                                       qkv, atol=1e-4, rtol=0)
        if len(ops) > 1 and routing != "threshold":
            pairs[p + "router.gate_proj.weight"] = q + "router.logits.weight"
    if meta:
        pairs["meta_router.gate_proj.weight"] = "model.meta_router.gate.weight"
    for ref_key, our_key in pairs.items():
        torch.testing.assert_close(named[our_key].grad, params[ref_key].grad, atol=1e-4, rtol=0, msg=ref_key)
    if routing == "hard":  # the published straight-through reaches both probabilities; ours (chosen) does not
        chosen_only = model_with(run_dir, dropout=0.0, straight_through="chosen").train()
        chosen_only(x, labels=ids).loss.backward()
        g_ref = params["layers.1.router.gate_proj.weight"].grad
        assert (dict(chosen_only.named_parameters())["model.layers.1.router.logits.weight"].grad - g_ref).abs().max() > 1e-4


def test_imported_baseline_matches(tmp_path):
    sd = published_state(3, baseline=True, meta=False)
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(3))
    run_dir = import_run(tmp_path, {"step": 1, "model": sd, "val_ppl": 50.0, "cfg": {"vocab_size": V}})
    model = load_run(run_dir).model
    assert model.cfg.layout == "baseline" and model.cfg.meta_router == "none"
    expected, _ = published_forward(sd, ids, None, None, meta=False)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("routing", ["threshold", "soft"])
def test_imported_classifier_matches(tmp_path, routing):
    sd = published_state(4, routing, meta=True, n_classes=3)
    ids = torch.randint(0, V, (4, T), generator=torch.Generator().manual_seed(4))
    plain = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    tau = median_tau(plain, ids, True) if routing == "threshold" else None
    args = ["--tau", repr(tau)] if tau is not None else ["--routing", routing]
    run_dir = import_run(tmp_path, {"step": 300, "model": sd, "test_acc": 61.5}, *args, "--task", "listops-flat")
    model = load_run(run_dir).model
    assert isinstance(model, ChiarForSequenceClassification) and model.cfg.n_classes == 3
    expected, chosen = published_forward(sd, ids, routing, tau, True, classifier=True)
    check_both_operators(chosen)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)


def test_mixed_training_file_reports_and_keeps_its_extra_heads(tmp_path, capsys):
    sd = published_state(5, "threshold", meta=True)
    sd["_cls_head_imdb.weight"], sd["_cls_head_imdb.bias"] = torch.randn(2, D), torch.randn(2)
    sd["_cls_head_listops.weight"], sd["_cls_head_listops.bias"] = torch.randn(10, D), torch.randn(10)
    run_dir = import_run(tmp_path, {"step": 9, "model": sd, "val_ppl": 30.0}, "--tau", "0.9")  # no cfg
    printed = capsys.readouterr().out
    assert "_cls_head_imdb.weight (2, 32)" in printed and "_cls_head_listops.bias (10,)" in printed
    extra = load_tensors(run_dir / "reference_extra.safetensors")
    assert sorted(extra) == sorted(k for k in sd if k.startswith("_cls_head"))
    assert torch.equal(extra["_cls_head_listops.weight"], sd["_cls_head_listops.weight"])
    assert load_run(run_dir).model.cfg.tau == 0.9


def test_400m_shapes_and_tau():
    """The published 400M file's layout, on the meta device (shapes only; RoPE buffers real)."""
    d, heads, layers, vocab = 1024, 16, 28, 50257
    meta = torch.device("meta")
    sd = {"token_emb.weight": torch.empty(vocab, d, device=meta), "norm.weight": torch.empty(d, device=meta),
          "norm.bias": torch.empty(d, device=meta), "meta_router.gate_proj.weight": torch.empty(1, d, device=meta),
          "meta_router.gate_proj.bias": torch.empty(1, device=meta)}
    sd["lm_head.weight"] = sd["token_emb.weight"]
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d // heads, 2).float() / (d // heads)))
    angles = torch.outer(torch.arange(256).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    for i in range(layers):
        p = f"layers.{i}."
        shapes = {"ffn.0.weight": (4 * d, d), "ffn.0.bias": (4 * d,), "ffn.3.weight": (d, 4 * d), "ffn.3.bias": (d,),
                  "ffn_norm.weight": (d,), "ffn_norm.bias": (d,)}
        if i < layers - 1:
            shapes.update({"dct_mix.w": (d,), "dct_mix.norm.weight": (d,), "dct_mix.norm.bias": (d,)})
        if i > 0:
            shapes.update({"attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,), "attn.out_proj.weight": (d, d),
                           "attn.out_proj.bias": (d,), "attn.norm.weight": (d,), "attn.norm.bias": (d,)})
            sd[p + "attn.rope.inv_freq"], sd[p + "attn.rope.cos_cache"], sd[p + "attn.rope.sin_cache"] = \
                inv_freq, angles.cos(), angles.sin()
        for k, shape in shapes.items():
            sd[p + k] = torch.empty(shape, device=meta)
    imported = convert({"step": 1, "model": sd, "val_ppl": 27.75,
                        "cfg": {"vocab_size": vocab, "routing_mode": "threshold", "use_collapse_reg": False,
                                "layer_variant": "dct_attn"}})
    cfg = imported.config
    sizes = (cfg.d_model, cfg.n_heads, cfg.n_layers, cfg.d_ff, cfg.max_seq_len, cfg.vocab_size)
    assert sizes == (d, heads, layers, 4 * d, 256, vocab)
    assert cfg.layout == "dct_attn" and cfg.tau == TAU_400M and cfg.meta_router == "batch_mean"
    state = model_state(imported)  # every key of our model, every shape equal
    assert state["model.layers.5.mixer.kv.weight"].shape == (2 * d, d) and not imported.extra


def test_17m_threshold_file_needs_tau(tmp_path, capsys):
    sd = published_state(6, "threshold", meta=True)
    path = tmp_path / "c.pt"
    torch.save({"step": 1, "model": sd, "val_ppl": 1.0, "cfg": {"vocab_size": V, "routing_mode": "threshold"}}, path)
    assert main(["import-reference", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "--tau" in capsys.readouterr().err


def test_truncated_and_pickled_object_files_are_refused(tmp_path, capsys):
    sd = published_state(7, "threshold", meta=False)
    good = tmp_path / "good.pt"
    torch.save({"step": 1, "model": sd}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert main(["import-reference", str(truncated), "--out", str(tmp_path / "a"), "--tau", "0.9"]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and len(err.strip().splitlines()) == 1
    pickled = tmp_path / "pickled.pt"
    torch.save({"step": 1, "model": sd, "cfg": argparse.Namespace(vocab_size=V)}, pickled)  # an object, not vars(cfg)
    assert main(["import-reference", str(pickled), "--out", str(tmp_path / "b"), "--tau", "0.9"]) == 2
    err = capsys.readouterr().err
    assert "pickled objects" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    legacy = tmp_path / "legacy.pt"  # the pre-zip format cannot be memory-mapped: loaded without mmap
    torch.save({"step": 1, "model": sd}, legacy, _use_new_zipfile_serialization=False)
    assert main(["import-reference", str(legacy), "--out", str(tmp_path / "c"), "--tau", "0.9"]) == 0


SHARED = Path(os.environ.get("CHIAR_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")


@pytest.mark.skipif(not (SHARED / "wikitext2_raw" / "wiki.test.raw").is_file(), reason="shared WikiText-2 absent")
def test_chiar_eval_runs_on_an_imported_model(tmp_path, capsys):
    sd = published_state(8, "soft", meta=True, vocab=50257)
    ckpt = {"step": 5, "model": sd, "val_ppl": 1.0, "cfg": {"vocab_size": 50257, "routing_mode": "soft"}}
    run_dir = import_run(tmp_path, ckpt, "--task", "wikitext2-proxy")
    capsys.readouterr()
    assert main(["eval", "--run", str(run_dir), "--split", "test", "--max-batches", "1", "--batch-size", "2",
                 "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["tokens"] == 2 * CTX and record["protocol"]["stride"] == CTX  # C targets per published window
    assert math.isfinite(record["loss"])


def test_generate_on_an_imported_run(tmp_path, capsys):
    """An imported baseline samples through `chiar generate`; a tokenizer that does not fit the
    model's vocabulary (a small synthetic file with the GPT-2 tokenizer) is one clear line."""
    try:
        gpt2_tokenizer()
    except UserError:
        pytest.skip("the GPT-2 tokenizer files are not on this machine")
    sd = published_state(9, baseline=True, vocab=50257)
    run_dir = import_run(tmp_path, {"step": 5, "model": sd, "val_ppl": 1.0, "cfg": {"vocab_size": 50257}}, name="big")
    capsys.readouterr()
    assert main(["generate", "--run", str(run_dir), "Hello world", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("Hello world")
    small = import_run(tmp_path, {"step": 5, "model": published_state(9, baseline=True), "val_ppl": 1.0,
                                  "cfg": {"vocab_size": V}}, name="small")
    capsys.readouterr()
    assert main(["generate", "--run", str(small), "Hello world", "--max-new-tokens", "4"]) == 2
    assert "does not match its model" in capsys.readouterr().err
