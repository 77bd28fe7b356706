"""Metrics records of a run: reading runs/NAME/metrics.jsonl and the one way they are printed.

Every tool that shows an evaluation (the training loop's progress lines, `chiar train`'s summary,
`chiar eval`, `chiar report`) formats it with `format_metrics`.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

_FORMATS = {"loss": ".4f", "ppl": ".2f", "bpb": ".4f", "accuracy": ".4f"}


def format_metrics(metrics: dict | None, kind: str | None) -> str:
    """One line for an evaluation record: loss, then ppl and bpb (LM) or accuracy (classification);
    fields the record lacks are left out, and an empty record is "-"."""
    if not metrics:
        return "-"
    names = ("loss", "ppl", "bpb") if kind == "lm" or metrics.get("ppl") is not None else ("loss", "accuracy")
    parts = [f"{name} {metrics[name]:{_FORMATS[name]}}" for name in names if metrics.get(name) is not None]
    return "  ".join(parts) or "-"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl records (unreadable lines skipped), [] when the file is missing."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def median_tokens_per_s(run_dir: str | Path) -> float | None:
    """Median training tokens/s over the run's logged windows (metrics.jsonl): robust to a slow
    stretch or a pause, unlike the whole run's mean."""
    rates = [rec["tokens_per_s"] for rec in read_metrics(run_dir) if rec.get("kind") == "train" and rec.get("tokens_per_s")]
    return statistics.median(rates) if rates else None
