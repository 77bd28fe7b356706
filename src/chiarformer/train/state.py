"""The training state on disk: what a `best` or `last` checkpoint folder holds, how it is written
(atomically, by rank 0) and read back, and the FSDP-aware gathering of model and optimizer state.

Layout (see checkpoint.py for the file formats): model.safetensors and meta.json in both;
`last` adds optimizer.safetensors, rng.safetensors and state.json (FORMAT_VERSION), so that a
resumed run replays the same computation as an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from . import checkpoint as C
from . import dist as D
from .datasets import BatchSampler


@dataclass
class Progress:
    """Where a run stands: the counters a resume restores besides weights, optimizer and RNG."""

    step: int = 0
    tokens_seen: int = 0
    train_time: float = 0.0
    best: dict | None = None  # {"step", "metrics"} of the best validation so far
    last_val: dict | None = None  # {"step", "metrics"} of the latest validation


class Checkpointer:
    """Saves and restores one run's checkpoints under `root` (run_dir/checkpoints)."""

    def __init__(self, root: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, scaler, sampler: BatchSampler,
                 model_config: dict, task: str, device: torch.device, info: D.DistInfo, fsdp: bool, mixture=None):
        self.root, self.model, self.optimizer, self.scaler, self.sampler = Path(root), model, optimizer, scaler, sampler
        self.model_config, self.task, self.device, self.info, self.fsdp = model_config, task, device, info, fsdp
        self.mixture = mixture  # train/mixture.py's Mixture of a mixed run (its samplers' positions), else None

    # ------------------------------------------------------------------ saving
    def save(self, which: str, progress: Progress, schedule: dict) -> None:
        """Write checkpoints/<which> (every rank calls this: gathering is collective under FSDP)."""
        model_state = self._model_state()
        optim_state = self._optim_state() if which == "last" else None
        if self.info.is_main:
            self._write(which, progress, schedule, model_state, optim_state)
        D.barrier(self.info)  # nobody reads a checkpoint before it is complete

    def _write(self, which: str, progress: Progress, schedule: dict, model_state: dict, optim_state: dict | None) -> None:
        step = progress.step
        meta = {"step": step, "kind": which, "task": self.task, "tokens_seen": progress.tokens_seen,
                "metrics": progress.best["metrics"] if which == "best" and progress.best else None}
        with C.AtomicDir(self.root / which) as tmp:
            C.save_model_file(tmp / "model.safetensors", model_state, self.model_config, {"step": step})
            if optim_state is not None:
                tensors, rest = C.flatten_optimizer(optim_state)
                C.save_tensors(tmp / "optimizer.safetensors", tensors, {"format": "chiarformer-optimizer"})
                rng_tensors, rng_rest = C.rng_state(self.device)
                C.save_tensors(tmp / "rng.safetensors", rng_tensors)
                state = {
                    "format_version": C.FORMAT_VERSION,
                    "step": step,
                    "max_steps": schedule["total"],
                    "schedule": {"kind": "warmup_cosine", "step": step, **schedule},
                    "data": self.sampler.state(),
                    "tokens_seen": progress.tokens_seen,
                    "train_time_s": progress.train_time,
                    "best": progress.best,
                    "last_val": progress.last_val,
                    "optimizer": rest,
                    "rng": rng_rest,
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "world_size": self.info.world,
                }
                if self.mixture is not None:
                    state["mixture"] = self.mixture.state()
                (tmp / "state.json").write_text(json.dumps(state, indent=1))
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    # ------------------------------------------------------------------ loading
    def load_last(self) -> Progress:
        """Restore weights, optimizer, RNG, scaler and data position from `last`; return its progress."""
        if self.info.is_main:  # recover() renames inside the shared folder: one process does it
            C.recover(self.root)
        D.barrier(self.info)
        last = self.root / "last"
        if not (last / "state.json").is_file():
            raise UserError(f"{self.root.parent} has no complete checkpoint to resume from ({last} is missing)")
        state_dict, meta = C.load_model_file(last / "model.safetensors")
        saved_cfg = meta.get("model_config")
        if saved_cfg is not None and saved_cfg != self.model_config:
            changed = sorted(k for k in saved_cfg if saved_cfg.get(k) != self.model_config.get(k))
            raise UserError(f"checkpoint {last} does not fit the config: model field(s) differ: {', '.join(changed)}")
        self._load_model_state(state_dict, last)
        try:
            state = json.loads((last / "state.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read {last / 'state.json'}: {exc}") from None
        optim = C.unflatten_optimizer(C.load_tensors(last / "optimizer.safetensors"), state["optimizer"])
        try:
            self._load_optim_state(optim)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"optimizer state in {last} does not fit the model: {str(exc).splitlines()[0]}") from None
        C.set_rng_state(C.load_tensors(last / "rng.safetensors"), state.get("rng", {}), self.device)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.sampler.load_state(state["data"])
        if self.mixture is not None:
            self.mixture.load_state(state.get("mixture"))
        return Progress(step=int(state["step"]), tokens_seen=int(state["tokens_seen"]),
                        train_time=float(state.get("train_time_s", 0.0)), best=state.get("best"),
                        last_val=state.get("last_val"))

    def load_best_weights(self) -> None:
        """Every process reads the best weights (multi-node runs need the run folder on a shared filesystem)."""
        best = self.root / "best"
        state, _ = C.load_model_file(best / "model.safetensors")
        self._load_model_state(state, best)

    def last_good(self) -> str:
        """Where a diverged run can resume from, as advice."""
        last = self.root / "last"
        if (last / "meta.json").is_file():
            step = json.loads((last / "meta.json").read_text()).get("step")
            return f"The last good checkpoint is {last} (step {step}); lower train.lr or set train.grad_clip and --resume."
        return "No checkpoint was saved yet; lower train.lr or set train.grad_clip and start again."

    # ------------------------------------------------------------------ state dicts (full ones under FSDP)
    def _model_state(self) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.model.state_dict()

    def _optim_state(self) -> dict:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def _load_model_state(self, state: dict, where: Path) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))
        else:
            C.load_into_model(self.model, state, where)

    def _load_optim_state(self, state: dict) -> None:
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(state)
