"""Model core: the two execution paths agree, every causal configuration is causal, routing learns."""

import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from chiarformer import ChiarConfig, ChiarForCausalLM, ChiarForSequenceClassification, layers
from chiarformer.errors import UserError
from chiarformer.layers import BLOCKED_DROPOUT_MIN_T, rope
from chiarformer.operators import ATTN, DCT, RBF
from chiarformer.sparse import full_causal_blocks

LAYOUTS = ["baseline", "dct_attn", "three_op", "dct_only", "D,DA,DRA,A", "DA,RA,A"]
CAUSAL_ROUTINGS = ["threshold", "soft", "hard"]
# Layouts with routed layers: two operators, three, mixed, and a routed first layer (DA).
ROUTED_LAYOUTS = ["dct_attn", "three_op", "D,DA,DRA,A", "DA,RA,A"]
# Routings that sparse execution really splits (soft routing always runs dense).
SPARSE_ROUTINGS = ["threshold", "hard"]


def random_config(rng: random.Random, **fixed) -> ChiarConfig:
    """A small random configuration; tau sits inside the entropy spread so both routes occur."""
    layout = fixed.pop("layout", rng.choice(LAYOUTS))
    values = dict(
        vocab_size=rng.choice([61, 97]),
        d_model=rng.choice([32, 48]),
        n_heads=rng.choice([2, 4]),
        n_layers=4 if layout not in ("DA,RA,A",) else 3,
        max_seq_len=64,
        dropout=0.0,
        layout=layout,
        routing=rng.choice(CAUSAL_ROUTINGS),
        norm=rng.choice(["post", "pre", "per_operator"]),
        meta_router=rng.choice(["none", "causal"]),
        rbf_features=rng.choice([8, 16]),
    )
    values.update(fixed)
    cfg = ChiarConfig(**values)
    if cfg.routing == "threshold" and cfg.routed_layers:
        # Entropies of these small random models sit near 0.75-0.85; spread the thresholds there.
        taus = []
        for layer in cfg.routed_layers:
            lo = rng.uniform(0.72, 0.8)
            taus.append([lo, lo + 0.05] if len(cfg.layer_ops[layer]) == 3 else lo + 0.03)
        cfg = cfg.replace(tau=taus)
    return cfg


def build(cls, cfg, seed=0):
    torch.manual_seed(seed)
    return cls(cfg).eval()


def same_weights(model, cfg):
    other = type(model)(cfg).eval()
    other.load_state_dict(model.state_dict())
    return other


def routed_case(seed: int, routings: list[str], **fixed) -> ChiarConfig:
    """A random configuration with routed layers: layout and routing cycle through every pair."""
    layout = ROUTED_LAYOUTS[seed % len(ROUTED_LAYOUTS)]
    routing = routings[(seed // len(ROUTED_LAYOUTS)) % len(routings)]
    return random_config(random.Random(seed), layout=layout, routing=routing, **fixed)


def calibrate_taus(model, ids, attention_mask=None):
    """Threshold routing: each routed layer's taus at quantiles of its own entropies (1/2, or
    1/3 and 2/3), midway between two tokens, so every operator is chosen and no token sits on
    a threshold (where sparse and dense rounding could send it different ways)."""
    cfg = model.cfg
    if cfg.routing != "threshold":
        return
    taus = [list(cfg.layer_taus(i)) for i in cfg.routed_layers]
    for j, layer in enumerate(cfg.routed_layers):  # in order: a layer's entropies depend on earlier taus only
        with torch.no_grad():
            entropy = model(ids, attention_mask=attention_mask, return_routing=True).routing[layer].entropy
        values = entropy.flatten().sort().values.tolist()
        n_ops = len(cfg.layer_ops[layer])
        cuts = [len(values) * k // n_ops for k in range(1, n_ops)]
        taus[j] = [(values[c - 1] + values[c]) / 2 for c in cuts]
        model.set_taus([t[0] if len(t) == 1 else t for t in taus])


def assert_routes(routing, cfg, mask=None):
    """The case compares something routed: some routed layer sent its tokens to two or more
    operators (so sparse execution gathered them apart)."""
    chosen = [set(routing[i].ops[mask].tolist() if mask is not None else routing[i].ops.flatten().tolist())
              for i in cfg.routed_layers]
    assert any(len(ops) >= 2 for ops in chosen), (cfg.layout, cfg.routing, chosen)


# ---------------------------------------------------------------- sparse == dense
@pytest.mark.parametrize("seed", range(12))
def test_sparse_and_dense_execution_agree(seed):
    cfg = routed_case(seed, SPARSE_ROUTINGS)
    model = build(ChiarForCausalLM, cfg, seed)
    ids = torch.randint(0, cfg.vocab_size, (3, random.Random(seed).randint(20, 64)))
    calibrate_taus(model, ids)
    cfg = model.cfg
    dense = same_weights(model, cfg.replace(execution="dense"))
    with torch.no_grad():
        a, b = model(ids, return_routing=True), dense(ids, return_routing=True)
    assert_routes(a.routing, cfg)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    for ra, rb in zip(a.routing, b.routing, strict=True):
        assert torch.equal(ra.ops, rb.ops)


@pytest.mark.parametrize("seed", range(6))
def test_sparse_and_dense_execution_give_the_same_gradients(seed):
    """Sparse execution's gathers, key prefixes and reassembly have their own backward passes."""
    if seed < 4:  # the four routed layouts, threshold and hard routing
        cfg = routed_case(100 + seed, SPARSE_ROUTINGS[seed % 2:] + SPARSE_ROUTINGS[: seed % 2], max_seq_len=128)
    else:  # top-k (two operators only): equal counts, no padded queries
        cfg = random_config(random.Random(100 + seed), layout=["dct_attn", "D,DA,DA,A"][seed - 4], routing="topk",
                            attn_fraction=0.3, allow_noncausal=True, max_seq_len=128)
    model = build(ChiarForCausalLM, cfg, seed).train()
    ids = torch.randint(0, cfg.vocab_size, (3, 128))
    calibrate_taus(model, ids)
    cfg = model.cfg
    dense = same_weights(model, cfg.replace(execution="dense")).train()
    for m in (model, dense):
        m(ids, labels=ids).loss.backward()
    assert_routes(model(ids, return_routing=True).routing, cfg)
    for (name, a), b in zip(model.named_parameters(), dense.parameters(), strict=True):
        if a.grad is None:
            assert b.grad is None or not b.grad.any(), name
            continue
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def bf16_autocast_step(cfg) -> torch.Tensor:
    """One CPU bf16-autocast training step; checks it is finite; returns layer 1's routing."""
    model = build(ChiarForCausalLM, cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids, return_routing=True)
    out.loss.backward()
    assert out.loss.isfinite()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)
    assert out.routing[1].entropy.dtype == torch.float32  # autocast does not reach the entropy
    return out.routing[1].ops


@pytest.mark.parametrize("layout", ["dct_attn", "D,DA,DRA,A"])
def test_sparse_execution_trains_under_bf16_autocast(layout):
    ops = bf16_autocast_step(random_config(random.Random(3), layout=layout, routing="hard"))
    assert (ops == ATTN).any() and (ops != ATTN).any()  # both operators ran and were reassembled


def test_sparse_execution_under_autocast_with_no_attention_token():
    """An operator with no tokens yields an empty piece in its input's dtype, not autocast's."""
    ops = bf16_autocast_step(random_config(random.Random(4), layout="dct_attn", routing="threshold").replace(tau=1.0))
    assert not (ops == ATTN).any()


@pytest.mark.parametrize("bidirectional", [False, True])
def test_sparse_and_dense_agree_for_topk_classification_with_padding(bidirectional):
    cfg = random_config(random.Random(7), layout="dct_attn", routing="topk", attn_fraction=0.3, bidirectional=bidirectional)
    model = build(ChiarForSequenceClassification, cfg)
    dense = same_weights(model, cfg.replace(execution="dense"))
    ids = torch.randint(0, cfg.vocab_size, (4, 40))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 25:] = False
    mask[3, 10:] = False
    with torch.no_grad():
        a, b = model(ids, attention_mask=mask, return_routing=True), dense(ids, attention_mask=mask)
    assert_routes(a.routing, cfg, mask)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    routed = (a.routing[1].ops == ATTN) & mask
    # exactly round(0.3 * real length) real tokens per sequence, whatever the padding
    assert routed.sum(1).tolist() == [12, 8, 12, 3]
    assert not (a.routing[1].ops == ATTN)[~mask].any()


def test_sparse_execution_skips_work():
    cfg = ChiarConfig.from_preset(
        "tiny", vocab_size=32, layout="dct_attn", routing="topk", attn_fraction=0.25, allow_noncausal=True, max_seq_len=256
    )
    model = build(ChiarForCausalLM, cfg)
    dense = same_weights(model, cfg.replace(execution="dense"))
    ids = torch.randint(0, cfg.vocab_size, (2, 256))

    def mixing_flops(m):  # matmul FLOPs of routed layer 2's token-mixing sub-layer (FFN excluded)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(ids)
        counts = counter.get_flop_counts()
        layer = "ChiarForCausalLM.model.layers.1"
        return sum(counts[layer].values()) - sum(counts[layer + ".ffn"].values())

    assert mixing_flops(model) < 0.75 * mixing_flops(dense)


def test_dct_implementations_give_the_same_model():
    cfg = random_config(random.Random(11), layout="dct_attn", routing="threshold", dct_impl="matmul")
    model = build(ChiarForCausalLM, cfg)
    torch.nn.init.normal_(model.model.layers[0].dct.filter)  # a non-trivial filter
    fft = same_weights(model, cfg.replace(dct_impl="fft"))
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        a, b = model(ids, return_routing=True), fft(ids, return_routing=True)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.routing[1].entropy, b.routing[1].entropy, atol=1e-5, rtol=0)


def test_frozen_dct_operator_follows_filter_updates():
    cfg = random_config(random.Random(12), layout="dct_only", dct_impl="matmul")
    model = build(ChiarForCausalLM, cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 10))
    with torch.no_grad():
        before = model(ids).logits
        model.model.layers[0].dct.filter.copy_(torch.randn(cfg.d_model))
        after = model(ids).logits
    assert (before - after).abs().max() > 1e-3


# ---------------------------------------------------------------- causality
def assert_causal(model, cfg, rng, t_cut=None):
    t = rng.randint(16, 64)
    t_cut = t_cut if t_cut is not None else rng.randint(1, t - 2)
    ids = torch.randint(0, cfg.vocab_size, (3, t))
    changed = ids.clone()
    changed[0, t_cut + 1 :] = torch.randint(0, cfg.vocab_size, (t - t_cut - 1,))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    diff_own = (a[0, : t_cut + 1] - b[0, : t_cut + 1]).abs().max().item()
    diff_others = (a[1:] - b[1:]).abs().max().item()
    return max(diff_own, diff_others)


@pytest.mark.parametrize("seed", range(18))
def test_every_causal_configuration_is_causal(seed):
    rng = random.Random(100 + seed)
    cfg = routed_case(
        seed,
        CAUSAL_ROUTINGS,
        execution=rng.choice(["sparse", "dense"]),
        dct_scale=rng.choice(["ortho", "reference"]),
        entropy=rng.choice(["ortho", "reference"]),
        straight_through=rng.choice(["chosen", "all"]),
        dropout_placement=rng.choice(["sublayers", "reference"]),
    )
    model = build(ChiarForCausalLM, cfg, seed)
    ids = torch.randint(0, cfg.vocab_size, (3, 48))
    calibrate_taus(model, ids)
    with torch.no_grad():
        assert_routes(model(ids, return_routing=True).routing, cfg)
    for _ in range(3):
        assert assert_causal(model, model.cfg, rng) < 1e-5, model.cfg


# ---------------------------------------------------------------- attention dropout on CPU
@pytest.mark.parametrize("t", [5, 16, 130, 300])
def test_full_causal_blocks_match_the_fused_kernel(t):
    g = torch.Generator().manual_seed(t)
    q, k, v = (torch.randn(2, 3, t, 8, generator=g, requires_grad=True) for _ in range(3))
    blocked = full_causal_blocks(q, k, v, 0.0)
    fused = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(blocked, fused, atol=1e-5, rtol=1e-5)
    weights = torch.randn(blocked.shape, generator=g)
    grads_blocked = torch.autograd.grad((blocked * weights).sum(), (q, k, v))
    grads_fused = torch.autograd.grad((fused * weights).sum(), (q, k, v))
    for a, b in zip(grads_blocked, grads_fused, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_blocked_dropout_attention_draws_like_sdpa():
    """Per output element, the mean and spread over dropout draws match SDPA's own dropout, and
    the mean is the attention without dropout (inverted dropout is unbiased)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 128, 4, generator=g) for _ in range(3))
    draws = 400
    torch.manual_seed(1)
    blocked = torch.stack([full_causal_blocks(q, k, v, 0.3) for _ in range(draws)])
    sdpa = torch.stack([F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.3) for _ in range(draws)])
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    std_b, std_s = blocked.std(0), sdpa.std(0)
    assert std_s.mean() > 0.05  # the draws really vary
    standard_error = (std_b**2 / draws + std_s**2 / draws).sqrt() + 1e-6
    assert ((blocked.mean(0) - sdpa.mean(0)).abs() / standard_error).max() < 5
    assert ((blocked.mean(0) - exact).abs() / (std_b / draws**0.5 + 1e-6)).max() < 5
    assert 0.9 < (std_b.mean() / std_s.mean()).item() < 1.1


@pytest.mark.parametrize("layout", ["baseline", "dct_attn"])
def test_training_with_dropout_takes_the_blocked_path_and_stays_causal(layout, monkeypatch):
    calls = []

    def counted(*args):
        calls.append(args[0].shape[2])
        return full_causal_blocks(*args)

    monkeypatch.setattr(layers, "full_causal_blocks", counted)
    cfg = random_config(random.Random(5), layout=layout, routing="threshold", dropout=0.1, max_seq_len=256,
                        meta_router="none")
    model = build(ChiarForCausalLM, cfg).train()
    t = BLOCKED_DROPOUT_MIN_T + 16
    ids = torch.randint(0, cfg.vocab_size, (2, t))
    changed = ids.clone()
    changed[0, 100:] = torch.randint(0, cfg.vocab_size, (t - 100,))
    torch.manual_seed(3)
    a = model(ids).logits
    torch.manual_seed(3)
    b = model(changed).logits
    assert calls and set(calls) == {t}
    assert (a[0, :100] - b[0, :100]).abs().max() < 1e-5 and (a[1] - b[1]).abs().max() < 1e-5
    torch.manual_seed(4)
    assert (model(ids).logits - a).abs().max() > 1e-3  # dropout is on: another draw differs


NONCAUSAL = [
    dict(layout="dct_attn", meta_router="batch_mean"),
    # A small gamma flattens the published kernel (its T x T softmax is nearly the identity at gamma=1).
    dict(layout="three_op", rbf="reference_quadratic", rbf_gamma=0.03),
    dict(layout="dct_attn", routing="topk", attn_fraction=0.25),
]


@pytest.mark.parametrize("options", NONCAUSAL)
def test_noncausal_options_are_refused_and_really_leak(options):
    cfg = random_config(random.Random(3), **options)
    with pytest.raises(UserError, match="allow_noncausal"):
        ChiarForCausalLM(cfg)
    model = build(ChiarForCausalLM, cfg.replace(allow_noncausal=True))
    if model.model.meta_router is not None:  # a trained gate depends on its input; a fresh one does not
        torch.nn.init.normal_(model.model.meta_router.gate.weight, std=50.0)
    for layer in model.model.layers:  # likewise a trained projection of the published RBF's mixture
        if layer.rbf_ref is not None:
            torch.nn.init.normal_(layer.rbf_ref.proj.weight, std=1.0)
    rng = random.Random(5)
    leaks = [assert_causal(model, cfg, rng, t_cut=8) for _ in range(4)]
    assert max(leaks) > 1e-4


# ---------------------------------------------------------------- generation
@pytest.mark.parametrize("seed", range(6))
def test_cached_generation_matches_uncached_logits(seed):
    cfg = routed_case(200 + seed, CAUSAL_ROUTINGS)
    model = build(ChiarForCausalLM, cfg, seed)
    calibrate_taus(model, torch.randint(0, cfg.vocab_size, (2, 25)))
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    tokens = model.generate(prompt, max_new_tokens=20, temperature=0)
    assert tokens.shape == (2, 25) and torch.equal(tokens[:, :5], prompt)
    # Feed the same tokens through the cache one at a time and compare with one full pass.
    from chiarformer.model import KVCache

    cache = KVCache.empty(cfg.n_layers)
    with torch.no_grad():
        full = model(tokens, return_routing=True)
        assert_routes(full.routing, cfg)
        full = full.logits
        steps = [model(tokens[:, :5], cache=cache).logits]
        steps += [model(tokens[:, i : i + 1], cache=cache).logits for i in range(5, tokens.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)
    # Greedy decoding is the argmax of the uncached logits.
    assert torch.equal(full[:, 4:-1].argmax(-1), tokens[:, 5:])


def test_generate_refuses_topk_and_too_long():
    cfg = random_config(random.Random(1), layout="baseline", routing="threshold")
    model = build(ChiarForCausalLM, cfg)
    with pytest.raises(UserError, match="max_seq_len"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)
    topk = build(ChiarForCausalLM, cfg.replace(layout="dct_attn", routing="topk", allow_noncausal=True))
    with pytest.raises(UserError, match="topk"):
        topk.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2)


# ---------------------------------------------------------------- learning
@pytest.mark.parametrize("routing", ["soft", "hard"])
def test_router_receives_gradients(routing):
    cfg = random_config(random.Random(2), layout="three_op", routing=routing)
    model = build(ChiarForCausalLM, cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    out = model(ids, labels=ids)
    out.loss.backward()
    for i in cfg.routed_layers:
        grad = model.model.layers[i].router.logits.weight.grad
        assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("routing", ["soft", "hard"])
def test_collapse_regulariser_changes_router_gradient(routing):
    cfg = random_config(random.Random(4), layout="dct_attn", routing=routing)
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    grads = []
    for lam in (0.0, 0.5):
        model = build(ChiarForCausalLM, cfg.replace(collapse_reg=lam))
        out = model(ids, labels=ids)
        (out.loss + out.aux_loss).backward()
        grads.append(model.model.layers[1].router.logits.weight.grad.clone())
        if lam:
            assert out.aux_loss.item() < 0  # minus the usage entropy, times lambda
    assert (grads[0] - grads[1]).abs().max() > 1e-7


def test_threshold_routing_follows_tau():
    cfg = random_config(random.Random(6), layout="dct_attn", routing="threshold")
    model = build(ChiarForCausalLM, cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    model.set_taus([0.0, 0.0])
    assert all((r.ops == ATTN).all() for r in model(ids, return_routing=True).routing[1:3])
    model.set_taus([1.0, 1.0])
    out = model(ids, return_routing=True)
    assert all((r.ops == DCT).all() for r in out.routing[1:3])
    for r in out.routing:  # the entropy is reported for every layer, routed or not
        assert r.entropy.shape == ids.shape and r.entropy.dtype == torch.float32
    assert model.cfg.tau == [1.0, 1.0]


# ---------------------------------------------------------------- RoPE
def test_rope_rotates_feature_pairs_and_its_gradient_is_the_inverse_rotation():
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64).transpose(1, 2)  # (B, H, N, dh) heads view, as in attention
    pos = torch.tensor([0, 1, 7, 100, 1000])
    angles = pos[:, None].float() * 10.0 ** (-torch.arange(4.0) / 4)  # float32 angles, as in the model
    cos, sin = angles.cos().double(), angles.sin().double()
    x1, x2 = x.chunk(2, dim=-1)
    expected = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    torch.testing.assert_close(rope(x, pos, base=10.0), expected)
    assert torch.autograd.gradcheck(lambda t: rope(t, pos, base=10.0), (x.detach().requires_grad_(),))
    # scores depend on relative positions only: shifting both positions changes nothing
    q, k = torch.randn(2, 1, 1, 1, 8, dtype=torch.float64)

    def score(pq, pk):
        return (rope(q, torch.tensor([pq]), 10.0) * rope(k, torch.tensor([pk]), 10.0)).sum()

    torch.testing.assert_close(score(9, 4), score(109, 104))


# ---------------------------------------------------------------- RBF
def test_causal_linear_rbf_matches_explicit_masked_kernel():
    cfg = ChiarConfig.from_preset("tiny", layout="DRA,A", n_layers=2, routing="threshold", tau=[[0.0, 1.0]])
    model = build(ChiarForCausalLM, cfg)
    mixer = model.model.layers[0].mixer
    q, k, v = (torch.randn(2, 4, 150, cfg.head_dim) for _ in range(3))
    fq, fk = mixer.rbf_features(q), mixer.rbf_features(k)
    scores = (fq @ fk.transpose(-1, -2)).tril()
    expected = (scores @ v) / torch.arange(1, 151)[:, None]
    torch.testing.assert_close(mixer.rbf(q, k, v, None, causal=True), expected, atol=1e-5, rtol=1e-4)
    # kernel approximation: phi(q).phi(k) estimates exp(-gamma |q - k|^2 / 2)
    a, b = torch.randn(1, 1, 1, cfg.head_dim) * 0.1, torch.randn(1, 1, 1, cfg.head_dim) * 0.1
    assert (mixer.rbf_features(a) * mixer.rbf_features(b)).sum().item() == pytest.approx(
        torch.exp(-(a - b).square().sum() / 2).item(), abs=0.35
    )


def test_causal_rbf_is_linear_in_time_and_memory():
    cfg = ChiarConfig.from_preset("tiny", layout="DRA,A", n_layers=2, tau=[[0.0, 1.0]])
    mixer = build(ChiarForCausalLM, cfg).model.layers[0].mixer
    largest = {}

    class Biggest(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                largest["n"] = max(largest.get("n", 0), out.numel())
            return out

    flops, memory = {}, {}
    for t in (512, 1024):
        q, k, v = (torch.randn(1, 1, t, cfg.head_dim) for _ in range(3))
        largest.clear()
        with FlopCounterMode(display=False) as counter, Biggest():
            mixer.rbf(q, k, v, None, causal=True)
        flops[t], memory[t] = counter.get_total_flops(), largest["n"]
    assert flops[1024] / flops[512] == pytest.approx(2.0, rel=0.05)
    assert memory[1024] / memory[512] == pytest.approx(2.0, rel=0.05)  # largest tensor grows like T


# ---------------------------------------------------------------- structure and errors
def test_baseline_and_chiar_differ_only_by_operators():
    base = ChiarForCausalLM(ChiarConfig.from_preset("paper-17m", layout="baseline"))
    chiar = ChiarForCausalLM(ChiarConfig.from_preset("paper-17m", layout="dct_attn"))
    nb, nc = base.num_parameters(), chiar.num_parameters()
    d = 256
    mixer = 4 * d * d + 4 * d  # Q, K/V and output projections of layer 1, replaced by a DCT filter
    assert nb["total"] - nc["total"] == mixer - 3 * d  # DCT filters in layers 1..3
    assert nb["embedding"] == nc["embedding"] == 50257 * d
    assert nb["non_embedding"] == nb["total"] - nb["embedding"]


def test_presets_and_overrides():
    cfg = ChiarConfig.from_preset("paper-400m", layout="dct_attn", routing="hard")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_ff) == (28, 1024, 16, 4096)
    assert cfg.routed_layers == list(range(1, 27))
    assert ChiarConfig.from_preset("tiny", layout="D,DRA,A", n_layers=3).layer_ops == [(DCT,), (DCT, ATTN, RBF), (ATTN,)]
    with pytest.raises(UserError, match="unknown preset"):
        ChiarConfig.from_preset("paper-1b")
    with pytest.raises(UserError, match="unknown model config key"):
        ChiarConfig.from_preset("tiny", heads=3)
    with pytest.raises(UserError, match="layout"):
        ChiarConfig.from_preset("tiny", layout="D,X,A,A")
    with pytest.raises(UserError, match="tau"):
        ChiarConfig.from_preset("tiny", tau=[0.5])


def test_too_long_sequence_is_a_clear_error():
    cfg = ChiarConfig.from_preset("tiny", max_seq_len=16)
    model = ChiarForCausalLM(cfg)
    with pytest.raises(UserError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_loss_is_shifted_next_token_cross_entropy():
    cfg = ChiarConfig.from_preset("tiny", layout="dct_attn", tau=0.8)
    model = build(ChiarForCausalLM, cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    labels = ids.clone()
    labels[0, 3:7] = -100  # ignored targets count neither in the sum nor in the mean
    out = model(ids, labels=labels)
    # The former formula: slice the logits (a full-size copy) and flatten.
    manual = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, manual, rtol=1e-6, atol=0)
    assert out.logits.shape == (2, 20, cfg.vocab_size)
    grads = torch.autograd.grad(out.loss, model.model.embed.weight, retain_graph=True)[0]
    # Two summation orders: agreement to float32 rounding of the largest gradient (~0.2), not 1e-8
    # absolute, which an element's last bits can miss depending on memory alignment.
    torch.testing.assert_close(grads, torch.autograd.grad(manual, model.model.embed.weight)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layout,routing", [("three_op", "threshold"), ("dct_attn", "topk")])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_classifier_ignores_padding(bidirectional, layout, routing):
    cfg = random_config(random.Random(8), layout=layout, routing=routing, bidirectional=bidirectional)
    model = build(ChiarForSequenceClassification, cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 30))
    padded = torch.cat([ids, torch.zeros(1, 10, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 30), torch.zeros(1, 10)], 1).bool()
    with torch.no_grad():
        alone = model(ids).logits
        with_pad = model(padded, attention_mask=mask).logits
    torch.testing.assert_close(alone, with_pad, atol=1e-5, rtol=0)
    assert alone.shape == (1, cfg.n_classes)


def test_meta_router_starts_at_its_init_and_is_causal_by_default():
    cfg = random_config(random.Random(9), layout="dct_attn", meta_router="causal", meta_gate_init=0.22)
    model = build(ChiarForCausalLM, cfg)
    out = model(torch.randint(0, cfg.vocab_size, (2, 12)))
    torch.testing.assert_close(out.meta_gate, torch.full((2, 12, 1), 0.22))


# ---------------------------------------------------------------- published-code options
def test_per_operator_norms_agree_sparse_and_dense_and_use_their_own_layernorm():
    cfg = random_config(random.Random(21), layout="dct_attn", routing="threshold", norm="per_operator", max_seq_len=128)
    model = build(ChiarForCausalLM, cfg).train()
    with torch.no_grad():  # different LayerNorms per operator, as in every trained published checkpoint
        for layer in model.model.layers:
            for norm in layer.op_norms.values():
                norm.weight.normal_(1.0, 0.3), norm.bias.normal_(0.1, 0.1)
    dense = same_weights(model, cfg.replace(execution="dense")).train()
    ids = torch.randint(0, cfg.vocab_size, (3, 128))
    for m in (model, dense):
        m(ids, labels=ids).loss.backward()
    with torch.no_grad():
        a, b = model.eval()(ids, return_routing=True), dense.eval()(ids)
    ops = a.routing[1].ops
    assert (ops == ATTN).any() and (ops == DCT).any()
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    for (name, p), q in zip(model.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    # each operator's LayerNorm is trained only by its own tokens: a layer with one route leaves the other's grad zero
    only_dct = same_weights(model, cfg).train()
    only_dct.set_taus([1.0] * len(cfg.routed_layers))
    only_dct(ids, labels=ids).loss.backward()
    assert not only_dct.model.layers[1].op_norms["attention"].weight.grad.any()
    assert only_dct.model.layers[1].op_norms["dct"].weight.grad.any()


def test_reference_entropy_weights_the_dc_coefficient_twice():
    from chiarformer.ops import dct, reference_spectral_entropy, spectral_entropy

    x = torch.randn(5, 64, dtype=torch.float64)
    power = dct(x).square()
    power[:, 0] *= 2
    p = power / power.sum(-1, keepdim=True)
    expected = -(p * p.log()).sum(-1) / torch.log(torch.tensor(64.0, dtype=torch.float64))
    torch.testing.assert_close(reference_spectral_entropy(x).double(), expected, atol=1e-5, rtol=0)
    centred = x - x.mean(-1, keepdim=True)  # no DC power: both definitions agree
    torch.testing.assert_close(reference_spectral_entropy(centred), spectral_entropy(centred), atol=1e-5, rtol=0)
    assert (reference_spectral_entropy(x + 1.0) - spectral_entropy(x + 1.0)).abs().min() > 1e-3


@pytest.mark.parametrize("routing", ["threshold", "soft", "hard"])
def test_published_collapse_form_is_a_constant_on_detached_gates(routing):
    cfg = random_config(random.Random(22), layout="dct_attn", routing=routing, collapse_reg=0.01, collapse_form="reference")
    model = build(ChiarForCausalLM, cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    out = model(ids, labels=ids)
    expected = 0.0
    for info in out.routing[1:3]:
        gates = info.probs.detach() if routing == "soft" else torch.stack([info.ops == op for op in info.order], -1).float()
        q = gates.reshape(-1, 2).mean(0)
        expected += float((q * (q + 1e-8).log()).sum())
    assert abs(float(out.aux_loss) - 0.01 * expected) < 1e-6 and not out.aux_loss.requires_grad
    ours = same_weights(model, cfg.replace(collapse_form="probs")).train()(ids, labels=ids).aux_loss
    assert ours.requires_grad == (routing != "threshold")


def test_published_dropout_placement_keeps_head_weights_and_drops_in_the_head():
    cfg = random_config(random.Random(23), layout="dct_attn", dropout=0.1, dropout_placement="reference")
    model = ChiarForSequenceClassification(cfg)
    assert model.head.dropout.p == 0.1 and model.model.layers[1].dropout.p == 0.0
    assert model.model.layers[1].ffn.inner_dropout.p == 0.1
    ours = ChiarForSequenceClassification(cfg.replace(dropout_placement="sublayers"))
    assert ours.head.dropout.p == 0.0 and ours.model.layers[1].ffn.inner_dropout.p == 0.0
    assert model.state_dict().keys() == ours.state_dict().keys() and "head.2.weight" in ours.state_dict()


def test_published_rbf_operator_follows_its_equations():
    cfg = random_config(random.Random(24), layout="D,DRA,A", n_layers=3, rbf="reference_quadratic", allow_noncausal=True,
                        norm="per_operator")
    layer = build(ChiarForCausalLM, cfg).model.layers[1]
    x = torch.randn(2, 12, cfg.d_model)
    omega, r = layer.rbf_ref.omega, cfg.rbf_features
    assert omega.shape == (cfg.d_model, r)
    angles = x @ omega / math.sqrt(r)
    phi = torch.cat([angles.cos(), angles.sin()], -1)
    mixed = torch.softmax(phi @ phi.transpose(1, 2), -1) @ phi  # every position, no mask
    f = layer.rbf_ref.ffn
    expected = f.down(F.gelu(f.up(layer.rbf_ref.proj(mixed))))
    with torch.no_grad():
        torch.testing.assert_close(layer.rbf_ref(x, None), expected, atol=1e-5, rtol=0)
