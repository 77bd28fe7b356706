"""`chiar quickstart`: the full-attention baseline against CHIAR-Former on CPU-sized ListOps.

No downloads and no input files: ListOps expressions are generated with the LRA procedure at
CPU-friendly sizes (by default lengths 30-150, depth <= 4, bracket-preserving tokens, 22-token
vocabulary; at lengths 50-250 and depth <= 6 neither model beats the majority class within a few
minutes of CPU training, measured: val accuracy 0.19-0.20 after 1000 steps),
both models are trained with the regular engine (same data, seed, steps and optimiser), and a
side-by-side table reports accuracy (validation, and test once on the best-validation
checkpoint), parameters, training tokens/s (median over logged windows, flagged when the machine
is loaded), the attention share per layer and the
analytic forward multiply-adds (chiarformer.flops) at the mean test length.

CHIAR-Former here is layout dct_attn with routing="topk", attn_fraction=0.25: in each routed
layer the quarter of the tokens with the highest spectral entropy go to attention and the rest
to the DCT, so it really routes (a fixed share, whatever the entropy scale; threshold routing
at the default Gaussian tau would send an arbitrary share).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import flops
from .errors import UserError
from .operators import ATTN, layer_letters
from .train import resolve, train
from .train.metrics import median_tokens_per_s
from .train.task_data import load_task_data

# Sized to finish both models in about 2 minutes on 2 CPU cores (see docs/training.md).
DEFAULT_STEPS = 1000
DEFAULT_TRAIN = 16000
DEFAULT_EVAL = 500  # validation and test expressions each
DEFAULT_LENGTHS = (30, 150)
DEFAULT_DEPTH = 4
MODELS = (
    ("baseline", "baseline", []),
    ("CHIAR-Former", "dct_attn", ["model.routing=topk", "model.attn_fraction=0.25"]),
)


def quickstart_sets(steps: int, n_train: int, seed: int, threads: int, cache_dir: Path,
                    lengths: tuple[int, int] = DEFAULT_LENGTHS, depth: int = DEFAULT_DEPTH,
                    n_eval: int = DEFAULT_EVAL) -> list[str]:
    return [
        # ListOps, generated with the LRA rules at CPU size
        f"data.listops_train={n_train}", f"data.listops_val={n_eval}", f"data.listops_test={n_eval}",
        f"data.listops_min_length={lengths[0]}", f"data.listops_max_length={lengths[1]}",
        f"data.listops_max_depth={depth}", "data.listops_tokens=brackets", f"data.seq_len={lengths[1]}",
        f"data.data_seed={seed}", f"data.cache_dir={cache_dir}", f"data.workers={1 if n_train <= 4000 else 0}",
        # the tiny preset, bidirectional classifier (LRA style), no dropout
        "model.d_model=64", "model.n_layers=4", "model.n_heads=4", "model.dropout=0.0", "model.bidirectional=true",
        # optimisation
        f"train.max_steps={steps}", "train.batch_size=32", "train.bucket_batches=16", "train.lr=1e-3", "train.min_lr=1e-5",
        f"train.warmup_steps={max(1, steps // 10)}", f"train.eval_every={max(1, steps // 4)}",
        f"train.log_every={max(1, steps // 40)}", f"train.seed={seed}", f"train.num_threads={threads}",
        "train.device=cpu",
    ]


def run_quickstart(steps: int | None = None, seed: int = 0, out: str | None = None, threads: int = 0,
                   quiet: bool = False, n_train: int | None = None, lengths: tuple[int, int] | None = None,
                   depth: int | None = None, n_eval: int | None = None) -> dict:

    steps = DEFAULT_STEPS if steps is None else steps
    n_train = DEFAULT_TRAIN if n_train is None else n_train
    n_eval = DEFAULT_EVAL if n_eval is None else n_eval
    if steps < 1:
        raise UserError(f"--steps must be positive, got {steps}")
    if n_train < 32:
        raise UserError(f"--examples must be at least 32, got {n_train}")
    if n_eval < 10:
        raise UserError(f"--n-eval must be at least 10, got {n_eval}")
    lengths = tuple(lengths or DEFAULT_LENGTHS)
    depth = depth or DEFAULT_DEPTH
    tmp = None
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="chiar-quickstart-")
        root = Path(tmp.name)
    else:
        root = Path(out)
        for name, _, _ in MODELS:
            if (root / _folder(name)).exists():
                raise UserError(f"{root / _folder(name)} already exists; choose another --out")
    started = time.perf_counter()
    try:
        sets = quickstart_sets(steps, n_train, seed, threads, root / "cache", lengths, depth, n_eval)
        if not quiet:
            print(f"chiar quickstart: ListOps ({n_train} generated training expressions), {steps} steps per model, "
                  f"CPU, {threads or os.cpu_count()} thread(s)", file=sys.stderr, flush=True)
        rows, data, loads = {}, None, []
        for name, layout, extra in MODELS:
            cfg = resolve("listops", "tiny", layout, sets=sets + extra)
            if data is None:  # both models read the same data
                data = load_task_data(cfg, quiet=quiet)
            if not quiet:
                print(f"--- training {name} ({layout}{', ' + cfg.model.routing if cfg.model.routed_layers else ''})",
                      file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            loads.append(machine_load())
            results = train(cfg, root / _folder(name), quiet=quiet, data=data)
            rows[name] = {"cfg": cfg, "results": results, "wall_s": time.perf_counter() - t0,
                          "run_dir": root / _folder(name)}
        loads = [x for x in loads + [machine_load()] if x is not None]
        table = format_table(rows, data, steps, n_train, n_eval, time.perf_counter() - started, max(loads) if loads else None)
        print(table)
        if out is not None:
            (root / "quickstart.txt").write_text(table + "\n")
            print(f"\nrun folders: {', '.join(str(r['run_dir']) for r in rows.values())} "
                  f"(try: chiar report {' '.join(str(r['run_dir']) for r in rows.values())})")
        return {name: row["results"] for name, row in rows.items()}
    finally:
        if tmp is not None:
            tmp.cleanup()


def _folder(name: str) -> str:
    return "quickstart-" + name.lower().replace(" ", "-")


LOAD_MARGIN = 0.5  # load average above the core count that counts as other work


def format_table(rows: dict, data, steps: int, n_train: int, n_eval: int, total_s: float, load: float | None = None) -> str:

    names = list(rows)
    first = rows[names[0]]
    cfg0 = first["cfg"]
    mean_len, majority = _test_stats(data)
    counts = {
        name: flops.count_flops(row["cfg"].model, seq_len=mean_len, attn_fraction=_routed_shares(row["results"], row["cfg"]))
        for name, row in rows.items()
    }

    def cell(name: str, key: str) -> str:
        row = rows[name]
        r, cfg = row["results"], row["cfg"]
        if key == "routing":
            if not cfg.model.routed_layers:
                return "none (attention everywhere)"
            if cfg.model.routing == "topk":
                return f"topk, attn_fraction {cfg.model.attn_fraction:g}"
            return cfg.model.routing
        if key == "layout":
            return " ".join(layer_letters(ops) for ops in cfg.model.layer_ops)
        if key == "params":
            return f"{r['params']['total']:,}"
        if key == "val":
            best = r["best"]
            return f"{best['val']['accuracy']:.3f} (step {best['step']})"
        if key == "test":
            return f"{r['test']['accuracy']:.3f}"
        if key == "tok_s":
            rate = median_tokens_per_s(row["run_dir"])
            return f"{rate:,.0f}" if rate else "-"
        if key == "attn":
            return " ".join(f"{layer[ATTN]:.2f}" for layer in r["test"]["op_share"])
        if key == "flops":
            return f"{counts[name].forward_per_token / 1e6:.3f}M"
        if key == "wall":
            return f"{row['wall_s']:.0f} s"
        raise KeyError(key)

    base_flops = counts[names[0]].forward_per_token
    labels = [
        ("layout (per layer)", "layout"),
        ("routing", "routing"),
        ("parameters", "params"),
        ("val accuracy (best)", "val"),
        ("test accuracy (once, best ckpt)", "test"),
        ("train tokens/s (median, noisy)", "tok_s"),
        ("attention share per layer", "attn"),
        (f"forward MACs/token (T={mean_len})", "flops"),
        ("wall time", "wall"),
    ]
    width = max(len(label) for label, _ in labels) + 2
    col = max(28, max(len(n) for n in names) + 2)
    values = {name: {key: cell(name, key) for _, key in labels} for name in names}
    for name in names[1:]:
        count = counts[name]
        values[name]["flops"] += f" (-{100 * (1 - count.forward_per_token / base_flops):.1f}% vs baseline)" \
            if count.forward_per_token <= base_flops else f" (+{100 * (count.forward_per_token / base_flops - 1):.1f}%)"
        col = max(col, *(len(v) + 2 for v in values[name].values()))
    proto = first["results"]["protocol"]
    gen = proto.get("generation", {})
    lines = [
        "",
        f"ListOps, generated with the LRA rules at CPU size: lengths {gen.get('min_length')}-{gen.get('max_length')}, "
        f"depth <= {gen.get('max_depth')}, bracket-preserving tokens (vocab {cfg0.model.vocab_size}); "
        f"{n_train} train / {n_eval} val / {n_eval} test; 10 classes (chance 0.10, majority {majority:.2f})",
        f"both: d_model {cfg0.model.d_model}, {cfg0.model.n_layers} layers, {cfg0.model.n_heads} heads, bidirectional, "
        f"{steps} steps x {cfg0.train.batch_size} sequences, AdamW lr {cfg0.train.lr:g}, seed {cfg0.train.seed}, CPU",
        "",
        f"{'':<{width}}" + "".join(f"{n:<{col}}" for n in names),
    ]
    for label, key in labels:
        lines.append(f"{label:<{width}}" + "".join(f"{values[n][key]:<{col}}" for n in names))
    lines += [
        "",
        "attention share: fraction of (non-padding) test tokens each layer sent to attention; "
        "MACs: chiarformer.flops, measured shares, bidirectional scores over T keys.",
        f"tokens/s: median over the logged windows of {cfg0.train.log_every} steps; it varies by 2x or more with "
        "what else the machine runs, so compare the two models only from one quiet run.",
    ]
    # The run's own threads keep the load near the core count; another busy process adds a whole unit.
    if load is not None and load > (os.cpu_count() or 1) + LOAD_MARGIN:
        lines.append(f"WARNING: the machine's load average reached {load:.1f} on {os.cpu_count()} core(s) during this "
                     "run: the tokens/s and wall times above are not a fair comparison.")
    lines.append(f"total time {total_s:.0f} s. Full-size runs: `chiar train --task listops ...` (docs/training.md).")
    return "\n".join(lines)


def machine_load() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _routed_shares(results: dict, cfg) -> list[float] | None:
    routed = cfg.model.routed_layers
    if not routed:
        return None
    share = results["test"]["op_share"]
    return [share[i][ATTN] for i in routed]


def _test_stats(data) -> tuple[int, float]:
    """(mean non-padding length, majority-class share) of the test split."""

    lengths = data.test.lengths()
    labels = np.asarray(data.test.data.labels)
    return max(1, int(round(float(lengths.mean())))), float(np.bincount(labels).max() / len(labels))
