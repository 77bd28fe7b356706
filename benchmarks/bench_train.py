"""Training throughput (tokens/s) of the real training step, for the README and docs/training.md.

Runs `chiarformer.train.loop.Trainer.train_step` (forward, backward, clipping, AdamW, routing
statistics: everything a training step does, no evaluation or checkpoints) on random GPT-2-sized
token windows, for the presets paper-17m and tiny, layouts baseline and dct_attn (published
threshold routing), and reports tokens per second after warm-up (median of repeats).

    python benchmarks/bench_train.py                   # CPU, all cores (this machine: 2)
    python benchmarks/bench_train.py --device cuda     # one GPU, bf16 autocast
    python benchmarks/bench_train.py --json out.json
    python benchmarks/bench_train.py --execution dense # routed layers compute every operator on every token

Timings on a shared machine vary: run it on an otherwise idle machine and read the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from chiarformer.data import LMWindows
from chiarformer.train import resolve
from chiarformer.train.datasets import TaskData
from chiarformer.train.dist import DistInfo
from chiarformer.train.loop import Trainer
from chiarformer.train.runtime import run_settings, tune_cpu_allocator
from chiarformer.train.task_data import finalize_model_config

GPT2_VOCAB = 50257


def cases(device: str) -> list[dict]:
    # (preset, vocab, sequences per step) sized so one step takes ~0.1-1 s on 2 CPU cores
    if device == "cpu":
        sizes = [("paper-17m", GPT2_VOCAB, 8), ("tiny", 512, 16), ("tiny", GPT2_VOCAB, 16)]
    else:
        sizes = [("paper-17m", GPT2_VOCAB, 128), ("tiny", 512, 128), ("tiny", GPT2_VOCAB, 128),
                 ("paper-400m", GPT2_VOCAB, 16)]
    return [{"preset": p, "vocab": v, "batch": b, "layout": layout}
            for p, v, b in sizes for layout in ("baseline", "dct_attn")]


def measure(case: dict, device: str, seq_len: int, steps: int, repeats: int, threads: int, compile_: bool,
            execution: str) -> dict:
    sets = [f"data.seq_len={seq_len}", f"train.batch_size={case['batch']}", "train.warmup_steps=1",
            f"model.execution={execution}", f"train.device={device}", f"train.num_threads={threads}", "train.max_steps=1000000",
            f"train.compile={'true' if compile_ else 'false'}"]
    cfg = resolve("text", case["preset"], case["layout"], sets=sets)
    n_windows = case["batch"] * (steps + 3) * repeats
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, case["vocab"], n_windows * seq_len + 1).astype(np.int64)
    data = TaskData("lm", LMWindows(tokens, seq_len), LMWindows(tokens[: seq_len * 4], seq_len), None,
                    vocab_size=case["vocab"])
    finalize_model_config(cfg, data)
    info = DistInfo()
    tune_cpu_allocator(device)  # as the command line does
    with run_settings(cfg, info) as dev, tempfile.TemporaryDirectory() as tmp:
        threads_used = torch.get_num_threads()
        trainer = Trainer(cfg, tmp, data, dist_info=info, quiet=True, device=dev)
        for _ in range(3):  # warm-up (allocator, kernels, compile)
            trainer.train_step()
        rates = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            rates.append(steps * case["batch"] * seq_len / (time.perf_counter() - start))
        params = trainer.params
    return {**case, "device": str(dev), "precision": trainer.precision, "threads": threads_used,
            "seq_len": seq_len, "params": params["total"], "non_embedding_params": params["non_embedding"],
            "tokens_per_s": statistics.median(rates), "tokens_per_s_min": min(rates), "tokens_per_s_max": max(rates)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=0, help="timed steps per repeat (default: 5 on CPU, 20 on GPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--execution", default="sparse", choices=("sparse", "dense"), help="how routed layers execute")
    parser.add_argument("--only", default="", help="comma-separated presets to run (default: all)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    steps = args.steps or (5 if args.device == "cpu" else 20)
    rows = []
    selected = [c for c in cases(args.device) if not args.only or c["preset"] in args.only.split(",")]
    print(f"training throughput, {args.device}, {args.execution} execution, context {args.seq_len}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPU core(s)" + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    print("| preset | vocab | layout | batch | params | tokens/s (median) | range |")
    print("|---|---|---|---|---|---|---|")
    for case in selected:
        r = measure(case, args.device, args.seq_len, steps, args.repeats, args.threads, args.compile, args.execution)
        rows.append(r)
        print(f"| {r['preset']} | {r['vocab']} | {r['layout']} | {r['batch']} | {r['params'] / 1e6:.2f}M | "
              f"{r['tokens_per_s']:,.0f} | {r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f} |", flush=True)
    for i in range(0, len(rows) - 1, 2):
        base, chiar = rows[i], rows[i + 1]
        print(f"{base['preset']} vocab {base['vocab']}: dct_attn / baseline = "
              f"{chiar['tokens_per_s'] / base['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
