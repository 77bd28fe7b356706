"""Where the time of a token-mixing sub-layer goes: full causal attention vs routed (sparse).

Profiles forward+backward of both sub-layers (the settings of bench_routing.py) with
torch.profiler and prints self time per operator, per step, side by side, the matrix
products by shape: CPU time, or on CUDA the GPU kernels' time (with the wall time per step,
whose excess over the kernels is host-side waiting). Profiling inflates small operators;
use bench_routing.py for ratios.
    python benchmarks/profile_routing.py [--steps 3] [--top 25] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from chiarformer import ChiarForCausalLM

from bench_routing import mixing_step, sublayer_configs  # the settings and step of the routing benchmark


def self_times(step, steps: int, cuda: bool) -> tuple[dict[str, float], float]:
    """Milliseconds of self time per step, by operator (matrix products by shape): CPU time,
    or GPU kernel time on CUDA; and the wall milliseconds per profiled step."""
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - start) * 1000 / steps
    times = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        key = event.key
        if key in ("aten::mm", "aten::addmm"):
            key = f"{key} {[s for s in event.input_shapes if len(s) == 2]}"
        times[key] += (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1000 / steps
    return times, wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    d, t, b = 256, 1024, 4
    variants = dict(zip(("full", "routed"), sublayer_configs(d, 4, t, 0.25), strict=True))
    h = torch.randn(b, t, d, device=args.device, requires_grad=True)
    pos = torch.arange(t, device=args.device)
    times, wall = {}, {}
    for name, cfg in variants.items():
        layer = ChiarForCausalLM(cfg).model.layers[0].to(args.device)
        times[name], wall[name] = self_times(mixing_step(layer, h, pos), args.steps, cuda)
    keys = sorted(set(times["full"]) | set(times["routed"]),
                  key=lambda k: -max(times["full"][k], times["routed"][k]))
    kind = "GPU kernel" if cuda else "CPU"
    print(f"self {kind} ms per forward+backward step ({args.device}, d={d}, T={t}, batch={b}, 25% to attention, top-k)")
    print("| operator | full attention | routed, sparse |")
    print("|---|---|---|")
    for key in keys[: args.top]:
        print(f"| {key} | {times['full'][key]:.2f} | {times['routed'][key]:.2f} |")
    print(f"| total | {sum(times['full'].values()):.1f} | {sum(times['routed'].values()):.1f} |")
    print(f"| wall ms per profiled step | {wall['full']:.1f} | {wall['routed']:.1f} |")


if __name__ == "__main__":
    main()
