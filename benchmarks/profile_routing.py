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

from chiarformer import ChiarForCausalLM

from bench_routing import mixing_step, sublayer_configs  # the settings and step of the routing benchmark


def self_times(step, steps: int) -> dict[str, float]:
    """Milliseconds of self CPU time per step, by operator (matrix products by shape)."""
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
    variants = dict(zip(("full", "routed"), sublayer_configs(d, 4, t, 0.25)))
    h = torch.randn(b, t, d, requires_grad=True)
    pos = torch.arange(t)
    times = {name: self_times(mixing_step(ChiarForCausalLM(cfg).model.layers[0], h, pos), args.steps) for name, cfg in variants.items()}
    keys = sorted(set(times["full"]) | set(times["routed"]), key=lambda k: -max(times["full"][k], times["routed"][k]))
    print(f"self CPU ms per forward+backward step (d={d}, T={t}, batch={b}, 25% to attention, top-k)")
    print("| operator | full attention | routed, sparse |")
    print("|---|---|---|")
    for key in keys[: args.top]:
        print(f"| {key} | {times['full'][key]:.2f} | {times['routed'][key]:.2f} |")
    print(f"| total | {sum(times['full'].values()):.1f} | {sum(times['routed'].values()):.1f} |")


if __name__ == "__main__":
    main()
