"""Reading and updating run folders (runs/NAME/) from other tools.

    runs/NAME/config.yaml        resolved RunConfig (task, preset, model, train, data)
    runs/NAME/metrics.jsonl      one JSON object per log step ("kind": "train") and per evaluation ("kind": "eval")
    runs/NAME/checkpoints/best/  model.safetensors + meta.json (chosen on validation)
    runs/NAME/checkpoints/last/  model.safetensors, optimizer.safetensors, rng.safetensors, state.json, meta.json
    runs/NAME/results.json       parameters, protocol, best validation metrics, test metrics (once), tokens/s

`load_run(run_dir, which)` -> LoadedRun(model in eval mode, config dict, tokenizer or None, ...).
`save_model_into_run(run_dir, model, which)` stores changed weights/taus (e.g. after calibration).
`evaluate_run(run_dir, split)` evaluates a checkpoint; metrics.jsonl is read by chiarformer.train.metrics.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ChiarConfig
from ..data.tasks import task_spec
from ..errors import UserError
from ..model import build_model
from . import checkpoint as C
from .dist import DistInfo
from .evaluate import eval_protocol, evaluate
from .mixture import AUX_HEADS
from .run_config import RunConfig
from .runtime import autocast_for, pick_device
from .task_data import finalize_model_config, load_task_data, tokenizer_for


@dataclass
class LoadedRun:
    model: torch.nn.Module  # in eval mode, on `device`
    config: dict  # as in config.yaml
    tokenizer: Any  # the task's tokenizer (encode/decode), or None
    run_config: RunConfig
    run_dir: Path
    which: str
    step: int | None
    kind: str  # "lm" or "cls"


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} not found")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a run folder (no config.yaml)")


def checkpoint_dir(run_dir: str | Path, which: str = "best") -> Path:
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    if which not in ("best", "last"):
        raise UserError(f"checkpoint must be 'best' or 'last', got {which!r}")
    root = run_dir / "checkpoints"
    target = root / which
    if not (target / "model.safetensors").is_file():
        old = root / f".{which}.old"  # an interrupted swap: the previous checkpoint is complete
        if (old / "model.safetensors").is_file():
            return old
        raise UserError(f"{run_dir} has no {which} checkpoint yet ({target}/model.safetensors missing)")
    return target


def load_run(run_dir: str | Path, which: str = "best", device: str | torch.device = "cpu") -> LoadedRun:
    """The run's model (eval mode) with its config and tokenizer. Never unpickles anything."""
    run_dir = Path(run_dir)
    ckpt = checkpoint_dir(run_dir, which)
    cfg = RunConfig.load(run_dir / "config.yaml")
    kind = task_spec(cfg.task).kind  # an unknown task is a UserError, never a guess
    state, meta = C.load_model_file(ckpt / "model.safetensors")
    model_cfg = cfg.model
    saved = meta.get("model_config")
    if isinstance(saved, dict) and saved != model_cfg.to_dict():
        # The checkpoint records the model it was saved from (e.g. taus after calibration).
        differing = [k for k in saved if saved.get(k) != model_cfg.to_dict().get(k) and k != "tau"]
        if differing:
            raise UserError(f"checkpoint {ckpt} does not fit {run_dir / 'config.yaml'}: model field(s) differ: "
                            f"{', '.join(sorted(differing))}")
        model_cfg = ChiarConfig.from_dict(saved)
    model = build_model(model_cfg, kind)
    # A mixed run's classification heads serve only its training; the LM head is the model.
    state = {k: v for k, v in state.items() if not k.startswith(f"{AUX_HEADS}.")}
    C.load_into_model(model, state, ckpt)
    model.to(torch.device(device) if not isinstance(device, torch.device) else device).eval()
    try:
        tokenizer = tokenizer_for(cfg)
    except UserError:
        tokenizer = None
    step = meta.get("step")
    return LoadedRun(model=model, config=cfg.to_dict(), tokenizer=tokenizer, run_config=cfg, run_dir=run_dir,
                     which=which, step=int(step) if isinstance(step, (int, float)) else None, kind=kind)


def save_model_into_run(run_dir: str | Path, model: torch.nn.Module, which: str = "best") -> None:
    """Replace the weights of checkpoint `which` by `model`'s and record model.cfg (e.g. new taus) in
    config.yaml. The other files of the checkpoint are kept; the swap is atomic."""
    run_dir = Path(run_dir)
    ckpt = checkpoint_dir(run_dir, which)
    cfg = RunConfig.load(run_dir / "config.yaml")
    model_cfg = getattr(model, "cfg", None)
    model_dict = model_cfg.to_dict() if model_cfg is not None else cfg.model.to_dict()
    meta = {}
    if (ckpt / "model.safetensors").is_file():
        _, meta = C.load_model_file(ckpt / "model.safetensors")
    target = run_dir / "checkpoints" / which
    with C.AtomicDir(target) as tmp:
        for child in ckpt.iterdir():
            if child.is_file() and child.name != "model.safetensors":
                shutil.copy2(child, tmp / child.name)
        C.save_model_file(tmp / "model.safetensors", model.state_dict(), model_dict, {"step": meta.get("step")})
    if model_cfg is not None:
        cfg.model = ChiarConfig.from_dict(model_dict)
        cfg.save(run_dir / "config.yaml")


def evaluate_run(run_dir: str | Path, split: str = "val", which: str = "best", batch_size: int = 0,
                 device: str = "auto", max_batches: int = 0) -> dict:
    """Evaluate a run's checkpoint on a split (reloading the task data). Nothing is written."""
    run_dir = Path(run_dir)
    dev = pick_device(device, DistInfo())
    run = load_run(run_dir, which, device=dev)
    cfg = run.run_config
    data = load_task_data(cfg, quiet=True)
    finalize_model_config(cfg, data)  # checks the data still fits the model (vocabulary, classes)
    dataset = {"val": data.val, "test": data.test, "train": data.train}[split]
    if dataset is None or len(dataset) == 0:
        raise UserError(f"task {cfg.task} has no {split} split")
    _, autocast = autocast_for(cfg.train.precision, dev)
    metrics = evaluate(run.model, dataset, batch_size=batch_size or cfg.train.eval_batch_size or
                       cfg.train.micro_batch_size or cfg.train.batch_size, device=dev, autocast=autocast,
                       max_batches=max_batches, token_bytes=data.token_bytes)
    protocol = eval_protocol(data, cfg, split)
    return {"kind": "eval", "split": split, "step": run.step, "checkpoint": which, **metrics, "protocol": protocol,
            "task_kind": data.kind}
