"""Orthonormal DCT-II along the last axis, its inverse, and normalised spectral entropy.

The transform is a product with a cached d x d matrix: at the sizes used here (d = 64..1024)
a BLAS matrix product beats torch.fft-based DCTs on CPU and GPU alike
(see benchmarks/bench_dct.py for the measurement) and it is differentiable for free.
`dct` matches scipy.fft.dct(x, type=2, norm="ortho"); `idct` is its exact inverse.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=32)
def dct_matrix(n: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """C with C[k, i] = s_k cos(pi (i + 1/2) k / n), s_0 = sqrt(1/n), s_k = sqrt(2/n); C @ C.T = I."""
    i = torch.arange(n, dtype=torch.float64)
    k = i[:, None]
    c = torch.cos(math.pi * (i[None, :] + 0.5) * k / n) * math.sqrt(2.0 / n)
    c[0] /= math.sqrt(2.0)
    return c.to(device=device, dtype=dtype)


def dct(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II of x along its last axis."""
    return x @ dct_matrix(x.shape[-1], x.device, x.dtype).T


def idct(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `dct` (the orthonormal DCT-III) along the last axis."""
    return x @ dct_matrix(x.shape[-1], x.device, x.dtype)


def spectral_entropy(x: torch.Tensor) -> torch.Tensor:
    """H(x) = -sum_k p_k log p_k / log d with p_k = X_k^2 / sum_j X_j^2, X = DCT(x); in [0, 1].

    Computed in float32 whatever the input dtype (squares of bf16/fp16 values lose too much).
    A zero vector has no spectrum; it gets H = 0 (maximally "smooth"), never NaN.
    """
    d = x.shape[-1]
    if d < 2:
        return torch.zeros(x.shape[:-1], device=x.device, dtype=torch.float32)
    power = dct(x.float()).square()
    total = power.sum(-1, keepdim=True)
    p = power / total.clamp_min(torch.finfo(torch.float32).tiny)
    h = -torch.special.xlogy(p, p).sum(-1) / math.log(d)
    return h.clamp(0.0, 1.0)
