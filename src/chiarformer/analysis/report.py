"""`chiar report`: a markdown table of runs, figures, and routing-collapse flags.

Reads run folders only (config.yaml, metrics.jsonl, results.json, and, for the entropy
histograms, the best checkpoint plus the run's validation data). Figures are PNG files written
with matplotlib's headless Agg backend:

- training_curves.png          train loss (lines) and validation loss (dots) against tokens seen
- op_usage_<run>.png           per routed layer, each operator's share of tokens over training
                               (from metrics.jsonl op_share; collapse shows as a line at 0)
- entropy_<run>.png            per layer, the histogram of the spectral entropy its router sees on
                               validation data, stacked by the operator chosen, with tau lines
- meta_gate.png                the MetaRouter gate g over training (runs that have one)
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ChiarConfig, gaussian_entropy
from ..errors import UserError
from ..operators import ATTN, DCT, RBF, Op, layer_letters
from ..train.metrics import format_metrics, read_metrics
from ..train.runs import load_run
from . import common
from .collapse import Collapse, detect_collapse, tail_window, train_records


@dataclass
class RunSummary:
    run_dir: Path
    name: str
    config: dict
    model: ChiarConfig | None
    metrics: list[dict]
    results: dict | None
    collapses: list[Collapse] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.results and self.results.get("kind"):
            return self.results["kind"]
        evals = [r for r in self.metrics if r.get("kind") == "eval"]
        if any(r.get("ppl") is not None for r in evals + self.metrics):
            return "lm"
        return "cls" if any(r.get("accuracy") is not None for r in evals) else "lm"

    @property
    def routed(self) -> list[int]:
        return self.model.routed_layers if self.model is not None else []


def summarize_run(run_dir: str | Path, threshold: float = 0.01, window: float = 0.2) -> RunSummary:
    run_dir = Path(run_dir)
    config = common.read_run_config(run_dir)
    model = common.model_config_of(config)
    metrics = read_metrics(run_dir)
    results = common.read_json(run_dir / "results.json")
    summary = RunSummary(run_dir, run_dir.name, config, model, metrics, results)
    summary.collapses = detect_collapse(metrics, model.layer_ops if model else None, threshold, window)
    return summary


# --------------------------------------------------------------------------- table
def _si(x) -> str:
    if x is None:
        return "-"
    x = float(x)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _protocol_text(s: RunSummary) -> str:
    proto = (s.results or {}).get("protocol")
    if not proto:
        evals = [r for r in s.metrics if r.get("kind") == "eval" and r.get("protocol")]
        proto = evals[-1]["protocol"] if evals else {}
    data = s.config.get("data") or {}
    parts = []
    tok = proto.get("tokenizer") or data.get("tokenizer")
    if tok:
        parts.append(str(tok))
    ctx = proto.get("context") or data.get("seq_len")
    if ctx:
        parts.append(f"ctx {ctx}")
    if proto.get("stride"):
        parts.append(f"stride {proto['stride']}")
    if proto.get("proxy"):
        parts.append("proxy data, not the official protocol")
    return "; ".join(parts) or "-"


def _model_text(s: RunSummary) -> str:
    m = s.model
    if m is None:
        return "-"
    text = m.layout
    if m.routed_layers:
        text += f" / {m.routing}"
    extras = []
    if m.execution != "sparse":
        extras.append(m.execution)
    if m.meta_router != "none":
        extras.append(f"meta {m.meta_router}")
    if m.norm != "post":
        extras.append(f"{m.norm}-LN")
    preset = s.config.get("preset") or ""
    size = f"{preset}: " if preset else ""
    size += f"d{m.d_model} L{m.n_layers}"
    return f"{text} ({size}{', ' + ', '.join(extras) if extras else ''})"


def attention_shares(s: RunSummary) -> tuple[list[float] | None, str]:
    """Attention share per layer: validation of the best checkpoint, else the end of training."""
    best = ((s.results or {}).get("best") or {}).get("val") or {}
    if best.get("op_share"):
        return [row[ATTN] for row in best["op_share"]], "val"
    evals = [r for r in s.metrics if r.get("kind") == "eval" and r.get("split") == "val" and r.get("op_share")]
    if evals:
        return [row[ATTN] for row in evals[-1]["op_share"]], "val"
    rows = train_records(s.metrics)
    if rows:
        tail = tail_window(rows)
        n = len(tail[-1]["op_share"])
        return [float(np.mean([r["op_share"][i][ATTN] for r in tail])) for i in range(n)], "train"
    return None, ""


def _shares_text(s: RunSummary) -> str:
    shares, where = attention_shares(s)
    if shares is None:
        return "-"
    routed = set(s.routed)
    cells = []
    for i, v in enumerate(shares):
        text = f"{v:.2f}"
        cells.append(f"**{text}**" if i in routed else text)
    text = " ".join(cells) + f" ({where})"
    calib = common.read_json(s.run_dir / "calibration.json")
    if calib and calib.get("layers"):
        got = " ".join(f"{(row.get('achieved') or {}).get('attn', 0.0):.2f}" for row in calib["layers"])
        text += f"; after `calibrate --method {calib.get('method')}`: {got}"
    return text


def _last(records: list[dict], key: str):
    for r in reversed(records):
        if r.get(key) is not None:
            return r[key]
    return None


def markdown_table(summaries: list[RunSummary]) -> str:
    header = ["run", "task", "model", "params (non-emb.)", "protocol", "val (best)", "test", "tokens seen",
              "tokens/s", "attention share per layer"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        r = s.results or {}
        params = r.get("params") or {}
        best = (r.get("best") or {})
        val = format_metrics(best.get("val"), s.kind)
        if best.get("step") is not None and val != "-":
            val += f" @ step {best['step']}"
        if not best:
            evals = [e for e in s.metrics if e.get("kind") == "eval" and e.get("split") == "val"]
            val = format_metrics(evals[-1], s.kind) + " (last eval)" if evals else "-"
        test = format_metrics(r.get("test"), s.kind)
        tokens = r.get("tokens_seen", _last([m for m in s.metrics if m.get("kind") == "train"], "tokens"))
        tps = r.get("tokens_per_s")
        if tps is None:
            speeds = [m["tokens_per_s"] for m in s.metrics if m.get("kind") == "train" and m.get("tokens_per_s")]
            tps = float(np.median(speeds)) if speeds else None
        row = [
            s.name,
            str(s.config.get("task", r.get("task", "-"))),
            _model_text(s),
            f"{_si(params.get('total'))} ({_si(params.get('non_embedding'))})" if params else "-",
            _protocol_text(s),
            val,
            test,
            _si(tokens),
            _si(tps),
            _shares_text(s),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def collapse_section(summaries: list[RunSummary], threshold: float = 0.01, window: float = 0.2) -> str:
    lines = [
        f"An operator of a routed layer is flagged when its share of tokens stays under {100 * threshold:g}% in every "
        f"logged training step of the last {100 * window:g}% of training (metrics.jsonl `op_share`).",
        "",
    ]
    any_routed = False
    for s in summaries:
        if not s.routed:
            continue
        any_routed = True
        if not train_records(s.metrics):
            lines.append(f"- **{s.name}**: no op_share logged, cannot check")
        elif s.collapses:
            for c in s.collapses:
                lines.append(f"- **{s.name}**: COLLAPSE at {c.describe()}")
        else:
            lines.append(f"- **{s.name}**: no collapse")
    if not any_routed:
        lines.append("- no run has a routed layer")
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "run"


def plot_training_curves(summaries: list[RunSummary], path: Path) -> Path | None:
    fig = training_curves_figure(summaries)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def training_curves_figure(summaries: list[RunSummary]):
    """Loss against tokens seen (all runs); validation accuracy of classification runs beside it."""
    plt = _plt()
    has_acc = any(s.kind == "cls" for s in summaries)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 7, 4.2), squeeze=False)
    ax = axes[0][0]
    drawn = False
    for k, s in enumerate(summaries):
        color = f"C{k % 10}"
        train = [r for r in s.metrics if r.get("kind") == "train" and r.get("loss") is not None]
        val = [r for r in s.metrics if r.get("kind") == "eval" and r.get("split") == "val" and r.get("loss") is not None]
        x_of = _tokens_at_step(s.metrics)
        if train:
            ax.plot([r.get("tokens", r["step"]) for r in train], [r["loss"] for r in train], color=color, lw=1.2,
                    label=f"{s.name} train")
            drawn = True
        if val:
            ax.plot([x_of(r["step"]) for r in val], [r["loss"] for r in val], "o--", color=color, ms=4, lw=0.8,
                    label=f"{s.name} val")
            drawn = True
        if has_acc and s.kind == "cls":  # an LM's next-token accuracy is another quantity: not on this axis
            acc = [r for r in val if r.get("accuracy") is not None]
            if acc:
                axes[0][1].plot([x_of(r["step"]) for r in acc], [r["accuracy"] for r in acc], "o-", color=color,
                                ms=4, label=s.name)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title("training curves")
    ax.legend(fontsize=7)
    if has_acc:
        axes[0][1].set_xlabel("tokens seen")
        axes[0][1].set_ylabel("classification accuracy (validation)")
        axes[0][1].set_title("classification runs")
        axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _tokens_at_step(metrics: list[dict]):
    """step -> tokens seen, interpolated from the train records (steps if none)."""
    train = sorted((r["step"], r["tokens"]) for r in metrics if r.get("kind") == "train" and r.get("tokens") is not None)
    if not train:
        return lambda step: step
    steps = np.array([t[0] for t in train], dtype=float)
    toks = np.array([t[1] for t in train], dtype=float)
    per_step = toks[-1] / steps[-1] if steps[-1] else 1.0

    def at(step):
        if step > steps[-1] or step < steps[0]:
            return step * per_step
        return float(np.interp(step, steps, toks))

    return at


def plot_op_usage(s: RunSummary, path: Path) -> Path | None:
    rows = train_records(s.metrics)
    if not rows or not s.routed or s.model is None:
        return None
    plt = _plt()
    steps = [r["step"] for r in rows]
    routed = s.routed
    if len(routed) <= 8:
        cols = min(4, len(routed))
        nrows = math.ceil(len(routed) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.6 * nrows), squeeze=False, sharey=True)
        for k, i in enumerate(routed):
            ax = axes[k // cols][k % cols]
            for op in s.model.layer_ops[i]:
                ax.plot(steps, [r["op_share"][i][op] for r in rows], color=common.OP_COLORS[op], label=Op(op).label)
            ax.axhline(0.01, color="grey", lw=0.6, ls=":")
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"layer {i + 1}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            if any(c.layer == i for c in s.collapses):
                ax.set_title(f"layer {i + 1}: COLLAPSE", fontsize=9, color="red")
        for k in range(len(routed), nrows * cols):
            axes[k // cols][k % cols].axis("off")
        axes[0][0].set_ylabel("share of tokens")
        axes[0][0].legend(fontsize=7)
    else:  # many layers: one heat map per operator (layers x steps)
        ops = [op for op in (DCT, ATTN, RBF) if any(op in s.model.layer_ops[i] for i in routed)]
        fig, axes = plt.subplots(1, len(ops), figsize=(5 * len(ops), 0.18 * len(routed) + 2), squeeze=False)
        for k, op in enumerate(ops):
            grid = np.array([[r["op_share"][i][op] for r in rows] for i in routed])
            im = axes[0][k].imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis",
                                   extent=(steps[0], steps[-1], len(routed) - 0.5, -0.5))
            axes[0][k].set_yticks(range(len(routed)), [str(i + 1) for i in routed], fontsize=6)
            axes[0][k].set_title(f"{Op(op).label} share", fontsize=9)
            axes[0][k].set_xlabel("step")
            axes[0][k].set_ylabel("layer")
            fig.colorbar(im, ax=axes[0][k])
    fig.suptitle(f"{s.name}: operator usage per routed layer over training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_entropy(s: RunSummary, stats: common.RoutingStats, cfg: ChiarConfig, path: Path) -> Path:
    plt = _plt()
    n_layers = len(stats.entropy)
    layers = list(range(n_layers)) if n_layers <= 8 else (cfg.routed_layers or list(range(n_layers)))
    if len(layers) > 12:  # an even sample of them
        layers = [layers[k] for k in sorted(set(np.linspace(0, len(layers) - 1, 12).round().astype(int).tolist()))]
    cols = min(4, len(layers))
    nrows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 2.8 * nrows), squeeze=False)
    gauss = gaussian_entropy(cfg.d_model)
    for k, i in enumerate(layers):
        ax = axes[k // cols][k % cols]
        h, ops = stats.entropy[i], stats.ops[i]
        lo, hi = float(np.min(h)), float(np.max(h))
        if hi - lo < 1e-6:
            lo, hi = lo - 0.005, hi + 0.005
        bins = np.linspace(lo, hi, 41)
        present = [op for op in (DCT, RBF, ATTN) if np.any(ops == op)]
        ax.hist([h[ops == op] for op in present], bins=bins, stacked=True,
                color=[common.OP_COLORS[op] for op in present], label=[Op(op).label for op in present])
        if i in cfg.routed_layers and cfg.routing == "threshold":
            for t in cfg.layer_taus(i):
                ax.axvline(t, color="black", ls="--", lw=1)
        if lo <= gauss <= hi:
            ax.axvline(gauss, color="grey", ls=":", lw=1)
        kind = "routed" if i in cfg.routed_layers else layer_letters(cfg.layer_ops[i])
        ax.set_title(f"layer {i + 1} ({kind})", fontsize=9)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=7)
    for k in range(len(layers), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"{s.name}: spectral entropy H seen by each layer's router (validation); "
                 "dashed: tau, dotted: Gaussian-vector H", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_meta_gate(summaries: list[RunSummary], path: Path) -> Path | None:
    series = []
    for s in summaries:
        rows = [r for r in s.metrics if r.get("kind") == "train" and r.get("meta_gate") is not None]
        if rows:
            series.append((s.name, [r["step"] for r in rows], [r["meta_gate"] for r in rows]))
    if not series:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for name, steps, gates in series:
        ax.plot(steps, gates, label=name)
    ax.axhline(0.22, color="grey", ls=":", lw=1, label="paper: ~0.22 at 400M")
    ax.set_ylim(0, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("gate g (batch mean)")
    ax.set_title("MetaRouter gate over training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- report
def build_report(
    run_dirs: list[str | Path],
    out: str | Path | None = None,
    figures_dir: str | Path | None = None,
    entropy: bool = True,
    max_batches: int = 4,
    batch_size: int = 8,
    threshold: float = 0.01,
    window: float = 0.2,
    device: str = "cpu",
) -> str:
    """Markdown report of the runs; figures go to figures_dir (default: <out stem>_figures next to out)."""
    if not run_dirs:
        raise UserError("give at least one run folder")
    summaries = [summarize_run(r, threshold, window) for r in run_dirs]
    names = [s.name for s in summaries]
    if len(set(names)) != len(names):  # same folder name under different parents
        for s in summaries:
            s.name = str(s.run_dir)
    if figures_dir is None and out is not None:
        figures_dir = Path(out).parent / f"{Path(out).stem}_figures"
    md = [
        "# CHIAR-Former runs",
        "",
        f"Generated by `chiar report` from {len(summaries)} run folder(s). Validation metrics are those of the "
        "checkpoint selected on validation; test metrics are computed once, on that checkpoint. "
        "Attention share per layer: share of tokens that took attention in each layer "
        "(routed layers in bold; '(val)': validation pass of the best checkpoint, '(train)': mean over the last "
        "20% of training). ppl is per token of the run's tokenizer; bpb (bits per byte) compares across tokenizers.",
        "",
        markdown_table(summaries),
        "",
        "## Routing collapse",
        "",
        collapse_section(summaries, threshold, window),
        "",
    ]
    if figures_dir is None:
        md += ["_Figures not written: pass `--out FILE.md` or `--figures DIR`._", ""]
    else:
        md += _figures(summaries, Path(figures_dir), out, entropy, max_batches, batch_size, device)
    text = "\n".join(md).rstrip() + "\n"
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
    return text


def _figures(summaries, fig_dir: Path, out, entropy: bool, max_batches: int, batch_size: int, device: str) -> list[str]:
    fig_dir.mkdir(parents=True, exist_ok=True)
    base = Path(out).parent if out is not None else Path.cwd()

    def link(path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()

    md = ["## Figures", ""]
    curves = plot_training_curves(summaries, fig_dir / "training_curves.png")
    md += ["### Training curves", ""]
    md += [f"![training curves]({link(curves)})", ""] if curves else ["_no training records_", ""]

    md += ["### Operator usage per layer over training", ""]
    usage = [(s, plot_op_usage(s, fig_dir / f"op_usage_{_slug(s.name)}.png")) for s in summaries]
    usage = [(s, p) for s, p in usage if p is not None]
    md += [f"![operator usage, {s.name}]({link(p)})" for s, p in usage] or ["_no run with routed layers and op_share records_"]
    md.append("")

    md += ["### Entropy per layer (validation), with tau", ""]
    if not entropy:
        md += ["_skipped (--no-entropy)_", ""]
    else:
        for s in summaries:
            try:
                run = load_run(s.run_dir, "best", device=device)
                batches = common.validation_batches(run, "val", batch_size, max_batches)
                stats = common.collect_routing(run.model, batches)
                p = plot_entropy(s, stats, run.model.cfg, fig_dir / f"entropy_{_slug(s.name)}.png")
                md.append(f"![entropy histograms, {s.name}]({link(p)})")
            except (UserError, OSError) as exc:  # no checkpoint yet, data not on this machine, ...
                md.append(f"- {s.name}: entropy histograms skipped ({' '.join(str(exc).split())})")
        md.append("")

    gate = plot_meta_gate(summaries, fig_dir / "meta_gate.png")
    md += ["### MetaRouter gate over training", ""]
    md += [f"![MetaRouter gate]({link(gate)})", ""] if gate else ["_no run logged a MetaRouter gate_", ""]
    return md
