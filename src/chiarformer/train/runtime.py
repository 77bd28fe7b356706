"""Where and how a run executes: the device, mixed precision, and the process-wide settings a
run needs (CPU threads, TF32, deterministic kernels, global seeds, glibc's allocator).

`run_settings(cfg, info)` applies the settings for the duration of a `with` block and restores
the previous ones after it (train() runs inside one, so calling it from Python leaves the
process as it found it). The allocator tuning cannot be undone: only the command line applies it
(`tune_cpu_allocator`), before training.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
from collections.abc import Iterator

import numpy as np
import torch

from ..errors import UserError
from . import dist as D
from .run_config import RunConfig

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"


def pick_device(name: str, info: D.DistInfo) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is available; use train.device=cpu")
        return torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_for(precision: str, device: torch.device):
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return precision, contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs CUDA; use fp32 or bf16 on CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return precision, lambda: torch.autocast(device.type, dtype=dtype)


def tune_cpu_allocator(device: str) -> bool:
    """For a run on CPU (`device`: the train.device setting), keep large buffers in glibc's heap
    instead of fresh mmap()s, for the rest of the process.

    A CPU step allocates several (batch x context x vocab) float tensors (hundreds of MB with the
    GPT-2 vocabulary); above glibc's mmap threshold each is a new mapping whose pages are faulted
    in and zeroed again every step. Raising the threshold (and the trim threshold, so freed
    memory is kept for reuse) measured +45% training tokens/s for tiny with the GPT-2 vocabulary
    on 2 cores. Linux/glibc only; a no-op elsewhere and for GPU runs. Returns whether it applied.
    """
    import ctypes  # only here: the one use of the C library

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if not on_cpu or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


@contextlib.contextmanager
def run_settings(cfg: RunConfig, info: D.DistInfo) -> Iterator[torch.device]:
    """Threads (CPU) or the current device and TF32 (CUDA), deterministic kernels if asked, and the
    global seeds, for the block; yields the device. Everything is restored on exit, the RNGs too."""
    t = cfg.train
    device = pick_device(t.device, info)
    saved = {
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.current_device() if device.type == "cuda" else None,
        "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32),
        "deterministic": (torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "cublas": os.environ.get(CUBLAS_ENV),
        "rng": (torch.get_rng_state(), np.random.get_state(), random.getstate()),
        "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }
    if device.type == "cpu":
        torch.set_num_threads(t.num_threads or max(1, (os.cpu_count() or 1) // max(1, info.local_world)))
    else:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if t.deterministic and device.type == "cuda":
        os.environ.setdefault(CUBLAS_ENV, ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    np.random.seed(t.seed % (2**32))
    random.seed(t.seed)
    torch.manual_seed(t.seed)
    try:
        yield device
    finally:
        torch.set_num_threads(saved["threads"])
        if saved["cuda_device"] is not None:
            torch.cuda.set_device(saved["cuda_device"])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved["tf32"]
        cudnn_det, det, warn_only = saved["deterministic"]
        torch.backends.cudnn.deterministic = cudnn_det
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        if saved["cublas"] is None:
            os.environ.pop(CUBLAS_ENV, None)
        else:
            os.environ[CUBLAS_ENV] = saved["cublas"]
        torch_rng, np_rng, py_rng = saved["rng"]
        torch.set_rng_state(torch_rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)
        if saved["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
