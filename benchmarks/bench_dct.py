"""Which DCT form is faster here: the cached d x d matrix (chiarformer.ops) or torch.fft?

Times an orthonormal DCT-II + inverse round trip over 4096 vectors for several d, both forms
interleaved in one process. chiarformer.ops uses the matrix form because it wins on CPU
(2 cores: about 3x at d=256). Usage: python benchmarks/bench_dct.py [--device cuda]
"""

from __future__ import annotations

import argparse
import math

import torch

from chiarformer.ops import dct, idct

from bench_routing import race  # the interleaved median timer shared by the benchmarks


def dct_fft(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal DCT-II through one length-d complex FFT of the even/odd-reordered input."""
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], -1)
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    out = (torch.fft.fft(v, dim=-1) * torch.polar(torch.ones_like(k), -math.pi * k / (2 * n))).real * math.sqrt(2.0 / n)
    return torch.cat([out[..., :1] / math.sqrt(2.0), out[..., 1:]], -1)


def idct_fft(y: torch.Tensor) -> torch.Tensor:
    """Inverse of dct_fft (orthonormal DCT-III) through one inverse FFT."""
    n = y.shape[-1]
    k = torch.arange(n, device=y.device, dtype=y.dtype)
    scaled = torch.cat([y[..., :1] * math.sqrt(2.0), y[..., 1:]], -1) * math.sqrt(n / 2.0)
    mirrored = torch.cat([torch.zeros_like(y[..., :1]), scaled[..., 1:].flip(-1)], -1)
    v = torch.fft.ifft(torch.complex(scaled, -mirrored) * torch.polar(torch.ones_like(k), math.pi * k / (2 * n)), dim=-1).real
    x = torch.empty_like(y)
    x[..., ::2] = v[..., : (n + 1) // 2]
    x[..., 1::2] = v[..., (n + 1) // 2 :].flip(-1)
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    print(f"| d | matrix ms | fft ms | fft / matrix |  ({args.tokens} vectors, DCT + inverse, {args.device})")
    print("|---|---|---|---|")
    for d in (64, 256, 1024):
        x = torch.randn(args.tokens, d, device=args.device)
        assert torch.allclose(idct_fft(dct_fft(x)), x, atol=1e-4) and torch.allclose(dct_fft(x), dct(x), atol=1e-4)
        med = race({"matrix": lambda x=x: idct(dct(x)), "fft": lambda x=x: idct_fft(dct_fft(x))}, args.repeats, args.device)
        m, f = med["matrix"] * 1e3, med["fft"] * 1e3
        print(f"| {d} | {m:.2f} | {f:.2f} | {f / m:.2f}x |")


if __name__ == "__main__":
    main()
