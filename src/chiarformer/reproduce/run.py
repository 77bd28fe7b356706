"""Plan and runner of `chiar reproduce`: print the plan, run what is missing, resume what was
interrupted, and write each finished run's small record (no checkpoints) for the report.

    OUT/<scale>/<run>/                     the run folder (`chiar train --out`; checkpoints stay here)
    OUT/<scale>/data/imdb-text/            E2's review-text subset (written once, seeded)
    RESULTS/<scale>/<run>.json             the committable record of a finished run
    RESULTS/<scale>/E7-calibration-sN.json the calibration analysis over E1's runs of seed N
"""

from __future__ import annotations

import functools
import json
import math
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..analysis.calibrate import calibrate_run
from ..atomic import atomic_write_json, atomic_write_text
from ..data import load_imdb
from ..errors import UserError
from ..flops import compare
from ..operators import ATTN
from ..train.loop import train
from ..train.metrics import median_tokens_per_s, read_metrics
from ..train.results import package_version
from ..train.run_config import RunConfig, resolve
from ..train.task_data import load_task_data
from .matrix import CLAIMS, E2_SUBSET, Analysis, Matrix, RunSpec, build_matrix, select

# Training tokens/s per model family used by the plan until a finished run of the family has
# measured its own. "lm": paper-17m LM at T 256 on 2 idle cores (measured, 1,400-1,800); the
# others are guesses from its cost split (three_op adds the RBF operator; classifiers have no
# 50257-way head). Rough: throughput depends on the load of the machine.
TOKENS_PER_S = {"smoke": {"lm": 20_000, "lm-three_op": 20_000, "cls": 20_000},
                "cpu": {"lm": 1_600, "lm-three_op": 1_300, "cls": 6_000},
                # paper scale: an assumed single modern GPU (bf16/fp16) for the plan; not measured here
                "paper": {"lm": 150_000, "lm-three_op": 120_000, "cls": 400_000}}
EVAL_SPEEDUP = 3.0  # a forward pass costs about a third of a training step per token


def record_path(results: Path, scale: str, name: str) -> Path:
    return results / scale / f"{name}.json"


def _sets(spec: RunSpec, data_dir: Path) -> list[str]:
    return [s.replace("{data}", str(data_dir)) for s in spec.all_sets()]


def run_command(spec: RunSpec, run_dir: Path, data_dir: Path) -> list[str]:
    """The exact `chiar train` command of one run (what the runner executes in-process)."""
    return ["chiar", "train", "--task", spec.task, "--preset", spec.preset, "--model", spec.layout,
            *[x for s in _sets(spec, data_dir) for x in ("--set", s)], "--out", str(run_dir)]


def run_config(spec: RunSpec, data_dir: Path) -> RunConfig:
    return resolve(spec.task, spec.preset, spec.layout, None, _sets(spec, data_dir))


# --------------------------------------------------------------------------- the plan
def measured_rates(results: Path, scale: str) -> dict[str, float]:
    """Mean measured training tokens/s per family over the finished records of this scale."""
    rates: dict[str, list[float]] = {}
    for path in sorted((results / scale).glob("*.json")):
        record = _read_json(path)
        if record and record.get("family") and record.get("tokens_per_s"):
            rates.setdefault(record["family"], []).append(float(record["tokens_per_s"]))
    return {k: float(np.mean(v)) for k, v in rates.items()}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def estimate_s(spec: RunSpec, scale: str, rates: dict[str, float]) -> float:
    rate = rates.get(spec.family) or TOKENS_PER_S[scale][spec.family]
    return (spec.train_tokens + spec.eval_tokens / EVAL_SPEEDUP) / rate


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status_of(spec: RunSpec, out: Path, results: Path, scale: str) -> str:
    """The record alone marks a run done: it is what gets committed, and run folders (checkpoints)
    do not outlive the machine or session that trained them."""
    if record_path(results, scale, spec.name).is_file():
        return "done"
    if (out / scale / spec.name / "results.json").is_file():
        return "record"  # finished, record missing: written without training
    if (out / scale / spec.name / "checkpoints" / "last" / "state.json").is_file():
        return "resume"
    return "todo"


def plan_text(matrix: Matrix, out: Path, results: Path) -> str:
    scale = matrix.scale
    rates = measured_rates(results, scale)
    where = "GPU (assumed rate)" if scale == "paper" else "2 CPU cores, rough"
    lines = [f"chiar reproduce --scale {scale}: {len(matrix.runs)} run(s), {len(matrix.analyses)} analysis step(s); "
             f"run folders under {out / scale}, records under {results / scale}"]
    for note in matrix.notes.get("all", []):
        lines.append(f"  note: {note}")
    total, todo = 0.0, 0.0
    for exp in CLAIMS:
        runs = [r for r in matrix.runs if r.experiment == exp]
        if not runs and exp not in ("E7", "E8"):
            continue
        lines.append(f"{exp} {CLAIMS[exp].title}")
        for note in matrix.notes.get(exp, []):
            lines.append(f"  why: {note}")
        for r in runs:
            state = status_of(r, out, results, scale)
            est = estimate_s(r, scale, rates)
            total += est
            todo += est if state in ("todo", "resume") else 0.0
            label = {"done": "done", "record": "finished (record to write)",
                     "resume": "interrupted: resumes", "todo": "to run"}[state]
            lines.append(f"  {r.name:<34} {r.task:<16} {r.layout:<9} ~{r.train_tokens / 1e6:.2f}M tok  "
                         f"est {_duration(est):>7}  [{label}]")
        for a in matrix.analyses:
            if a.experiment == exp:
                lines.append(f"  {a.name:<34} analysis of {', '.join(a.needs)}")
        if exp == "E8":
            lines.append("  (E8 is computed from every run's record: analytic FLOPs at its achieved shares, its tokens/s)")
    basis = ", ".join(f"{k} {v:,.0f} tok/s" for k, v in {**TOKENS_PER_S[scale], **rates}.items())
    lines.append(f"estimated time: {_duration(total)} in all, {_duration(todo)} still to run ({where}; {basis}; "
                 "measured rates replace assumed ones as runs finish)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- data preparation
def prepare_imdb_text(folder: Path, scale: str, data_dir: str | None = None) -> None:
    """E2's corpus: seeded-random subsets of IMDB train (train, val) and test review text, one
    file per split, reviews separated by a blank line. Written once; the same seed, the same files."""

    if (folder / "test.txt").is_file():
        return
    n_train, n_val, n_test = E2_SUBSET[scale]
    texts, _, _ = load_imdb("train", data_dir=data_dir)
    order = np.random.default_rng(16).permutation(len(texts))
    if len(texts) < n_train + n_val:
        raise UserError(f"IMDB train has {len(texts)} reviews; E2 needs {n_train + n_val}")
    test, _, _ = load_imdb("test", data_dir=data_dir)
    test_order = np.random.default_rng(17).permutation(len(test))[:n_test]
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train.txt": [texts[i] for i in order[:n_train]], "val.txt": [texts[i] for i in order[n_train:n_train + n_val]],
              "test.txt": [test[i] for i in test_order]}
    for name, reviews in splits.items():  # test.txt last: its presence means all three are complete
        atomic_write_text(folder / name, "\n\n".join(r.strip() for r in reviews) + "\n")


# --------------------------------------------------------------------------- records
def _curves(metrics: list[dict]) -> dict:
    train_lines = [m for m in metrics if m.get("kind") == "train"]
    evals = [m for m in metrics if m.get("kind") == "eval" and m.get("split") == "val"]
    return {
        "train": [{"step": m["step"], "tokens": m.get("tokens"), "loss": m.get("loss"), "op_share": m.get("op_share"),
                   "meta_gate": m.get("meta_gate")} for m in train_lines],
        "val": [{"step": m["step"], "loss": m.get("loss"), "ppl": m.get("ppl"), "accuracy": m.get("accuracy"),
                 "op_share": m.get("op_share")} for m in evals],
    }


def unigram_ppl(cfg: RunConfig) -> float | None:
    """PPL of the training split's add-one unigram distribution on the test split (LM only):
    the bar every model must clear by far to show it learned."""
    data = load_task_data(cfg, quiet=True)
    if data.kind != "lm":
        return None
    train_tokens, test_tokens = np.asarray(data.train.tokens), np.asarray(data.test.tokens)
    counts = np.bincount(train_tokens.astype(np.int64), minlength=data.vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(math.exp(-logp[test_tokens.astype(np.int64)].mean()))


def flops_at(cfg: RunConfig, shares: list[float] | None) -> dict | None:
    """Analytic forward MACs vs the baseline of the same size at the run's achieved shares."""

    model = cfg.model
    if not model.routed_layers or shares is None:
        return None
    cmp = compare(model, cfg.data.seq_len, attn_fraction=shares)
    return {"attention_reduction": cmp.attention_reduction, "total_reduction": cmp.total_reduction,
            "paper_attention_reduction": cmp.paper_attention_reduction, "attn_shares": shares,
            "convention": "analytic MACs, causal keys, DCT as executed (matmul), at the test split's shares"}


@functools.cache
def code_version() -> dict:
    """Which code produced a record: the git commit of the source tree (with '-dirty' when it had
    uncommitted changes) and the package and torch versions, read once when the runner starts
    (the code it runs is the code it imported then)."""
    src = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=src, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."], cwd=src.parent,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return {"commit": (commit + ("-dirty" if dirty else "")) or None, "chiarformer": package_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def write_record(spec: RunSpec, scale: str, run_dir: Path, results_dir: Path, command: list[str]) -> dict:
    results = _read_json(run_dir / "results.json") or {}
    cfg = RunConfig.load(run_dir / "config.yaml")
    metrics = read_metrics(run_dir)
    curves = _curves(metrics)
    test = results.get("test") or {}
    op_share = test.get("op_share")
    routed = cfg.model.routed_layers
    attn = [op_share[i][ATTN] for i in routed] if op_share and routed else None
    gates = [p["meta_gate"] for p in curves["train"] if p.get("meta_gate") is not None]
    record = {
        "name": spec.name, "experiment": spec.experiment, "group": spec.group, "seed": spec.seed, "scale": scale,
        "family": spec.family, "task": spec.task, "layout": spec.layout,
        "routing": cfg.model.routing if routed else None,
        "command": shlex.join(command),
        "reproduce": f"chiar reproduce --scale {scale} --only {spec.experiment}",
        "protocol": {**(results.get("protocol") or {}), "steps": results.get("steps"),
                     "tokens_seen": results.get("tokens_seen"), "params": results.get("params"),
                     "preset": spec.preset, "selection": results.get("selection"),
                     "test": "evaluated once, on the best-validation checkpoint"},
        "best": results.get("best"), "final_val": results.get("final_val"), "test": test,
        "op_share": op_share, "attn_shares": attn,
        "meta_gate": gates[-1] if gates else None,
        "mixture": results.get("mixture"),  # mixed runs: aux tasks, extra batches, aux-LM test
        "tokens_per_s": median_tokens_per_s(run_dir), "tokens_per_s_mean": results.get("tokens_per_s"),
        "tokens_seen": results.get("tokens_seen"),
        "train_time_s": results.get("train_time_s"),
        "unigram_ppl": unigram_ppl(cfg),
        "flops": flops_at(cfg, attn),
        "curves": curves,
        "config": cfg.to_dict(),
        "code": code_version(),
    }
    path = record_path(results_dir, scale, spec.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return record


# --------------------------------------------------------------------------- E7
def calibration_analysis(a: Analysis, scale: str, out: Path, results_dir: Path) -> dict:
    """The published tau calibration (baseline's embedding entropies) vs ours, on E1's dct_attn run;
    nothing in the runs is changed (dry runs of `chiar calibrate`)."""

    base_dir, chiar_dir = (out / scale / n for n in a.needs)
    paper = calibrate_run(chiar_dir, method="paper", baseline_run=base_dir, save=False)
    ours = calibrate_run(chiar_dir, method="hidden", target_attn=0.25, save=False)
    chiar_record = _read_json(record_path(results_dir, scale, a.needs[1])) or {}
    record = {"name": a.name, "experiment": "E7", "seed": a.seed, "scale": scale,
              "command": f"chiar calibrate --run {chiar_dir} --method paper --baseline-run {base_dir} --dry-run; "
                         f"chiar calibrate --run {chiar_dir} --method hidden --target-attn 0.25 --dry-run",
              "paper": paper.to_dict(), "ours": ours.to_dict(),
              "default_tau_shares": chiar_record.get("attn_shares")}
    path = record_path(results_dir, scale, a.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return record


# --------------------------------------------------------------------------- the runner
def _say(text: str) -> None:
    print(text, flush=True)


def _summary(record: dict) -> str:
    test = record.get("test") or {}
    if test.get("ppl") is not None:
        text = f"test ppl {test['ppl']:.2f}"
    elif test.get("accuracy") is not None:
        text = f"test accuracy {test['accuracy']:.4f}"
    else:
        text = "no test metrics"
    if record.get("attn_shares"):
        text += " attn " + "/".join(f"{s:.2f}" for s in record["attn_shares"])
    if record.get("tokens_per_s"):
        text += f", {record['tokens_per_s']:,.0f} tok/s"
    return text


def in_order(matrix: Matrix) -> list[RunSpec | Analysis]:
    """The runs in matrix order, each analysis right after the last run it reads (so it runs while
    their folders exist)."""
    steps: list[RunSpec | Analysis] = list(matrix.runs)
    for a in matrix.analyses:
        after = max((i for i, r in enumerate(steps) if isinstance(r, RunSpec) and r.name in a.needs), default=len(steps) - 1)
        steps.insert(after + 1, a)
    return steps


def run_matrix(matrix: Matrix, out: Path, results_dir: Path, verbose: bool = False) -> int:
    """Run every run that is not complete, in matrix order; returns the number of runs trained."""
    scale = matrix.scale
    data_dir = out / scale / "data" / "imdb-text"
    trained = 0
    steps = in_order(matrix)
    for i, item in enumerate(steps, 1):
        position = f"[{i}/{len(steps)}]"
        if isinstance(item, Analysis):
            if record_path(results_dir, scale, item.name).is_file():
                _say(f"{position} {item.name}: done")
                continue
            missing = [n for n in item.needs if not (out / scale / n / "results.json").is_file()]
            if missing:
                gone = [n for n in missing if record_path(results_dir, scale, n).is_file()]
                why = (f"the run folders of {', '.join(gone)} are gone (only their records were kept); delete "
                       f"those records to train them again" if gone else f"waits for {', '.join(missing)}")
                _say(f"{position} {item.name}: {why}")
                continue
            _say(f"{position} {item.name}: calibrating ...")
            rec = calibration_analysis(item, scale, out, results_dir)
            shares = [lc["achieved"].get("attn") for lc in rec["paper"]["layers"]]
            _say(f"{position} {item.name}: published calibration gives attention "
                 + "/".join("-" if s is None else f"{s:.2f}" for s in shares))
            continue
        spec = item
        run_dir = out / scale / spec.name
        state = status_of(spec, out, results_dir, scale)
        if state == "done":
            _say(f"{position} {spec.name}: done")
            continue
        command = run_command(spec, run_dir, data_dir)
        if state != "record":
            if spec.prepare == "imdb-text":
                prepare_imdb_text(data_dir, scale)
            cfg = run_config(spec, data_dir)
            resume = state == "resume"
            if not resume and run_dir.exists():
                shutil.rmtree(run_dir)  # started, but interrupted before its first checkpoint: nothing to keep
            from_step = ""
            if resume:
                from_step = f" from step {_read_json(run_dir / 'checkpoints' / 'last' / 'state.json').get('step')}"
            _say(f"{position} {spec.name}: {'resuming' + from_step if resume else 'training'} ... "
                 f"({shlex.join(command)}{' --resume' if resume else ''})")
            start = time.monotonic()
            train(cfg, run_dir, resume=resume, quiet=not verbose)
            trained += 1
            took = f" in {_duration(time.monotonic() - start)}"
        else:
            took = ""
        record = write_record(spec, scale, run_dir, results_dir, command)
        _say(f"{position} {spec.name}: finished{took}: {_summary(record)}")
    return trained


def main(args) -> int:

    out, results_dir = Path(args.out), Path(args.results)
    code_version()
    matrix = select(build_matrix(args.scale, args.seeds), args.only)
    _say(plan_text(matrix, out, results_dir))
    if args.plan:
        return 0
    trained = run_matrix(matrix, out, results_dir, verbose=args.verbose)
    _say(f"reproduce --scale {args.scale}: {trained} run(s) trained; records in {results_dir / args.scale}; "
         f"`chiar reproduce --report --scale {args.scale}` writes {args.claims}")
    sys.stdout.flush()
    return 0
