"""Evaluation: PPL per token with bits per byte for language models, accuracy for classification.

Sums (not means) are accumulated and all-reduced, so the numbers are exact over the whole
split whatever the batch size or the number of processes.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..model import next_token_pairs
from ..operators import N_OPS
from . import dist as D
from .datasets import shard


def eval_protocol(data, cfg, split: str | None = None) -> dict:
    """The task's protocol, with the evaluated split and, for language models, context and stride."""
    protocol = dict(data.protocol)
    if split is not None:
        protocol["split"] = split
    if data.kind == "lm":
        protocol.update(context=cfg.data.seq_len, stride=cfg.data.eval_stride or cfg.data.seq_len)
    return protocol


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset,
    *,
    batch_size: int,
    device: torch.device,
    autocast=contextlib.nullcontext,
    max_batches: int = 0,
    dist_info: D.DistInfo | None = None,
    token_bytes: np.ndarray | None = None,
    lockstep: bool = False,
) -> dict:
    """Metrics of `model` on `dataset` (an LMWindows or a ClassificationView).

    lockstep=True makes every process run the same number of forward passes (needed when the
    forward itself communicates, as with FSDP).
    """
    info = dist_info or D.DistInfo()
    was_training = model.training
    model.eval()
    n = len(dataset)
    per_step = batch_size * info.world
    n_steps = math.ceil(n / per_step)
    complete = not max_batches or max_batches >= n_steps
    if max_batches:
        n_steps = min(n_steps, max_batches)
    order = np.arange(n)
    lm = dataset.kind == "lm"
    if not lm:
        if not complete:  # a fixed random subset, not the first examples
            order = np.random.default_rng(0).permutation(n)[: n_steps * per_step]
        if hasattr(dataset, "lengths"):  # similar lengths together: less padding, same metrics
            order = order[np.argsort(dataset.lengths()[order], kind="stable")]
    n_layers = model.cfg.n_layers
    # Sums stay on the device until the end: no host copy per batch.
    sums = torch.zeros(5 + n_layers * N_OPS, dtype=torch.float64, device=device)  # nats, targets, correct, bytes, examples, ops
    byte_table = torch.as_tensor(token_bytes, dtype=torch.float64, device=device) if (lm and token_bytes is not None) else None
    for step in range(n_steps):
        global_idx = order[step * per_step : (step + 1) * per_step]
        idx = shard(global_idx, info.rank, info.world)
        dummy = len(idx) == 0
        if dummy:
            if not lockstep:
                continue
            idx = global_idx[:1]
        batch = {k: v.to(device, non_blocking=True) for k, v in dataset.batch(idx).items()}
        with autocast():
            out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        if dummy:
            continue
        if lm:
            logits, targets = next_token_pairs(out.logits, batch["labels"])
            logits = logits.float()  # one copy: the predictions that have a target
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                  reduction="none").view_as(targets)
            scored = targets != -100  # unscored positions have nll 0; no boolean indexing (a host sync)
            sums[0] += nll.sum().double()
            sums[1] += scored.sum()
            sums[2] += ((logits.argmax(-1) == targets) & scored).sum()
            if byte_table is not None:
                sums[3] += (byte_table[targets.clamp_min(0)] * scored).sum()
            sums[4] += targets.shape[0]
            mask = None
        else:
            logits, labels = out.logits.float(), batch["labels"]
            sums[0] += F.cross_entropy(logits, labels, reduction="sum").double()
            sums[1] += labels.numel()
            sums[2] += (logits.argmax(-1) == labels).sum()
            sums[4] += labels.numel()
            mask = batch.get("attention_mask")
        if out.routing:
            sums[5:] += op_counts(out.routing, mask).flatten().double()
    D.all_reduce_sum(sums, info)
    sums = sums.cpu()
    model.train(was_training)
    nats, count, correct, n_bytes, examples = (float(x) for x in sums[:5])
    metrics = {"loss": nats / count if count else float("nan"), "accuracy": correct / count if count else float("nan")}
    if lm:
        metrics["ppl"] = math.exp(min(metrics["loss"], 700.0))
        metrics["bpb"] = nats / math.log(2) / n_bytes if n_bytes else None
        metrics["tokens"] = int(count)
        metrics["bytes"] = int(n_bytes)
    else:
        metrics["ppl"] = None
        metrics["bpb"] = None
        metrics["examples"] = int(examples)
    metrics["op_share"] = shares(sums[5:].view(n_layers, N_OPS))
    metrics["complete"] = complete
    return metrics


def op_counts(routing, mask: torch.Tensor | None) -> torch.Tensor:
    """(n_layers, 3) counts of tokens per operator (DCT, ATTN, RBF), padding excluded."""
    # Comparisons and sums only: no data-dependent shapes, so no host sync on the training path.
    op_ids = torch.arange(N_OPS, device=routing[0].ops.device)
    hits = torch.stack([info.ops for info in routing])[..., None] == op_ids  # (layers, B, T, ops)
    if mask is not None:
        hits = hits & mask.bool()[None, ..., None]
    return hits.sum(dim=(1, 2))


def shares(counts: torch.Tensor) -> list[list[float]]:
    totals = counts.sum(-1, keepdim=True).clamp_min(1)
    return [[round(float(x), 6) for x in row] for row in (counts / totals)]


# ---------------------------------------------------------------------------- checkpoint selection
def selection_metric(setting: str, kind: str) -> str:
    """train.select_metric, with "auto" resolved: loss for language models, accuracy for classifiers."""
    return setting if setting != "auto" else ("loss" if kind == "lm" else "accuracy")


def improves(metrics: dict, best: dict | None, metric: str) -> bool:
    """Whether validation `metrics` beat the best so far ({"step", "metrics"} or None); accuracy ties
    go to the lower loss."""
    if best is None:
        return True
    old = best["metrics"]
    if metric == "loss":
        return metrics["loss"] < old["loss"]
    return (metrics["accuracy"], -metrics["loss"]) > (old["accuracy"], -old["loss"])
