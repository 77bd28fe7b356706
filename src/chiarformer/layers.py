"""The token operators of a CHIAR-Former layer and the pieces they are made of.

- `DCTMixer`: per-token spectral filter iDCT(DCT(x) * w); mixes features, never tokens.
- `TokenMixer`: Q/K/V/O projections shared by the layer's token-mixing kernels:
  causal softmax attention (RoPE) and random-feature RBF kernel attention.
  K and V are computed for every token; Q and the output projection only for the tokens
  routed to a kernel (sparse execution), so tokens sent to the DCT skip them.
- `FeedForward`: the FFN every token of a layer shares.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops import dct, dct_matrix, idct, resolve_impl
from .sparse import causal_attention, full_causal_blocks

# Training with attention dropout on CPU from this context length on: query blocks over key
# prefixes (sparse.full_causal_blocks) instead of SDPA, which has no fused kernel for dropout
# there and scores all T x T pairs. Below it the blocks' fixed costs win (measured crossover
# between T 64 and 128: `benchmarks/bench_peers.py`, docs/benchmarks.md).
BLOCKED_DROPOUT_MIN_T = 128

# Chunk length of the causal linear-time RBF kernel attention.
RBF_CHUNK = 64


class DCTMixer(nn.Module):
    """x -> iDCT(DCT(x) * w) along features, w initialised to ones (the identity filter).

    With the matmul DCT it is applied as one d x d matrix C^T diag(w) C (one matrix-vector
    product per token instead of two); without gradients that matrix is kept until the
    filter changes, so token-by-token decoding does not rebuild it (d^3) at every step.
    scale=2 reproduces the published operator, whose DCT round trip returns 2x (SPEC §3.3).
    """

    def __init__(self, d_model: int, scale: float = 1.0, impl: str = "auto"):
        super().__init__()
        self.filter = nn.Parameter(torch.ones(d_model))
        self.scale = scale
        self.impl = impl
        self._frozen: tuple | None = None  # (key, matrix) built without gradients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolve_impl(self.impl) == "fft":
            return idct(dct(x, "fft") * (self.filter * self.scale).to(x.dtype), "fft")
        return x @ self.operator(x.device, x.dtype).T

    def operator(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (self.filter._version, self.filter.data_ptr(), device, dtype)
        if not torch.is_grad_enabled() and self._frozen is not None and self._frozen[0] == key:
            return self._frozen[1]
        c = dct_matrix(self.filter.shape[0], device, dtype)
        matrix = c.T @ (c * (self.filter.to(dtype) * self.scale)[:, None])
        self._frozen = (key, matrix) if not torch.is_grad_enabled() else None
        return matrix


class FeedForward(nn.Module):
    """down(drop_inner(GELU(up(x)))), dropped; inner dropout is the published placement (else 0)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, inner_dropout: float = 0.0):
        super().__init__()
        self.up = nn.Linear(d_model, d_ff)
        self.down = nn.Linear(d_ff, d_model)
        self.inner_dropout = nn.Dropout(inner_dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.inner_dropout(F.gelu(self.up(x)))))


class ReferenceRBF(nn.Module):
    """The published RBF operator (RBFMix, v1 ablation), NON-CAUSAL and quadratic in T.

    On x itself: phi = [cos(x W / sqrt R), sin(x W / sqrt R)] with fixed W (d, R) ~ N(0, 2 gamma),
    every position attends to every position by softmax(phi phi^T) (no causal mask), then a
    projection 2R -> d and the operator's own FFN. Its LayerNorm is the layer's (per operator).
    Padding keys (key_mask) are excluded; the published code has no padding mask.
    """

    def __init__(self, cfg, inner_dropout: float):
        super().__init__()
        r = cfg.rbf_features
        self.register_buffer("omega", torch.randn(cfg.d_model, r) * math.sqrt(2.0 * cfg.rbf_gamma))
        self.proj = nn.Linear(2 * r, cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, inner_dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        angles = x @ self.omega.to(x.dtype) / math.sqrt(self.omega.shape[1])
        phi = torch.cat([angles.cos(), angles.sin()], dim=-1)
        scores = phi @ phi.transpose(-1, -2)
        if key_mask is not None:
            scores = scores.masked_fill(~key_mask[:, None, -x.shape[1]:], float("-inf"))
        return self.ffn(self.proj(torch.softmax(scores, dim=-1) @ phi))


def rope_inv_freq(half: int, base: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """RoPE's frequencies base^(-2i/dh) for the half = dh/2 feature pairs."""
    return base ** (-torch.arange(half, device=device, dtype=dtype) / half)


def rope(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of x (B, H, N, dh) at integer positions pos (B, N) or (N,):
    feature pairs (i, i + dh/2) rotated by the angle pos * base^(-2i/dh)."""
    half = x.shape[-1] // 2
    inv_freq = rope_inv_freq(half, base, x.device)
    angles = pos.to(torch.float32)[..., None] * inv_freq  # (B, N, half) or (N, half)
    if angles.dim() == 3:
        angles = angles[:, None]  # broadcast over heads
    return _Rotate.apply(x, angles.cos().to(x.dtype), angles.sin().to(x.dtype))


class _Rotate(torch.autograd.Function):
    """A rotation by (cos, sin); its gradient is the rotation back, by (cos, -sin).

    Two multiplies and two multiply-adds into one output buffer, forward and backward: about
    half the time of autograd through the element-wise formula and its concatenation.
    """

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        x1, x2 = x.chunk(2, dim=-1)
        if torch.compiler.is_compiling():  # it refuses out= into views, and fuses the formula anyway
            return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
        out = torch.empty_like(x)
        out1, out2 = out.chunk(2, dim=-1)
        torch.mul(x1, cos, out=out1).addcmul_(x2, sin, value=-1)  # x1 cos - x2 sin
        torch.mul(x1, sin, out=out2).addcmul_(x2, cos)  # x1 sin + x2 cos
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _Rotate.apply(grad, cos, -sin), None, None


class TokenMixer(nn.Module):
    """Projections plus the two kernels that mix tokens: softmax attention and RBF."""

    def __init__(self, cfg, with_rbf: bool):
        super().__init__()
        d = cfg.d_model
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.rope_base = cfg.rope_base
        self.dropout = cfg.dropout
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)
        if with_rbf:
            # Fixed Gaussian frequencies: E[cos(w.(q - k))] = exp(-gamma |q - k|^2 / 2).
            freqs = torch.randn(self.head_dim, cfg.rbf_features) * math.sqrt(cfg.rbf_gamma)
            self.register_buffer("rbf_freqs", freqs)

    # ------------------------------------------------------------------ projections
    def heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)

    def keys_values(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE'd keys and values (B, H, T, dh) for every token of x (B, T, d)."""
        k, v = self.kv(x).chunk(2, dim=-1)
        return rope(self.heads(k), pos, self.rope_base), self.heads(v)

    def queries(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return rope(self.heads(self.q(x)), pos, self.rope_base)

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, N, dh) head outputs -> (B, N, d)."""
        b, _, n, _ = y.shape
        return self.out(y.transpose(1, 2).reshape(b, n, -1))

    # ------------------------------------------------------------------ kernels
    def attend(self, q, k, v, q_pos, key_mask, causal: bool, static: bool = False) -> torch.Tensor:
        """Softmax attention of queries at positions q_pos (B, N) over keys 0..Tk-1.

        Causal: query at position p sees keys 0..p. key_mask (B, Tk) marks real (non-pad) keys.
        Queries that are not every position once (gathered, padded or cached) go to
        sparse.causal_attention, whose invariant (positions ascend along each row) they keep.
        """
        dropout = self.dropout if self.training else 0.0
        n_q, n_k = q.shape[2], k.shape[2]
        full_causal = causal and key_mask is None and n_q == n_k and q_pos.dim() == 1
        if full_causal:  # every position queries
            if dropout and q.device.type == "cpu" and n_q >= BLOCKED_DROPOUT_MIN_T:
                return full_causal_blocks(q, k, v, dropout)
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        if not causal:
            mask = None if key_mask is None else key_mask[:, None, None, :]
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return causal_attention(q, k, v, q_pos, key_mask, dropout, static)

    def rbf_features(self, x: torch.Tensor) -> torch.Tensor:
        proj = x @ self.rbf_freqs.to(x.dtype)
        return torch.cat([proj.cos(), proj.sin()], dim=-1) / math.sqrt(self.rbf_freqs.shape[1])

    def rbf(self, q, k, v, key_mask, causal: bool) -> torch.Tensor:
        """RBF kernel attention for queries at the last q.shape[2] positions of the keys.

        out_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / (t + 1), by chunked prefix sums: O(T R dh)
        time, O(R dh) state. Random-feature kernel estimates can be negative, so dividing by
        their sum (as softmax attention does) is unstable; the count is not. (The published
        operator is ReferenceRBF.)
        """
        fq, fk = self.rbf_features(q), self.rbf_features(k)
        if key_mask is not None:
            fk = fk * key_mask[:, None, :, None].to(fk.dtype)
        if not causal:
            count = k.shape[2] if key_mask is None else key_mask.sum(-1)[:, None, None, None].clamp_min(1)
            return (fq @ (fk.transpose(-1, -2) @ v)) / count
        n_q, n_k = q.shape[2], k.shape[2]
        offset = n_k - n_q  # queries are the last n_q positions (generation with a cache)
        state = q.new_zeros(q.shape[0], q.shape[1], fk.shape[-1], v.shape[-1])
        outputs = []
        for start in range(0, n_k, RBF_CHUNK):
            stop = min(start + RBF_CHUNK, n_k)
            if stop > offset:
                q_lo = max(start, offset)
                fq_c = fq[:, :, q_lo - offset : stop - offset]
                scores = fq_c @ fk[:, :, start:stop].transpose(-1, -2)
                causal_mask = torch.arange(start, stop, device=q.device) <= torch.arange(q_lo, stop, device=q.device)[:, None]
                outputs.append(fq_c @ state + (scores * causal_mask) @ v[:, :, start:stop])
            state = state + fk[:, :, start:stop].transpose(-1, -2) @ v[:, :, start:stop]
        if key_mask is None:
            count = torch.arange(offset + 1, n_k + 1, device=q.device, dtype=q.dtype)[:, None]
        else:  # real keys only, so left padding does not dilute the average
            count = key_mask.cumsum(-1)[:, None, offset:, None].clamp_min(1).to(q.dtype)
        return torch.cat(outputs, dim=2) / count
