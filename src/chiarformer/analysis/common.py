"""Shared pieces of the analysis tools: run folders, validation batches, routing statistics.

Run folders are the engine's: load them with chiarformer.train.runs.load_run and read their
metrics with chiarformer.train.metrics.read_metrics; this module only reads config.yaml.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from ..config import ChiarConfig
from ..errors import UserError
from ..operators import ATTN, DCT, RBF
from ..train.runs import check_run_dir
from ..train.task_data import load_task_data

OP_COLORS = {DCT: "#4C72B0", ATTN: "#DD8452", RBF: "#55A868"}  # blue, orange, green


# --------------------------------------------------------------------------- run folders
def read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None


def read_run_config(run_dir: Path) -> dict:
    """config.yaml as a dict (task, preset, model, train, data)."""
    check_run_dir(Path(run_dir))
    path = Path(run_dir) / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"cannot parse {path}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a mapping")
    return data


def model_config_of(config: dict) -> ChiarConfig | None:
    model = config.get("model")
    if not isinstance(model, dict):
        return None
    try:
        return ChiarConfig.from_dict(model)
    except (UserError, TypeError):
        return None


# --------------------------------------------------------------------------- data
@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor | None  # (B, T) bool, True on real tokens; None when all are real


def validation_batches(run, split: str = "val", batch_size: int = 8, max_batches: int = 8) -> list[Batch]:
    """Batches of the run's own `split` data (reloaded through the engine's task registry)."""
    data = load_task_data(run.run_config, quiet=True)
    dataset = {"val": data.val, "test": data.test, "train": data.train}.get(split)
    if dataset is None or len(dataset) == 0:
        raise UserError(f"task {run.run_config.task} has no {split} split to calibrate or analyse on")
    n = len(dataset)
    # Evenly spaced examples over the split, so a few batches still see all of it.
    count = min(n, batch_size * max_batches) if max_batches else n
    picks = np.unique(np.linspace(0, n - 1, count).round().astype(np.int64))
    batches = []
    for start in range(0, len(picks), batch_size):
        raw = dataset.batch(picks[start : start + batch_size])
        mask = raw.get("attention_mask")
        if mask is not None:
            mask = mask.bool()
            if bool(mask.all()):
                mask = None
        batches.append(Batch(raw["input_ids"], mask))
    return batches


def text_batches(tokenizer, texts: Iterable[str], seq_len: int, batch_size: int = 8, max_batches: int = 8) -> list[Batch]:
    """Non-overlapping windows of seq_len tokens from texts (for --text-file calibration)."""
    if tokenizer is None:
        raise UserError("this run's task has no tokenizer, so it cannot read text; calibrate on its validation data")
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text))
    if len(ids) < 2:
        raise UserError("the calibration text is empty")
    rows = [ids[i : i + seq_len] for i in range(0, max(1, len(ids) - seq_len + 1), seq_len)]
    rows = [r for r in rows if len(r) == len(rows[0])]
    if max_batches:
        rows = rows[: batch_size * max_batches]
    tensor = torch.tensor(rows, dtype=torch.long)
    return [Batch(tensor[i : i + batch_size], None) for i in range(0, len(tensor), batch_size)]


# --------------------------------------------------------------------------- routing statistics
def forward_routing(model, batch: Batch):
    """Forward pass that returns out.routing (no gradient, eval mode assumed)."""
    device = next(model.parameters()).device
    ids = batch.input_ids.to(device)
    mask = None if batch.attention_mask is None else batch.attention_mask.to(device)
    with torch.no_grad():
        return model(ids, attention_mask=mask, return_routing=True)


@dataclass
class RoutingStats:
    """Per layer: the entropies the layer's router saw and the operators chosen, real tokens only."""

    entropy: list[np.ndarray]  # per layer, 1-D float32
    ops: list[np.ndarray]  # per layer, 1-D int64
    meta_gate: list[float]

    def share(self, layer: int, op: int) -> float:
        ops = self.ops[layer]
        return float((ops == op).mean()) if ops.size else 0.0


def collect_routing(model, batches: Iterable[Batch]) -> RoutingStats:
    entropies: list[list[np.ndarray]] = []
    ops: list[list[np.ndarray]] = []
    gates: list[float] = []
    for batch in batches:
        out = forward_routing(model, batch)
        if not entropies:
            entropies = [[] for _ in out.routing]
            ops = [[] for _ in out.routing]
        keep = None if batch.attention_mask is None else batch.attention_mask.reshape(-1).cpu().numpy()
        for i, info in enumerate(out.routing):
            h = info.entropy.detach().float().reshape(-1).cpu().numpy()
            o = info.ops.detach().reshape(-1).cpu().numpy()
            if keep is not None:
                h, o = h[keep], o[keep]
            entropies[i].append(h)
            ops[i].append(o)
        if out.meta_gate is not None:
            gates.append(float(out.meta_gate.detach().float().mean()))
    if not entropies:
        raise UserError("no data to analyse (0 batches)")
    return RoutingStats(
        [np.concatenate(e).astype(np.float32) for e in entropies], [np.concatenate(o).astype(np.int64) for o in ops], gates
    )
