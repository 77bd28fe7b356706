"""Measured cost of routed execution, next to the analytic FLOP ratios.

Part 1 - token-mixing sub-layer, forward + backward: full causal attention (baseline layer)
vs the routed DCT|attention sub-layer (sparse and dense execution) at a fixed attention share,
plus two bounds on the sparse layer: its attention work alone, and the layer with its router and
DCT filter made free (the best any DCT kernel could do).
Part 2 - whole model, forward + backward, tokens/s: baseline vs dct_attn with top-k routing.

All variants are timed in one process, interleaved, and reported as ratios of medians, so
machine noise hits them alike. Usage:
    python benchmarks/bench_routing.py                 # the issue's settings (CPU, about 2 min)
    python benchmarks/bench_routing.py --device cuda --whole-seq-len 2048 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from chiarformer import ChiarConfig, ChiarForCausalLM
from chiarformer.flops import MIXING, count_flops, entropy_macs, training_macs
from chiarformer.operators import ATTN
from chiarformer.ops import resolve_impl
from chiarformer.sparse import merge_rows, sparse_attention


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def race(variants: dict, repeats: int, device: str) -> dict[str, float]:
    """Median seconds per call of each variant, calls interleaved round-robin."""
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def mixing_step(layer, h, pos):
    def step():
        h.grad = None
        mixed, _, _ = layer.token_mixing(h, pos, None, None, 0)
        mixed.sum().backward()

    return step


def analytic_mixing_ratios(full_cfg, routed_cfg, t: int, f: float, components=MIXING) -> tuple[float, float]:
    """MACs of the first layer's token-mixing sub-layer (those components of it), routed / full
    (chiarformer.flops): forward, and forward+backward (backward ~2x forward; the routing
    entropy runs forward only)."""
    dct_cost = resolve_impl(routed_cfg.dct_impl)

    def mixing(cfg, components):
        layer = count_flops(cfg, t, attn_fraction=f, dct_cost=dct_cost).layers[0]
        forward = sum(layer.macs.get(c, 0.0) for c in components)
        entropy = entropy_macs(cfg.d_model, dct_cost) if len(layer.ops) > 1 and "router" in components else 0.0
        return forward, training_macs(forward, entropy)

    (routed_fwd, routed_train), (full_fwd, full_train) = mixing(routed_cfg, components), mixing(full_cfg, MIXING)
    return routed_fwd / full_fwd, routed_train / full_train


def routed_bound_step(layer, h, pos, pass_dct_tokens: bool):
    """A lower bound on the routed layer, for its own routing (decided once, outside the timing).

    Without pass_dct_tokens: its attention work alone (K/V for every token; Q, scores and output
    projection for the attention tokens). With it: the layer as if its router and DCT filter cost
    nothing, the DCT tokens passed through unchanged and every token put back in place; no DCT
    kernel can beat this.
    """
    with torch.no_grad():
        _, decision, _ = layer.token_mixing(h, pos, None, None, 0)
    selected = decision.ops == ATTN
    b, t, d = h.shape
    dct_rows = (~selected).reshape(-1).nonzero().squeeze(1)

    def step():
        h.grad = None
        k, v = layer.mixer.keys_values(h, pos)
        rows, y = sparse_attention(layer.mixer, layer.causal, h, selected, k, v, pos, None)
        if pass_dct_tokens:
            y = merge_rows(b * t, [dct_rows, rows], [h.reshape(b * t, d).index_select(0, dct_rows), y])
        y.sum().backward()

    return step


def sublayer_configs(d: int, heads: int, t: int, f: float, dct_impl: str = "auto") -> tuple[ChiarConfig, ChiarConfig]:
    """Full attention and routed DCT|attention (top-k, share f); the first layer is the one timed."""
    common = dict(
        vocab_size=32, d_model=d, n_heads=heads, n_layers=3, max_seq_len=t, dropout=0.0, allow_noncausal=True, dct_impl=dct_impl
    )
    return ChiarConfig(layout="A,A,A", **common), ChiarConfig(layout="DA,DA,A", routing="topk", attn_fraction=f, **common)


def bench_sublayer(args) -> None:
    d, heads, t, b, f = args.d_model, args.n_heads, args.seq_len, args.batch, args.attn_fraction
    full_cfg, routed_cfg = sublayer_configs(d, heads, t, f, args.dct_impl)
    layers = {
        "full causal attention": ChiarForCausalLM(full_cfg).model.layers[0],
        "routed, sparse": ChiarForCausalLM(routed_cfg).model.layers[0],
        "routed, dense": ChiarForCausalLM(routed_cfg.replace(execution="dense")).model.layers[0],
    }
    h = torch.randn(b, t, d, device=args.device, requires_grad=True)
    pos = torch.arange(t, device=args.device)
    steps = {name: mixing_step(layer.to(args.device), h, pos) for name, layer in layers.items()}
    steps["routed, sparse: its attention part only"] = routed_bound_step(layers["routed, sparse"], h, pos, False)
    steps["routed, sparse: router and DCT filter free"] = routed_bound_step(layers["routed, sparse"], h, pos, True)
    med = race(steps, args.repeats, args.device)
    base = med["full causal attention"]
    print(f"\n## Token-mixing sub-layer, forward+backward ({args.device}, DCT {args.dct_impl}, d={d}, heads={heads}, T={t}, "
          f"batch={b}, attention share {f:.0%}, top-k routing)")
    print("| variant | median ms | time vs full attention | analytic MACs vs full: forward | forward+backward |")
    print("|---|---|---|---|---|")
    analytic = {
        "full causal attention": (1.0, 1.0),
        "routed, sparse": analytic_mixing_ratios(full_cfg, routed_cfg, t, f),
        "routed, dense": analytic_mixing_ratios(full_cfg, routed_cfg.replace(execution="dense"), t, f),
        "routed, sparse: its attention part only": analytic_mixing_ratios(
            full_cfg, routed_cfg, t, f, ("qkv", "scores", "out_proj")
        ),
    }
    analytic["routed, sparse: router and DCT filter free"] = analytic["routed, sparse: its attention part only"]
    for name, sec in med.items():
        forward, train = analytic[name]
        print(f"| {name} | {sec * 1e3:.1f} | {sec / base:.2f}x | {forward:.2f}x | {train:.2f}x |")
    sparse_vs_dense = analytic["routed, dense"][1] / analytic["routed, sparse"][1]
    print(f"sparse is {med['routed, dense'] / med['routed, sparse']:.2f}x faster than dense execution "
          f"(analytic, fwd+bwd: {sparse_vs_dense:.2f}x)")


def bench_whole_model(args) -> None:
    t, b = args.whole_seq_len, args.whole_batch
    common = dict(
        vocab_size=32, d_model=args.d_model, n_heads=args.n_heads, n_layers=4, max_seq_len=t, dropout=0.0, dct_impl=args.dct_impl
    )
    models = {
        "baseline": ChiarForCausalLM(ChiarConfig(layout="baseline", **common)),
        "dct_attn, top-k 25%": ChiarForCausalLM(
            ChiarConfig(layout="dct_attn", routing="topk", attn_fraction=args.attn_fraction, allow_noncausal=True, **common)
        ),
    }
    ids = torch.randint(0, 32, (b, t), device=args.device)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            model(ids, labels=ids).loss.backward()

        return run

    med = race({name: step(m.to(args.device).train()) for name, m in models.items()}, args.repeats, args.device)
    base = med["baseline"]
    print(f"\n## Whole model, forward+backward ({args.device}, 4 layers, d={args.d_model}, vocab 32, T={t}, batch={b})")
    print("| model | tokens/s | vs baseline |")
    print("|---|---|---|")
    for name, sec in med.items():
        print(f"| {name} | {b * t / sec:,.0f} | {base / sec:.2f}x |")
    print("top-k routing ranks whole sequences (non-causal for an LM); it is used here for its static shapes only.")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--attn-fraction", type=float, default=0.25)
    p.add_argument("--whole-seq-len", type=int, default=2048)
    p.add_argument("--whole-batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dct-impl", default="auto", choices=["auto", "matmul", "fft"])
    args = p.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_sublayer(args)
    bench_whole_model(args)


if __name__ == "__main__":
    main()
