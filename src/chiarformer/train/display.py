"""What a training run shows and records as it goes: the progress bar (or, off a terminal, a plain
line at least every PROGRESS_S seconds), the validation lines, and the metrics.jsonl log (one
JSON record a line; rewritten on resume so that it reads as if the run had never stopped).
Only rank 0 writes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..atomic import atomic_write_text
from ..operators import ATTN
from .metrics import format_metrics

PROGRESS_S = 10.0  # seconds between plain progress lines when there is no progress bar


class MetricsLog:
    """run_dir/metrics.jsonl: appended by rank 0, cut back to a checkpoint on resume."""

    def __init__(self, path: Path, is_main: bool):
        self.path, self.is_main = Path(path), is_main

    def append(self, record: dict) -> None:
        if self.is_main:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop the lines written after `step` and any test record (the resumed run writes them again)."""
        if not self.is_main or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if rec.get("step", 0) <= step and not (rec.get("kind") == "eval" and rec.get("split") == "test"):
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))


class Display:
    """Progress on stderr for rank 0 unless quiet: a tqdm bar on a terminal, else plain lines."""

    def __init__(self, *, show: bool, progress: bool, kind: str, routed: tuple[int, ...] | list[int]):
        self.show, self.kind, self.routed = show, kind, list(routed)
        self.progress = progress and show  # train.progress: bar or periodic lines
        self.bar = None
        self.last_line: float | None = None

    def start(self, total: int, initial: int, desc: str) -> None:
        if self.progress and sys.stderr.isatty():
            from tqdm import tqdm  # only on a terminal

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, unit="step", desc=desc)
        elif self.progress:
            self.last_line = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def say(self, text: str) -> None:
        if not self.show:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr, flush=True)

    def stepped(self, step: int, total: int, train_time: float, stats) -> None:
        """After each optimizer step: advance the bar, or print a plain line once PROGRESS_S have
        passed. stats (the step's loss * n, n, ... tensor) is read, a host sync, only when a line is due."""
        if self.bar is not None:
            self.bar.update(1)
        elif self.last_line is not None and time.monotonic() - self.last_line >= PROGRESS_S:
            self.say(f"step {step}/{total}: loss {float(stats[0] / stats[1]):.4f} (this step), {train_time:.0f} s of training")
            self.last_line = time.monotonic()

    def train_window(self, rec: dict) -> None:
        """A logged training window on the bar's postfix."""
        if self.bar is None:
            return
        tok_s = rec["tokens_per_s"]
        post = {"tok/s": f"{tok_s:,.0f}" if tok_s else "-", "loss": f"{rec['loss']:.4f}"}
        if self.kind == "lm":
            post["ppl"] = f"{rec['ppl']:.2f}"
        else:
            post["acc"] = f"{rec['accuracy']:.3f}"
        if self.routed:
            post["attn"] = self._attn(rec["op_share"])
        self.bar.set_postfix(post, refresh=False)

    def validation(self, record: dict) -> None:
        text = f"step {record['step']}: val {format_metrics(record, self.kind)}"
        if self.routed:
            text += " attn " + self._attn(record["op_share"])
        self.say(text)

    def test(self, record: dict, step: int) -> None:
        self.say(f"test (best checkpoint, step {step}): {format_metrics(record, self.kind)}")

    def _attn(self, op_share: list[list[float]]) -> str:
        return "/".join(f"{op_share[i][ATTN]:.2f}" for i in self.routed)
