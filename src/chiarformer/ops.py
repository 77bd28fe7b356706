"""Orthonormal DCT-II along the last axis, its inverse, and normalised spectral entropy.

Two implementations with identical results: "matmul", a product with a cached d x d matrix
(d^2 multiply-adds per vector), and "fft", one length-d complex FFT of the even/odd-reordered
vector (O(d log d)). "auto" is a constant: always "matmul", nothing is measured at run time.
That choice was made once from benchmarks (benchmarks/bench_dct.py, docs/benchmarks.md): the
matrix product wins at every d we use, on CPU (about 3x at d=256, 2 cores) and on an H200
(about 1.3x at d=64..1024); "fft" is kept for the MAC count.
`dct` matches scipy.fft.dct(x, type=2, norm="ortho"); `idct` is its exact inverse.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext

import torch


@functools.lru_cache(maxsize=32)
def dct_matrix(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """C with C[k, i] = s_k cos(pi (i + 1/2) k / n), s_0 = sqrt(1/n), s_k = sqrt(2/n); C @ C.T = I."""
    i = torch.arange(n, dtype=torch.float64)
    k = i[:, None]
    c = torch.cos(math.pi * (i[None, :] + 0.5) * k / n) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(device=device, dtype=dtype)


def resolve_impl(impl: str) -> str:
    """The implementation "auto" stands for (see the module docstring)."""
    return "matmul" if impl == "auto" else impl


def dct(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Orthonormal DCT-II of x along its last axis."""
    if resolve_impl(impl) == "matmul":
        return x @ dct_matrix(x.shape[-1], x.device, x.dtype).T
    n = x.shape[-1]
    reordered = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], -1)
    spectrum = torch.fft.fft(reordered.float(), dim=-1) * _twiddle(n, x.device, -1.0)
    out = spectrum.real * math.sqrt(2.0 / n)
    return torch.cat([out[..., :1] / math.sqrt(2.0), out[..., 1:]], -1).to(x.dtype)


def idct(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """Inverse of `dct` (the orthonormal DCT-III) along the last axis."""
    if resolve_impl(impl) == "matmul":
        return x @ dct_matrix(x.shape[-1], x.device, x.dtype)
    n = x.shape[-1]
    y = x.float()
    scaled = torch.cat([y[..., :1] * math.sqrt(2.0), y[..., 1:]], -1) * math.sqrt(n / 2.0)
    mirrored = torch.cat([torch.zeros_like(y[..., :1]), scaled[..., 1:].flip(-1)], -1)
    v = torch.fft.ifft(torch.complex(scaled, -mirrored) * _twiddle(n, x.device, 1.0), dim=-1).real
    # v holds the even-indexed samples, then the odd-indexed ones reversed
    half = (n + 1) // 2
    out = torch.stack([v[..., :half][..., : n // 2], v[..., half:].flip(-1)], -1).flatten(-2)
    if n % 2:
        out = torch.cat([out, v[..., half - 1 : half]], -1)
    return out.to(x.dtype)


@functools.lru_cache(maxsize=32)
def _twiddle(n: int, device: torch.device, sign: float) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float64)
    return torch.polar(torch.ones_like(k), sign * math.pi * k / (2 * n)).to(device=device, dtype=torch.complex64)


@torch.no_grad()
def spectral_entropy(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """H(x) = -sum_k p_k log p_k / log d with p_k = X_k^2 / sum_j X_j^2, X = DCT(x); in [0, 1].

    Computed in float32 whatever the input dtype (squares of bf16/fp16 values lose too much).
    A zero vector has no spectrum; it gets H = 0 (maximally "smooth"), never NaN.
    A routing statistic, not differentiated (routers learn through their own weights).
    """
    d = x.shape[-1]
    if d < 2:
        return torch.zeros(x.shape[:-1], device=x.device, dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    # Autocast would run the DCT in bf16/fp16; it exists only on some device types.
    exact = torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(x.device.type) else nullcontext()
    with exact:
        power = dct(x.float(), impl).square_()
    total = power.sum(-1)
    # -sum p log p with p = P / S equals log S - sum(P log P) / S: no normalised copy of P.
    weighted = torch.linalg.vecdot(power, power.clamp_min(tiny).log_())
    h = torch.where(total > 0, total.log() - weighted / total.clamp_min(tiny), 0.0)
    return (h / math.log(d)).clamp(0.0, 1.0)


@functools.lru_cache(maxsize=32)
def _reference_power_weight(d: int, device: torch.device) -> torch.Tensor:
    """Squares of the published DCT's scale: (2 sqrt2)^2 for the DC coefficient, 2^2 for the rest."""
    weight = torch.full((d,), 4.0, device=device)
    weight[0] = 8.0
    return weight


def reference_spectral_entropy(x: torch.Tensor) -> torch.Tensor:
    """The published code's spectral entropy (SPEC §7), differentiable, in float32.

    Its DCT is diag(2 sqrt2, 2, ..., 2) times the orthonormal one, so after normalisation the DC
    coefficient's power counts twice; p = P / (sum P + 1e-8), H = -sum p log(p + 1e-8) / (log d + 1e-8).
    It differs from `spectral_entropy` unless the vector's feature mean is zero.
    """
    d = x.shape[-1]
    weight = _reference_power_weight(d, x.device)
    exact = torch.autocast(x.device.type, enabled=False) if torch.amp.is_autocast_available(x.device.type) else nullcontext()
    with exact:
        power = dct(x.float()).square() * weight
        p = power / (power.sum(-1, keepdim=True) + 1e-8)
        return -(p * (p + 1e-8).log()).sum(-1) / (math.log(d) + 1e-8)
