"""GPU speed of routed execution, eager and compiled, bf16 autocast (prepared for a lent GPU).

1. Token-mixing sub-layer, forward+backward, at T 256, 2048 and 8192: full causal attention vs
   the routed DCT|attention sub-layer (capacity routing, 25% to attention; sparse and dense).
2. Whole model (vocab 32, d 256, 4 layers), forward+backward, the same lengths: baseline vs
   dct_attn with capacity routing.
3. paper-17m training tokens/s (forward, backward, AdamW; batch 128, T 256): baseline vs
   dct_attn with threshold routing, sparse and dense execution, and with capacity routing.
Every part runs eager and under torch.compile (fullgraph=True, dynamic=False where the model has
no host sync: baseline and capacity routing; threshold routing's sparse path syncs, so it
compiles with graph breaks). Taus are set so 25% of the tokens are above them (the quantile of
the entropies the routed layers see, on random weights and tokens). Ratios of medians, variants
interleaved.
    python benchmarks/gpu_bench.py                      # CUDA (about 5 minutes on an H200)
    python benchmarks/gpu_bench.py --device cpu --smoke # checks the script runs (its numbers mean nothing)
"""

from __future__ import annotations

import argparse

import torch

from chiarformer import ChiarConfig, ChiarForCausalLM
from chiarformer.ops import spectral_entropy

from bench_routing import race  # interleaved medians, shared with the routing benchmark

ATTN_SHARE = 0.25


def autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16)


def quantile_taus(model: ChiarForCausalLM, ids: torch.Tensor) -> list[float]:
    """Per routed layer, the entropy above which ATTN_SHARE of the tokens lie (layers in order)."""
    taus = []
    for i in model.cfg.routed_layers:
        with torch.no_grad(), autocast(ids.device.type):
            routing = model(ids, return_routing=True).routing
        taus.append(float(routing[i].entropy.float().flatten().quantile(1 - ATTN_SHARE)))
        model.set_taus(taus + [1.0] * (len(model.cfg.routed_layers) - len(taus)))
    return taus


def maybe_compile(model, compiled: bool, fullgraph: bool, backend: str):
    return torch.compile(model, fullgraph=fullgraph, dynamic=False, backend=backend) if compiled else model


def sublayer(args, t: int) -> dict:
    d, heads, b = 256, 4, max(1, args.tokens // t)
    common = dict(vocab_size=32, d_model=d, n_heads=heads, n_layers=3, max_seq_len=t, dropout=0.0)
    h = torch.randn(b, t, d, device=args.device, requires_grad=True)
    pos = torch.arange(t, device=args.device)
    entropy = spectral_entropy(h.detach()).flatten().quantile(1 - ATTN_SHARE).item()
    full = ChiarForCausalLM(ChiarConfig(layout="A,A,A", **common)).model.layers[0].to(args.device)
    routed_cfg = ChiarConfig(layout="DA,DA,A", routing="capacity", attn_fraction=ATTN_SHARE, tau=[entropy] * 2, **common)
    layers = {"full causal attention": full,
              "routed capacity, sparse": ChiarForCausalLM(routed_cfg).model.layers[0].to(args.device),
              "routed capacity, dense": ChiarForCausalLM(routed_cfg.replace(execution="dense")).model.layers[0].to(args.device)}
    steps = {}
    for compiled in (False, True):
        for name, layer in layers.items():
            fn = maybe_compile(layer.token_mixing, compiled, True, args.backend)

            def step(fn=fn):
                h.grad = None
                with autocast(args.device):
                    mixed, _, _ = fn(h, pos, None, None, 0)
                mixed.float().sum().backward()

            steps[f"{name}, {'compiled' if compiled else 'eager'}"] = step
    return race(steps, args.repeats, args.device)


def whole_model(args, t: int) -> dict:
    b = max(1, args.tokens // t)
    common = dict(vocab_size=32, d_model=256, n_heads=4, n_layers=4, max_seq_len=t, dropout=0.0)
    ids = torch.randint(0, 32, (b, t), device=args.device)
    baseline = ChiarForCausalLM(ChiarConfig(layout="baseline", **common)).to(args.device)
    routed_cfg = ChiarConfig(layout="dct_attn", routing="capacity", attn_fraction=ATTN_SHARE, **common)
    routed = ChiarForCausalLM(routed_cfg).to(args.device)
    quantile_taus(routed.eval(), ids)
    steps = {}
    for compiled in (False, True):
        for name, model in (("baseline", baseline), ("dct_attn capacity", routed)):
            fn = maybe_compile(model.train(), compiled, True, args.backend)

            def step(fn=fn, model=model):
                model.zero_grad(set_to_none=True)
                with autocast(args.device):
                    loss = fn(ids, labels=ids).loss
                loss.backward()

            steps[f"{name}, {'compiled' if compiled else 'eager'}"] = step
    return {name: b * t / sec for name, sec in race(steps, args.repeats, args.device).items()}


def paper_training(args) -> dict:
    b, t = args.paper_batch, 256
    ids = torch.randint(0, 50257, (b, t), device=args.device)
    torch.manual_seed(0)
    threshold = ChiarForCausalLM(ChiarConfig.from_preset("paper-17m", layout="dct_attn", routing="threshold")).to(args.device)
    taus = quantile_taus(threshold.eval(), ids[: max(1, b // 4)])
    variants = {"baseline": ChiarForCausalLM(ChiarConfig.from_preset("paper-17m", layout="baseline")),
                "dct_attn threshold, sparse": threshold}
    for name, changes in (("dct_attn threshold, dense", dict(execution="dense")),
                          ("dct_attn capacity", dict(routing="capacity", attn_fraction=ATTN_SHARE))):
        variants[name] = ChiarForCausalLM(threshold.cfg.replace(tau=taus, **changes))
        variants[name].load_state_dict(threshold.state_dict())
    steps = {}
    for compiled in (False, True):
        for name, model in variants.items():
            model = model.to(args.device).train()
            fn = maybe_compile(model, compiled, "threshold, sparse" not in name, args.backend)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)

            def step(fn=fn, opt=opt):
                opt.zero_grad(set_to_none=True)
                with autocast(args.device):
                    loss = fn(ids, labels=ids).loss
                loss.backward()
                opt.step()

            steps[f"{name}, {'compiled' if compiled else 'eager'}"] = step
    return {name: b * t / sec for name, sec in race(steps, args.repeats, args.device).items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat, aot_eager backend: checks the script")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    args = p.parse_args()
    lengths = (256, 2048, 8192)
    args.tokens, args.paper_batch = 65536, 128
    if args.smoke:
        lengths, args.tokens, args.paper_batch, args.repeats, args.backend = (64, 128), 256, 2, 1, "aot_eager"
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, bf16 autocast, compile backend {args.backend}, medians of {args.repeats}")
    summary = []
    for t in lengths:
        med = sublayer(args, t)
        print(f"\n## Token-mixing sub-layer, fwd+bwd, d 256, 4 heads, T {t}, batch {max(1, args.tokens // t)}, "
              f"{ATTN_SHARE:.0%} to attention (capacity routing)")
        print("| variant | ms | vs full attention (same mode) |")
        print("|---|---|---|")
        for key, sec in med.items():
            mode = key.rsplit(", ", 1)[1]
            print(f"| {key} | {sec * 1e3:.2f} | {sec / med[f'full causal attention, {mode}']:.2f}x |")
        for mode in ("eager", "compiled"):
            ratio = med[f"routed capacity, sparse, {mode}"] / med[f"full causal attention, {mode}"]
            summary.append((f"sub-layer time, routed sparse / full attention, T {t}, {mode}", f"{ratio:.2f}x"))
    for t in lengths:
        rates = whole_model(args, t)
        print(f"\n## Whole model, fwd+bwd, vocab 32, d 256, 4 layers, T {t}, batch {max(1, args.tokens // t)}")
        print("| variant | tokens/s |")
        print("|---|---|")
        for key, rate in rates.items():
            print(f"| {key} | {rate:,.0f} |")
        for mode in ("eager", "compiled"):
            ratio = rates[f"dct_attn capacity, {mode}"] / rates[f"baseline, {mode}"]
            summary.append((f"whole model tokens/s, capacity / baseline, T {t}, {mode}", f"{ratio:.2f}x"))
    rates = paper_training(args)
    print(f"\n## paper-17m training step (fwd+bwd+AdamW), batch {args.paper_batch}, T 256")
    print("| variant | tokens/s | vs baseline (same mode) |")
    print("|---|---|---|")
    for key, rate in rates.items():
        mode = key.rsplit(", ", 1)[1]
        print(f"| {key} | {rate:,.0f} | {rate / rates[f'baseline, {mode}']:.2f}x |")
        if not key.startswith("baseline"):
            summary.append((f"paper-17m training tokens/s, {key} / baseline", f"{rate / rates[f'baseline, {mode}']:.2f}x"))
    print("\n## Summary")
    print("| measurement | result |")
    print("|---|---|")
    for row in summary:
        print(f"| {row[0]} | {row[1]} |")


if __name__ == "__main__":
    main()
