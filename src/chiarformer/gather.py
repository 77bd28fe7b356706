"""Autograd-friendly slicing and reassembly for sparse execution.

Autograd's default backward for a slice or a row gather allocates a zero tensor the size of
the whole input and scatters into it, once per slice. Sparse execution slices the same keys
once per query block and reassembles every token from per-operator pieces, so on a CPU those
full-size zero fills and accumulations were a tenth of the routed sub-layer's time
(docs/benchmarks.md). These two functions do the same work with one buffer and plain copies.
"""

from __future__ import annotations

import functools

import torch


class _Prefixes(torch.autograd.Function):
    """Views x[:, :, :n] for each n; the backward adds their gradients into one buffer."""

    @staticmethod
    def forward(ctx, x, lengths):
        ctx.shape, ctx.lengths = x.shape, lengths
        return tuple(x[:, :, :n] for n in lengths)

    @staticmethod
    def backward(ctx, *grads):
        total = None
        for n, grad in sorted(zip(ctx.lengths, grads, strict=True), key=lambda pair: -pair[0]):
            if grad is None:
                continue
            if total is None:  # the longest prefix first: one zero fill past its end only
                total = _empty_like_layout(grad, ctx.shape)
                total[:, :, :n] = grad
                total[:, :, n:] = 0
            else:
                total[:, :, :n] += grad
        return total, None


def _empty_like_layout(t: torch.Tensor, shape) -> torch.Tensor:
    """An empty tensor of the given shape whose dimensions lie in memory in t's order, so
    copies and additions between the two run contiguously."""
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))  # outermost dimension first
    inverse = sorted(range(t.dim()), key=order.__getitem__)
    return t.new_empty([shape[i] for i in order]).permute(*inverse)


def prefixes(x: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, ...]:
    """x[:, :, :n] for every n in lengths (dim 2: the key axis of (B, H, T, dh) tensors)."""
    return _Prefixes.apply(x, lengths)


class _MergeRows(torch.autograd.Function):
    """out[rows_i] = values_i for disjoint row sets covering every row of out."""

    @staticmethod
    def forward(ctx, n_rows, rows, *values):
        # Pieces may differ in dtype under autocast (an empty piece keeps its input's dtype).
        dtype = functools.reduce(torch.promote_types, (v.dtype for v in values))
        out = values[0].new_empty(n_rows, *values[0].shape[1:], dtype=dtype)
        for r, v in zip(rows, values, strict=True):
            out.index_copy_(0, r, v.to(dtype))
        ctx.rows, ctx.dtypes = rows, [v.dtype for v in values]
        return out

    @staticmethod
    def backward(ctx, grad):
        return (None, None, *(grad.index_select(0, r).to(dtype) for r, dtype in zip(ctx.rows, ctx.dtypes, strict=True)))


def merge_rows(n_rows: int, rows: list[torch.Tensor], values: list[torch.Tensor]) -> torch.Tensor:
    """Rows of an (n_rows, ...) tensor taken from values[i] at indices rows[i].

    The row sets must be disjoint and cover 0..n_rows-1 (every token is computed by exactly
    one operator); the backward pass is then one gather per piece.
    """
    return _MergeRows.apply(n_rows, rows, *values)
