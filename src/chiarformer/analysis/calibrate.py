"""Entropy thresholds (tau) for threshold routing, set from data.

Two methods:

- ``hidden`` (default, this project's): for each routed layer, collect the spectral entropies
  that *that layer's router* sees (out.routing[i].entropy, the post-LN hidden states of the
  previous layer) on validation batches, and put tau at the (1 - target) quantile, so that the
  share of tokens with H > tau, i.e. sent to attention, is the target. Layers are calibrated in
  order: a layer's taus change the hidden states every later layer sees, so each layer is
  measured with the earlier layers already calibrated. For three-operator layers
  (DCT < tau_low <= RBF <= tau_high < attention) both thresholds are quantiles: by default
  equal thirds; any split can be asked for.
- ``paper`` (published, SPEC §1): the spectral entropy of the *token embeddings* of a trained
  baseline over validation text; tau_low, tau_high = its 33rd and 67th percentiles; two-operator
  layers route with their midpoint, three-operator layers with the pair. Every routed layer
  gets the same values. It fixes no attention share (SPEC §3.4); the achieved shares are printed.

The taus are written into the run's config.yaml and into every checkpoint of the run
(best and last, each keeping its own weights) through the engine's save helper, and the whole
calibration is recorded in runs/NAME/calibration.json.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import ChiarConfig
from ..errors import UserError
from ..operators import ATTN, DCT, ENTROPY_ORDER, RBF, Op, layer_letters
from ..train.runs import load_run, save_model_into_run
from . import common

METHODS = ("hidden", "paper")


@dataclass
class LayerCalibration:
    layer: int  # 0-based
    ops: tuple[int, ...]
    taus: tuple[float, ...]
    target: dict[str, float]  # operator name -> requested share ({} for the paper method)
    achieved: dict[str, float] = field(default_factory=dict)  # measured after calibration
    n_tokens: int = 0


@dataclass
class Calibration:
    method: str
    layers: list[LayerCalibration]
    source: str  # what data the entropies came from

    @property
    def taus(self) -> list:
        """One entry per routed layer, as model.set_taus expects."""
        return [tau_entry(lc.taus) for lc in self.layers]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "source": self.source,
            "taus": self.taus,
            "layers": [
                {
                    "layer": lc.layer + 1,
                    "ops": layer_letters(lc.ops),
                    "taus": list(lc.taus),
                    "target": lc.target,
                    "achieved": lc.achieved,
                    "tokens": lc.n_tokens,
                }
                for lc in self.layers
            ],
        }

    def format(self) -> str:
        lines = [f"calibration ({self.method}) on {self.source}"]
        for lc in self.layers:
            taus = ", ".join(f"{t:.6f}" for t in lc.taus)
            got = "  ".join(f"{k} {100 * v:5.1f}%" for k, v in lc.achieved.items())
            want = ", ".join(f"{k} {100 * v:.1f}%" for k, v in lc.target.items())
            off = any(abs(lc.achieved.get(k, 0.0) - v) > 0.01 for k, v in lc.target.items())
            lines.append(
                f"layer {lc.layer + 1} ({layer_letters(lc.ops)}): tau = {taus}   achieved: {got}"
                + (f"   (target {want})" if want else "")
                + ("   [off target: tokens with equal entropy cannot be split by a threshold]" if off else "")
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------- the maths
def layer_targets(ops: tuple[int, ...], target_attn: float | None, target_rbf: float | None) -> dict[int, float]:
    """Requested share per operator of one routed layer.

    Two operators: the expensive one (attention, else RBF) gets target_attn (default 0.25).
    Three operators: attention target_attn (default 1/3), RBF target_rbf (default: half of what
    attention leaves, i.e. equal thirds by default), DCT the rest.
    """
    if len(ops) == 2:
        top = ATTN if ATTN in ops else RBF
        t = 0.25 if target_attn is None else target_attn
        if top == RBF and target_rbf is not None:
            t = target_rbf
        other = [op for op in ops if op != top][0]
        return {other: 1.0 - t, top: t}
    t_attn = 1.0 / 3.0 if target_attn is None else target_attn
    t_rbf = (1.0 - t_attn) / 2.0 if target_rbf is None else target_rbf
    t_dct = 1.0 - t_attn - t_rbf
    if t_dct < -1e-9:
        raise UserError(f"target shares attention {t_attn} + RBF {t_rbf} exceed 1")
    return {DCT: max(t_dct, 0.0), RBF: t_rbf, ATTN: t_attn}


def taus_for_shares(entropy: np.ndarray, ops: tuple[int, ...], targets: dict[int, float]) -> tuple[float, ...]:
    """Thresholds that split `entropy` into the target shares, operators in entropy order.

    Routing is bucketize(H, taus) with right=False: H <= tau_0 -> first operator, tau_0 < H <= tau_1
    -> second, H > tau_last -> last. The operator order by entropy is DCT < RBF < attention.
    """

    order = [op for op in ENTROPY_ORDER if op in ops]
    h = np.sort(np.asarray(entropy, dtype=np.float64))
    if h.size == 0:
        raise UserError("no entropies to calibrate on")
    taus = []
    cum = 0.0
    for op in order[:-1]:
        cum += targets[op]
        taus.append(_threshold_at(h, cum))
    return tuple(float(t) for t in taus)


def _threshold_at(sorted_h: np.ndarray, below: float) -> float:
    """A threshold t such that the share of values <= t is as close to `below` as ties allow.

    Entropies can tie heavily: behind a DCT-only first layer (no token mixing, no absolute
    positions) the first routed layer's input is a function of the token id alone, so every
    occurrence of a token has the same H. A threshold cannot split a tie, so the tie group at
    the boundary goes to whichever side lands nearer the target. t is placed half-way between
    neighbouring distinct values, provided float32 (the router's buffer) keeps it between them.
    """
    vals, counts = np.unique(sorted_h.astype(np.float32), return_counts=True)
    n = sorted_h.size
    cum = np.concatenate([[0.0], np.cumsum(counts) / n])  # cum[i] = share of values < vals[i]
    i = int(np.argmin(np.abs(cum - below)))  # the i smallest distinct values go below t
    if i == 0:
        return float(vals[0]) - 1e-6
    if i == len(vals):
        return float(vals[-1]) + 1e-6
    lo, hi = vals[i - 1], vals[i]
    mid = np.float32((float(lo) + float(hi)) / 2.0)
    return float(mid) if lo <= mid < hi else float(lo)


def paper_taus(embedding_entropy: np.ndarray) -> tuple[float, float, float]:
    """(tau_low, tau_high, midpoint) = 33rd, 67th percentiles and their mean (published)."""
    low, high = np.percentile(np.asarray(embedding_entropy, dtype=np.float64), [33.0, 67.0])
    return float(low), float(high), float((low + high) / 2.0)


def embedding_entropies(model, batches: list[common.Batch]) -> np.ndarray:
    """Spectral entropy of the token embeddings of every real token in batches, by the routers'
    definition (model.cfg.entropy: the published calibration uses the published entropy)."""
    entropy = model.model.layers[0].entropy_of  # every layer computes H the same way
    embed = model.model.embed.weight
    out = []
    with torch.no_grad():
        for batch in batches:
            ids = batch.input_ids.to(embed.device)
            h = entropy(embed[ids]).reshape(-1).cpu().numpy()
            if batch.attention_mask is not None:
                h = h[batch.attention_mask.reshape(-1).cpu().numpy()]
            out.append(h)
    return np.concatenate(out)


# --------------------------------------------------------------------------- calibration
def _check_routable(cfg: ChiarConfig) -> None:
    if not cfg.routed_layers:
        raise UserError(f"layout {cfg.layout!r} has no routed layer: nothing to calibrate")
    if cfg.routing not in ("threshold", "capacity"):
        raise UserError(
            f"routing={cfg.routing!r} does not use tau ("
            + ("attn_fraction fixes the attention share" if cfg.routing == "topk" else "the router is learned")
            + "); calibration applies to routing='threshold' or 'capacity'"
        )


def tau_entry(taus: tuple) -> float | list:
    """A layer's taus as model.set_taus and config.yaml take them: a float, or [low, high]."""
    return taus[0] if len(taus) == 1 else list(taus)


def calibrate_hidden(model, batches, target_attn: float | None = 0.25, target_rbf: float | None = None) -> Calibration:
    """Set each routed layer's taus, in order, to reach the target shares on `batches`."""
    cfg = model.cfg
    _check_routable(cfg)
    routed = cfg.routed_layers
    taus: list = [tau_entry(cfg.layer_taus(i)) for i in routed]
    layers = []
    for j, i in enumerate(routed):
        ops = cfg.layer_ops[i]
        stats = common.collect_routing(model, batches)  # earlier layers already use their new taus
        targets = layer_targets(ops, target_attn, target_rbf)
        new = taus_for_shares(stats.entropy[i], ops, targets)
        taus[j] = tau_entry(new)
        model.set_taus(taus)
        layers.append(LayerCalibration(i, ops, new, {Op(op).label.lower(): t for op, t in targets.items()}))
    _measure(model, batches, layers)
    return Calibration("hidden", layers, "")


def calibrate_paper(model, embedding_entropy: np.ndarray, batches) -> Calibration:
    cfg = model.cfg
    _check_routable(cfg)
    low, high, mid = paper_taus(embedding_entropy)
    layers = []
    for i in cfg.routed_layers:
        ops = cfg.layer_ops[i]
        layers.append(LayerCalibration(i, ops, (low, high) if len(ops) == 3 else (mid,), {}))
    calibration = Calibration("paper", layers, "")
    model.set_taus(calibration.taus)
    _measure(model, batches, layers)
    return calibration


def _measure(model, batches, layers: list[LayerCalibration]) -> None:
    stats = common.collect_routing(model, batches)
    for lc in layers:
        lc.achieved = {Op(op).label.lower(): stats.share(lc.layer, op) for op in lc.ops}
        lc.n_tokens = int(stats.ops[lc.layer].size)


# --------------------------------------------------------------------------- run folders
def calibrate_run(
    run_dir: str | Path,
    method: str = "hidden",
    target_attn: float | None = None,
    target_rbf: float | None = None,
    baseline_run: str | Path | None = None,
    which: str = "best",
    split: str = "val",
    batch_size: int = 8,
    max_batches: int = 16,
    text_file: str | Path | None = None,
    save: bool = True,
    device: str = "cpu",
) -> Calibration:
    """Calibrate a run's taus on its validation data (or text_file) and store them in the run."""
    if method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    for name, value in (("--target-attn", target_attn), ("--target-rbf", target_rbf)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"{name} must lie in [0, 1], got {value}")
    run_dir = Path(run_dir)
    run = load_run(run_dir, which, device=device)
    _check_routable(run.model.cfg)
    batches, source = _batches(run, split, batch_size, max_batches, text_file)

    if method == "hidden":
        result = calibrate_hidden(run.model, batches, target_attn, target_rbf)
    else:
        base = run if baseline_run is None else load_run(baseline_run, "best", device=device)
        if baseline_run is not None:
            base_batches, base_source = _batches(base, split, batch_size, max_batches, text_file)
        else:
            base_batches, base_source = batches, source
        emb = embedding_entropies(base.model, base_batches)
        result = calibrate_paper(run.model, emb, batches)
        who = f"baseline run {baseline_run}" if baseline_run is not None else f"{run_dir} itself (no --baseline-run given)"
        source = f"{source}; embeddings of {who} over {base_source} ({emb.size} tokens)"
    result.source = source

    if save:
        _store(run_dir, which, result, device)
        record = {**result.to_dict(), "checkpoint": which, "target_attn": target_attn, "target_rbf": target_rbf,
                  "baseline_run": None if baseline_run is None else str(baseline_run)}
        (run_dir / "calibration.json").write_text(json.dumps(record, indent=2) + "\n")
    return result


def _batches(run, split, batch_size, max_batches, text_file):
    seq_len = int(run.run_config.data.seq_len)
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise UserError(f"--text-file {path} not found")
        batches = common.text_batches(run.tokenizer, [path.read_text(encoding="utf-8", errors="replace")], seq_len,
                                      batch_size, max_batches)
        return batches, f"{path} ({sum(b.input_ids.numel() for b in batches)} tokens)"
    batches = common.validation_batches(run, split, batch_size, max_batches)
    n = sum(int(b.input_ids.numel() if b.attention_mask is None else b.attention_mask.sum()) for b in batches)
    return batches, f"the run's {split} split ({len(batches)} batch(es), {n} tokens)"


def _store(run_dir: Path, which: str, result: Calibration, device: str) -> None:
    """Write the taus into every checkpoint of the run (each keeps its own weights) and config.yaml."""
    for name in ("best", "last") if which == "best" else ("last", "best"):
        if not (run_dir / "checkpoints" / name / "model.safetensors").is_file():
            continue
        loaded = load_run(run_dir, name, device=device)
        loaded.model.set_taus(result.taus)
        save_model_into_run(run_dir, loaded.model, name)
