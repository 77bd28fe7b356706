"""Capacity routing: the bound holds, every guarantee of the other paths holds, and the routed
training step compiles as one graph (no host sync, static shapes)."""

import math
import random

import pytest
import torch
from test_model import assert_causal, build, same_weights

from chiarformer import ChiarConfig, ChiarForCausalLM
from chiarformer.model import KVCache
from chiarformer.operators import ATTN, DCT, RBF
from chiarformer.routing import capacity_limit

LAYOUTS = ["dct_attn", "three_op", "D,DA,DRA,A"]


def capacity_config(layout: str, seed: int = 0, **kw) -> ChiarConfig:
    """Thresholds low enough that more tokens want attention than the capacity admits."""
    rng = random.Random(seed)
    cfg = ChiarConfig(vocab_size=97, d_model=rng.choice([32, 48]), n_heads=2, n_layers=4, max_seq_len=64, dropout=0.0,
                      layout=layout, routing="capacity", attn_fraction=0.25, capacity_factor=1.25,
                      norm=rng.choice(["post", "pre"]), meta_router=rng.choice(["none", "causal"]), rbf_features=8, **kw)
    taus = [[0.7, 0.74] if len(cfg.layer_ops[i]) == 3 else 0.74 for i in cfg.routed_layers]
    return cfg.replace(tau=taus)


def assert_routes_and_caps(model, cfg, ids):
    """Both operators chosen in some routed layer, and the capacity refused some candidates."""
    with torch.no_grad():
        capped = model(ids, return_routing=True).routing
        free = same_weights(model, cfg.replace(routing="threshold"))  # the same taus without the bound
        unbounded = free(ids, return_routing=True).routing
    layer = cfg.routed_layers[0]  # the first routed layer sees the same input under both routings
    ops = capped[layer].ops
    assert (ops == ATTN).any() and (ops == DCT).any()
    assert (capped[layer].ops == ATTN).sum() < (unbounded[layer].ops == ATTN).sum()


def greedy_reference(candidates: torch.Tensor, rate: float) -> torch.Tensor:
    """The rule spelled out: walk the positions, accept a candidate while under the bound."""
    accepted = torch.zeros_like(candidates)
    for b in range(candidates.shape[0]):
        count = 0
        for p in range(candidates.shape[1]):
            if candidates[b, p] and count < math.ceil(rate * (p + 1)):
                accepted[b, p] = True
                count += 1
    return accepted


@pytest.mark.parametrize("rate", [0.1, 0.3125, 0.5, 1.0])
def test_capacity_limit_is_the_greedy_rule_and_continues_over_a_cache(rate):
    torch.manual_seed(0)
    candidates = torch.rand(6, 40) < torch.tensor([0.05, 0.2, 0.4, 0.6, 0.9, 1.0])[:, None]
    pos = torch.arange(40)
    accepted, count = capacity_limit(candidates, pos, rate, None)
    assert torch.equal(accepted, greedy_reference(candidates, rate))
    assert torch.equal(count, accepted.sum(1))
    bound = torch.ceil(rate * (pos + 1.0)).long()
    assert (accepted.long().cumsum(1) <= bound).all()
    # Split at any point, with the count carried: the same decisions.
    first, carried = capacity_limit(candidates[:, :17], pos[:17], rate, None)
    rest, _ = capacity_limit(candidates[:, 17:], pos[17:], rate, carried)
    assert torch.equal(torch.cat([first, rest], 1), accepted)


@pytest.mark.parametrize("seed", range(6))
def test_capacity_sparse_and_dense_agree_with_gradients(seed):
    cfg = capacity_config(LAYOUTS[seed % 3], seed)
    model = build(ChiarForCausalLM, cfg, seed)
    dense = same_weights(model, cfg.replace(execution="dense"))
    ids = torch.randint(0, cfg.vocab_size, (3, 50))
    assert_routes_and_caps(model, cfg, ids)
    a, b = model(ids, labels=ids, return_routing=True), dense(ids, labels=ids, return_routing=True)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    for ra, rb in zip(a.routing, b.routing, strict=True):
        assert torch.equal(ra.ops, rb.ops)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(model.named_parameters(), dense.parameters(), strict=True):
        if p.grad is not None or q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    if cfg.layout != "dct_attn":
        assert any((r.ops == RBF).any() for r in a.routing)


@pytest.mark.parametrize("seed", range(6))
def test_capacity_routing_is_causal(seed):
    cfg = capacity_config(LAYOUTS[seed % 3], seed, execution=["sparse", "dense"][seed % 2])
    model = build(ChiarForCausalLM, cfg, seed)
    rng = random.Random(seed)
    assert_routes_and_caps(model, cfg, torch.randint(0, cfg.vocab_size, (3, 50)))
    for _ in range(3):
        assert assert_causal(model, cfg, rng) < 1e-5


@pytest.mark.parametrize("seed", range(3))
def test_capacity_cached_generation_matches_uncached(seed):
    cfg = capacity_config(LAYOUTS[seed], seed)
    model = build(ChiarForCausalLM, cfg, seed)
    tokens = model.generate(torch.randint(0, cfg.vocab_size, (2, 6)), max_new_tokens=30, temperature=0)
    assert_routes_and_caps(model, cfg, tokens)
    cache = KVCache.empty(cfg.n_layers)
    with torch.no_grad():
        full = model(tokens, return_routing=True)
        steps = [model(tokens[:, :6], cache=cache, return_routing=True)]
        steps += [model(tokens[:, i : i + 1], cache=cache, return_routing=True) for i in range(6, tokens.shape[1])]
    torch.testing.assert_close(torch.cat([s.logits for s in steps], 1), full.logits, atol=1e-4, rtol=0)
    for layer in cfg.routed_layers:
        assert torch.equal(torch.cat([s.routing[layer].ops for s in steps], 1), full.routing[layer].ops)


@pytest.mark.parametrize("layout", ["dct_attn", "three_op"])
def test_capacity_with_per_operator_norms_matches_dense_and_cached(layout):
    """The published per-operator LayerNorms (made different here) on the static-slot and the
    single-token decoding paths: the same as dense execution and as one uncached pass."""
    cfg = capacity_config(layout, 1).replace(norm="per_operator")
    model = build(ChiarForCausalLM, cfg, 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "op_norms" in name:
                p.add_(torch.randn_like(p) * 0.3)
    ids = torch.randint(0, cfg.vocab_size, (3, 50))
    assert_routes_and_caps(model, cfg, ids)
    dense = same_weights(model, cfg.replace(execution="dense"))
    with torch.no_grad():
        full = model(ids).logits
        torch.testing.assert_close(full, dense(ids).logits, atol=1e-5, rtol=0)
        cache = KVCache.empty(cfg.n_layers)
        steps = [model(ids[:, :20], cache=cache).logits] + [model(ids[:, i : i + 1], cache=cache).logits for i in range(20, 50)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=0)


def test_capacity_is_validated():
    with pytest.raises(Exception, match="capacity_factor"):
        ChiarConfig(routing="capacity", capacity_factor=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["dct_attn", "three_op"])
def test_capacity_training_step_compiles_as_one_graph(layout):
    """fullgraph=True fails on any graph break: a host sync (.item, .tolist, .nonzero, boolean
    indexing) or a data-dependent shape. aot_eager traces forward and backward the way inductor
    does, without inductor's C++ build (a minute per model on 2 cores; the benchmark times it)."""
    torch._dynamo.reset()
    cfg = capacity_config(layout, 1)
    model = build(ChiarForCausalLM, cfg, 1).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    assert_routes_and_caps(model.eval(), cfg, ids)
    compiled = torch.compile(model.train(), fullgraph=True, dynamic=False, backend="aot_eager")
    out_c = compiled(ids, labels=ids)
    out_c.loss.backward()
    grads_c = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    out_e = model(ids, labels=ids)
    out_e.loss.backward()
    grads_e = [p.grad for p in model.parameters() if p.grad is not None]
    torch.testing.assert_close(out_c.logits, out_e.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_c.loss, out_e.loss)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_training_with_attention_dropout_compiles_as_one_graph():
    """The blocked causal attention that replaces SDPA under dropout on CPU has static shapes."""
    from chiarformer.layers import BLOCKED_DROPOUT_MIN_T

    torch._dynamo.reset()
    cfg = ChiarConfig(vocab_size=97, d_model=32, n_heads=2, n_layers=2, max_seq_len=256, dropout=0.1, layout="baseline")
    model = build(ChiarForCausalLM, cfg, 1).train()
    ids = torch.randint(0, cfg.vocab_size, (2, BLOCKED_DROPOUT_MIN_T))
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    compiled(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def test_calibration_sets_capacity_routing_taus():
    from chiarformer.analysis.calibrate import calibrate_hidden
    from chiarformer.analysis.common import Batch

    cfg = capacity_config("dct_attn", 2).replace(tau=None)
    model = build(ChiarForCausalLM, cfg, 2)
    batches = [Batch(torch.randint(0, cfg.vocab_size, (4, 64)), None) for _ in range(2)]
    calibration = calibrate_hidden(model, batches, target_attn=0.25)
    assert [layer.layer for layer in calibration.layers] == cfg.routed_layers  # the loop below is not empty
    for layer in calibration.layers:
        assert 0.15 <= layer.achieved["attn"] <= 0.3125 + 1e-6  # never above the capacity bound
