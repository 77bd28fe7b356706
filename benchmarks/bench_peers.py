"""Training and decoding speed against a peer and against our own baseline, causal routing only.

1. Our full-attention baseline vs Hugging Face `GPT2LMHeadModel` (attn_implementation="sdpa")
   at the same sizes (d 256, 4 layers, 4 heads, d_ff 1024), and causal routed dct_attn vs our
   baseline: threshold routing with taus calibrated by `chiarformer.analysis.calibrate` so each
   routed layer sends `--attn` of the tokens to attention, and capacity routing with the same
   taus. Two shapes: vocab 50257, T 256, batch 8 (paper-17m) and vocab 32, T 2048, batch 2.
   One training step = forward, backward and AdamW step, fp32, dropout 0.1 in every model.
2. Greedy decoding, batch 1, a 16-token prompt and 128 new tokens, paper-17m: routed vs baseline.
3. Causal attention with dropout 0.1 (training), forward+backward, at several context lengths:
   SDPA (no fused kernel with dropout on CPU) vs the query blocks that replace it in training
   on CPU (sparse.full_causal_blocks); 4 heads of 64, 4096 tokens per batch.
4. With --compile: the capacity-routed and baseline training steps (forward+backward) compiled
   with torch.compile(fullgraph=True, dynamic=False) vs eager, vocab 32, T 2048, batch 2.

Weights are random (calibration runs on random token windows); every variant is timed in one
process, interleaved round-robin, and reported as a ratio of medians. The attention share is
measured on the timed batch after the timed steps (AdamW moves the weights, and the share with
them). transformers is optional: without it the HF rows are skipped with a message.
    python benchmarks/bench_peers.py [--repeats 7] [--compile]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from chiarformer import ChiarConfig, ChiarForCausalLM
from chiarformer.analysis.calibrate import calibrate_hidden
from chiarformer.analysis.common import Batch, collect_routing
from chiarformer.operators import ATTN
from chiarformer.sparse import full_causal_blocks

from bench_routing import race  # interleaved medians, shared with the routing benchmark

SHAPES = (("paper-17m dims", 50257, 256, 8), ("vocab 32, T 2048", 32, 2048, 2))
SUMMARY: list[tuple[str, str, str]] = []  # (measurement, result, target) for the closing table


def hf_gpt2(vocab: int, t: int):
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        print("transformers is not installed: the Hugging Face GPT-2 rows are skipped (pip install transformers)")
        return None
    cfg = GPT2Config(vocab_size=vocab, n_positions=t, n_embd=256, n_layer=4, n_head=4, n_inner=1024,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, attn_implementation="sdpa")
    model = GPT2LMHeadModel(cfg)
    assert model.config._attn_implementation == "sdpa"
    return model


def ours(layout: str, vocab: int, t: int, **kw) -> ChiarForCausalLM:
    return ChiarForCausalLM(ChiarConfig.from_preset("paper-17m", vocab_size=vocab, max_seq_len=t, layout=layout, **kw))


def calibrated_pair(vocab: int, t: int, attn: float, capacity_factor: float, seed: int):
    """dct_attn with threshold taus calibrated to `attn` per routed layer, and the capacity-routed
    model with the same weights and taus."""
    torch.manual_seed(seed)
    threshold = ours("dct_attn", vocab, t, routing="threshold").eval()
    g = torch.Generator().manual_seed(seed + 1)
    batches = [Batch(torch.randint(0, vocab, (4, t), generator=g), None) for _ in range(max(1, 8192 // (4 * t)))]
    taus = calibrate_hidden(threshold, batches, target_attn=attn).taus
    capacity = ChiarForCausalLM(threshold.cfg.replace(routing="capacity", attn_fraction=attn, capacity_factor=capacity_factor))
    capacity.load_state_dict(threshold.state_dict())
    return threshold, capacity, taus


def attention_share(model, ids) -> str:
    """Share of tokens sent to attention in each routed layer, e.g. '25%/24%'."""
    stats = collect_routing(model.eval(), [Batch(ids, None)])
    return "/".join(f"{stats.share(i, ATTN):.0%}" for i in model.cfg.routed_layers)


def training_step(model, ids, hf: bool = False):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids) if hf else model(ids, labels=ids)
        out.loss.backward()
        opt.step()

    return step


def bench_training(args) -> None:
    for label, vocab, t, batch in SHAPES:
        torch.manual_seed(args.seed)
        ids = torch.randint(0, vocab, (batch, t))
        threshold, capacity, taus = calibrated_pair(vocab, t, args.attn, args.capacity_factor, args.seed)
        models = {"ours, baseline": ours("baseline", vocab, t)}
        peer = hf_gpt2(vocab, t)
        if peer is not None:
            models["HF GPT2LMHeadModel (sdpa)"] = peer
        models[f"ours, dct_attn threshold ({args.attn:.0%} calibrated)"] = threshold
        models[f"ours, dct_attn capacity (x{args.capacity_factor:g})"] = capacity
        steps = {name: training_step(m, ids, hf=name.startswith("HF")) for name, m in models.items()}
        med = race(steps, args.repeats, "cpu")
        base = med["ours, baseline"]
        print(f"\n## Training step, fwd+bwd+AdamW, fp32, {label}: vocab {vocab}, T {t}, batch {batch}, d 256, 4 layers "
              f"(taus {', '.join(f'{x:.4f}' for x in taus)})")
        print("| model | tokens/s | ours baseline vs it | vs our baseline | attention share per routed layer |")
        print("|---|---|---|---|---|")
        for name, sec in med.items():
            routed = name.startswith("ours, dct_attn")
            share = attention_share(models[name], ids) if routed else ""
            print(f"| {name} | {batch * t / sec:,.0f} | {sec / base:.2f}x | {base / sec:.2f}x | {share} |")
            if name.startswith("HF"):
                SUMMARY.append((f"baseline vs HF GPT-2, {label}", f"{sec / base:.2f}x", ">= 1.05x"))
            elif routed:
                target = ">= 1.02x" if vocab > 32 else ">= 1.45x"
                result = f"{base / sec:.2f}x (attn {share})"
                SUMMARY.append((f"{name.removeprefix('ours, ')} vs baseline, {label}", result, target))


def bench_decoding(args) -> None:
    vocab, t = 50257, 256
    threshold, capacity, _ = calibrated_pair(vocab, t, args.attn, args.capacity_factor, args.seed)
    torch.manual_seed(args.seed)
    models = {"baseline": ours("baseline", vocab, t).eval(), "dct_attn threshold": threshold.eval(),
              "dct_attn capacity": capacity.eval()}
    prompt = torch.randint(0, vocab, (1, 16))
    new = 128
    runs = {name: (lambda m=m: m.generate(prompt, max_new_tokens=new, temperature=0)) for name, m in models.items()}
    med = race(runs, max(3, args.repeats // 2), "cpu")
    base = med["baseline"]
    print(f"\n## Greedy decoding, paper-17m, batch 1, prompt 16, {new} new tokens (KV cache)")
    print("| model | tokens/s | vs baseline | attention share of the generated sequence |")
    print("|---|---|---|---|")
    for name, sec in med.items():
        share = attention_share(models[name], runs[name]()) if name != "baseline" else ""
        print(f"| {name} | {new / sec:,.0f} | {base / sec:.2f}x | {share} |")
        if name != "baseline":
            SUMMARY.append((f"decoding, {name} vs baseline", f"{base / sec:.2f}x", ">= 0.95x"))


def bench_dropout_attention(args) -> None:
    print("\n## Causal attention with dropout 0.1, fwd+bwd, fp32, 4 heads x 64, 4096 tokens per batch")
    print("| T | batch | SDPA ms | query blocks ms | blocks vs SDPA |")
    print("|---|---|---|---|---|")
    for t in (32, 64, 128, 256, 512, 1024, 2048):
        g = torch.Generator().manual_seed(args.seed)
        q, k, v = (torch.randn(4096 // t, 4, t, 64, generator=g).requires_grad_() for _ in range(3))

        def run(attend, q=q, k=k, v=v):
            return lambda: attend(q, k, v).sum().backward()

        runs = {"sdpa": run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.1)),
                "blocks": run(lambda q, k, v: full_causal_blocks(q, k, v, 0.1))}
        med = race(runs, args.repeats, "cpu")
        print(f"| {t} | {4096 // t} | {med['sdpa'] * 1e3:.1f} | {med['blocks'] * 1e3:.1f} | {med['sdpa'] / med['blocks']:.2f}x |")


def bench_compile(args) -> None:
    vocab, t, batch = 32, 2048, 2
    _, capacity, _ = calibrated_pair(vocab, t, args.attn, args.capacity_factor, args.seed)
    ids = torch.randint(0, vocab, (batch, t))
    variants = {}
    for name, model in (("baseline", ours("baseline", vocab, t)), ("dct_attn capacity", capacity)):
        for mode in ("eager", "compiled"):
            m = model.train() if mode == "eager" else torch.compile(model.train(), fullgraph=True, dynamic=False)

            def step(m=m, model=model):
                model.zero_grad(set_to_none=True)
                m(ids, labels=ids).loss.backward()

            start = time.perf_counter()
            step()
            if mode == "compiled":
                print(f"compiling {name} (fullgraph=True, dynamic=False): {time.perf_counter() - start:.0f} s")
            variants[f"{name}, {mode}"] = step
    med = race(variants, args.repeats, "cpu")
    print(f"\n## torch.compile vs eager, fwd+bwd, fp32 CPU, vocab {vocab}, T {t}, batch {batch}")
    print("| variant | tokens/s | vs baseline eager |")
    print("|---|---|---|")
    for name, sec in med.items():
        print(f"| {name} | {batch * t / sec:,.0f} | {med['baseline, eager'] / sec:.2f}x |")
    for name in ("baseline", "dct_attn capacity"):
        SUMMARY.append((f"{name}: compiled vs eager (CPU)", f"{med[f'{name}, eager'] / med[f'{name}, compiled']:.2f}x", ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--attn", type=float, default=0.25, help="attention share per routed layer to calibrate to")
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="also time torch.compile vs eager (minutes of compiling)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice, all cores)")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-decoding", action="store_true")
    p.add_argument("--skip-attention", action="store_true", help="skip the attention-with-dropout rows")
    args = p.parse_args()
    if args.threads:  # on a loaded machine one thread per process avoids OpenMP threads waiting on each other
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, fp32; medians of {args.repeats} interleaved runs")
    if not args.skip_training:
        bench_training(args)
    if not args.skip_decoding:
        bench_decoding(args)
    if not args.skip_attention:
        bench_dropout_attention(args)
    if args.compile:
        bench_compile(args)
    print(f"\n## Summary ({time.perf_counter() - start:.0f} s)")
    print("| measurement | result | target |")
    print("|---|---|---|")
    for row in SUMMARY:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
