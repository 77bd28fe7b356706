"""results.json: the record a finished run leaves (what was trained, how it was selected, its
validation and test numbers, throughput and environment)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import torch

from .run_config import RunConfig
from .state import Progress

# The test metrics results.json keeps (the eval record also has step, protocol, time...).
TEST_KEYS = ("loss", "ppl", "bpb", "accuracy", "op_share", "tokens", "bytes", "examples")


def package_version() -> str | None:
    try:
        return version("chiarformer")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return None


def results_record(*, run_name: str, cfg: RunConfig, kind: str, params: dict, protocol: dict, select: str,
                   progress: Progress, test_record: dict | None, warmup: int, world: int, device: torch.device,
                   precision: str) -> dict:
    best, p = progress.best, progress
    test = {k: test_record[k] for k in TEST_KEYS if k in test_record} if test_record else None
    return {
        "run": run_name,
        "version": package_version(),
        "task": cfg.task,
        "kind": kind,
        "layout": cfg.model.layout,
        "routing": cfg.model.routing if cfg.model.routed_layers else None,
        "preset": cfg.preset,
        "params": params,
        "protocol": protocol,
        "selection": {"split": "val", "metric": select},
        "best": {"step": best["step"], "val": best["metrics"]} if best else None,
        "final_val": p.last_val,
        "test": test,
        "test_step": best["step"] if test else None,
        "steps": p.step,
        "warmup_steps": warmup,
        "tokens_seen": p.tokens_seen,
        "train_time_s": round(p.train_time, 3),
        "tokens_per_s": p.tokens_seen / p.train_time if p.train_time > 0 else None,
        "world_size": world,
        "device": str(device),
        "precision": precision,
        "torch": torch.__version__,
    }
