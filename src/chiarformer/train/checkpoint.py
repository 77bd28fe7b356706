"""Checkpoints that never unpickle: safetensors for tensors, JSON for everything else, atomic writes.

Layout of one checkpoint folder (runs/NAME/checkpoints/{last,best}/):

    model.safetensors      model weights; tied weights are stored once (aliases in the metadata);
                           metadata also holds the model config (JSON) and the step
    meta.json              {"step", "metrics", ...}: what the checkpoint is
    optimizer.safetensors  (last only) AdamW moments and step counts, keyed "state/<param>/<name>"
    state.json             (last only) optimizer param groups, schedule position, data position,
                           Python/NumPy RNG states, best-so-far record, grad-scaler state
    rng.safetensors        (last only) torch CPU (and CUDA) RNG states as uint8 tensors

A folder is written to a temporary sibling, fsynced, then swapped in by rename; a crash at any
moment leaves either the old or the new checkpoint complete (`recover` finishes an interrupted swap).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import UMASK, fsync_dir, fsync_file
from ..errors import UserError

FORMAT_VERSION = 1


class AtomicDir:
    """Build a folder under a temporary name and swap it in on success.

        with AtomicDir(ckpt_root / "last") as tmp:
            save_file(..., tmp / "model.safetensors")
    """

    def __init__(self, target: Path):
        self.target = Path(target)
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.target.name}.tmp-", dir=self.target.parent))
        os.chmod(self.tmp, 0o777 & ~UMASK)  # mkdtemp creates 0700
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        for child in self.tmp.iterdir():
            fsync_file(child)
        fsync_dir(self.tmp)
        swap_in(self.tmp, self.target)


def _old(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def swap_in(new: Path, target: Path) -> None:
    """Replace folder `target` by folder `new` so that one complete version always exists.

    rename(2) cannot replace a non-empty folder, so: target -> .target.old, new -> target,
    then delete .target.old. A crash between the renames leaves only .target.old, which
    `recover` renames back.
    """
    old = _old(target)
    if old.exists():
        if target.exists():
            shutil.rmtree(old)
        else:  # an earlier swap died between its renames: old is the only complete copy
            os.replace(old, target)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover(ckpt_root: Path) -> None:
    """Finish or undo interrupted checkpoint writes under ckpt_root (call before reading)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return
    for child in list(ckpt_root.iterdir()):
        name = child.name
        if name.startswith(".") and ".tmp-" in name:
            shutil.rmtree(child, ignore_errors=True)  # a half-written checkpoint
        elif name.startswith(".") and name.endswith(".old"):
            target = ckpt_root / name[1:-4]
            if target.exists():
                shutil.rmtree(child, ignore_errors=True)
            else:
                os.replace(child, target)
        elif name.startswith(".") and name.endswith(".tmp"):
            child.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- tensors
def dedupe_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied weights); return (tensors, aliases)."""
    seen: dict[tuple, str] = {}
    tensors, aliases = {}, {}
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype) \
            if tensor.device.type != "meta" and tensor.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = tensor.detach().to("cpu").contiguous()
    return tensors, aliases


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    # safetensors rejects tensors sharing memory: copy any that still do.
    ptrs: set[int] = set()
    for key, tensor in tensors.items():
        if tensor.numel():
            ptr = tensor.untyped_storage().data_ptr()
            if ptr in ptrs:
                tensors[key] = tensor.clone()
            ptrs.add(tensors[key].untyped_storage().data_ptr())
    save_file(tensors, str(path), metadata=metadata)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file (no pickle involved); a damaged file is a UserError."""
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read checkpoint file {path}: {exc}") from None


def read_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"cannot read checkpoint file {path}: {exc}") from None


def save_model_file(path: Path, state: dict[str, torch.Tensor], model_config: dict | None, extra: dict | None = None) -> None:
    tensors, aliases = dedupe_state_dict(state)
    metadata = {"format": "chiarformer", "format_version": str(FORMAT_VERSION), "aliases": json.dumps(aliases)}
    if model_config is not None:
        metadata["model_config"] = json.dumps(model_config)
    for key, value in (extra or {}).items():
        metadata[key] = json.dumps(value)
    save_tensors(path, tensors, metadata)


def load_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict with aliases restored, metadata with JSON values decoded)."""
    tensors = load_tensors(path)
    raw = read_metadata(path)
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = json.loads(value)
        except (json.JSONDecodeError, TypeError):
            meta[key] = value
    for alias, source in (meta.get("aliases") or {}).items():
        if source in tensors:
            tensors[alias] = tensors[source]
    return tensors, meta


def load_into_model(model: torch.nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """load_state_dict(strict) with a one-line UserError when the checkpoint does not fit the model."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shape mismatch: " + ", ".join(shapes[:3]) + (" ..." if len(shapes) > 3 else ""))
        if missing:
            parts.append(f"{len(missing)} missing tensor(s) e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s) e.g. {unexpected[0]}")
        raise UserError(f"checkpoint {where} does not fit the model config ({'; '.join(parts)})")
    with torch.no_grad():
        model.load_state_dict({k: state[k] for k in own}, strict=True)


# ---------------------------------------------------------------------------- optimizer state
def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into safetensors-ready tensors and a JSON-ready rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    key_types: dict[str, str] = {}
    for key, entry in state_dict.get("state", {}).items():
        skey = str(key)
        key_types[skey] = type(key).__name__
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{skey}/{name}"] = value
            else:
                scalars.setdefault(skey, {})[name] = value
    groups = json.loads(json.dumps(state_dict.get("param_groups", []), default=_json_default))
    return tensors, {"param_groups": groups, "scalars": scalars, "key_types": key_types}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict = {}
    key_types = rest.get("key_types", {})

    def typed(skey: str):
        return int(skey) if key_types.get(skey) == "int" else skey

    for name, tensor in tensors.items():
        _, skey, field = name.split("/", 2) if name.count("/") >= 2 else (None, None, None)
        if skey is None:
            continue
        state.setdefault(typed(skey), {})[field] = tensor
    for skey, values in rest.get("scalars", {}).items():
        state.setdefault(typed(skey), {}).update(values)
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in g.items()}
              for g in rest.get("param_groups", [])]  # JSON turned tuples (betas) into lists
    return {"state": state, "param_groups": groups}


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


# ---------------------------------------------------------------------------- RNG
def rng_state(device: torch.device | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    import random

    import numpy as np

    tensors = {"torch_cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype("int64"))
    py = random.getstate()
    rest = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [py[0], list(py[1]), py[2]],
    }
    return tensors, rest


def set_rng_state(tensors: dict[str, torch.Tensor], rest: dict, device: torch.device | None = None) -> None:
    import random

    import numpy as np

    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    if "torch_cuda" in tensors and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(tensors["torch_cuda"].to(torch.uint8), device)
    if "numpy_keys" in tensors and "numpy" in rest:
        n = rest["numpy"]
        np.random.set_state((n["kind"], tensors["numpy_keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
    if "python" in rest:
        version, internal, gauss = rest["python"]
        random.setstate((version, tuple(internal), gauss))
