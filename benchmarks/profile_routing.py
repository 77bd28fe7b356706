"""Where the time of a token-mixing sub-layer goes: full causal attention vs routed (sparse).

Profiles forward+backward of both sub-layers (the settings of bench_routing.py) with
torch.profiler and prints self time per operator, per step, side by side, the matrix
products by shape. Profiling inflates small operators; use bench_routing.py for ratios.
    python benchmarks/profile_routing.py [--steps 3] [--top 25]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import profile

from chiarformer import ChiarConfig, ChiarForCausalLM


def self_times(layer, h, pos, steps: int) -> dict[str, float]:
    """Milliseconds of self CPU time per step, by operator (matrix products by shape)."""

    def step():
        h.grad = None
        mixed, _, _ = layer.token_mixing(h, pos, None, None, 0)
        mixed.sum().backward()

    step()
    with profile(record_shapes=True) as prof:
        for _ in range(steps):
            step()
    times = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        key = event.key
        if key in ("aten::mm", "aten::addmm"):
            key = f"{key} {[s for s in event.input_shapes if len(s) == 2]}"
        times[key] += event.self_cpu_time_total / 1000 / steps
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    torch.manual_seed(0)
    d, t, b = 256, 1024, 4
    common = dict(vocab_size=32, d_model=d, n_heads=4, n_layers=3, max_seq_len=t, dropout=0.0, allow_noncausal=True)
    variants = {
        "full": ChiarConfig(layout="A,A,A", **common),
        "routed": ChiarConfig(layout="DA,DA,A", routing="topk", attn_fraction=0.25, **common),
    }
    h = torch.randn(b, t, d, requires_grad=True)
    pos = torch.arange(t)
    times = {name: self_times(ChiarForCausalLM(cfg).model.layers[0], h, pos, args.steps) for name, cfg in variants.items()}
    keys = sorted(set(times["full"]) | set(times["routed"]), key=lambda k: -max(times["full"][k], times["routed"][k]))
    print(f"self CPU ms per forward+backward step (d={d}, T={t}, batch={b}, 25% to attention, top-k)")
    print("| operator | full attention | routed, sparse |")
    print("|---|---|---|")
    for key in keys[: args.top]:
        print(f"| {key} | {times['full'][key]:.2f} | {times['routed'][key]:.2f} |")
    print(f"| total | {sum(times['full'].values()):.1f} | {sum(times['routed'].values()):.1f} |")


if __name__ == "__main__":
    main()
