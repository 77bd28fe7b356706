"""Sparse execution: each operator of a routed layer computes only the tokens routed to it.

Everything that decides the shapes of that work lives here, so the layer (model.ChiarLayer)
and the MAC count (flops.py) take the same decisions from the same functions:

- `runs_dense`: which layers skip all this and run every operator on every token;
- `gather_order`: the routed tokens of each sequence, gathered in position order and padded;
- `query_block_ranges`, `key_length`, `round_up`: causal attention over gathered queries in
  blocks, each reading only the keys up to its last query, at rounded sizes;
- `merge_rows`, `prefixes`: reassembly and key slicing with cheap backward passes.

The invariant the blocked attention relies on: **gathered queries ascend along each row**
(real queries; the padding after them is masked as if at position 0). `gather_order`
establishes it with a stable sort. `causal_attention` relies on it for its savings: each
block reads the keys up to its largest position, which for ascending rows is small for early
blocks (5/8 of the keys on average with 4 blocks, the figure flops.py's "kernel" count uses);
for unordered rows every block would read nearly all keys. Results never depend on the order.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .operators import ATTN, DCT, RBF
from .routing import capacity_slots

# Queries are processed in blocks along the sequence so each block only reads the keys up to
# its last position: a causal mask over gathered queries would otherwise pay for all T keys.
QUERY_BLOCKS = 4
# Data-dependent sizes (routed query counts, key ranges) are rounded up to one of this many
# steps of the sequence length, so kernels that plan per shape (cuDNN attention,
# torch.compile) see few distinct shapes, at a cost of at most 1/SHAPE_STEPS extra work.
SHAPE_STEPS = 16


def runs_dense(cfg, ops: tuple[int, ...]) -> bool:
    """Whether a layer with these operators computes every operator on every token.

    Soft routing (and hard routing's published all-probability straight-through) blends every
    operator's output, so it needs them all; so does the published RBF, which is quadratic
    over all positions anyway; a layer with one operator has nothing to route.
    """
    published_rbf = RBF in ops and cfg.rbf == "reference_quadratic"
    return (cfg.execution == "dense" or cfg.routing == "soft" or len(ops) == 1 or published_rbf
            or (cfg.routing == "hard" and cfg.straight_through == "all"))


def round_up(n: int, limit: int) -> int:
    """n rounded up to a multiple of max(8, limit / SHAPE_STEPS), at most limit."""
    step = max(8, limit // SHAPE_STEPS)
    return min(-(-n // step) * step, limit)


def query_block_ranges(n_q: int) -> list[tuple[int, int]]:
    """(start, stop) of each block of n_q gathered queries: QUERY_BLOCKS blocks as equal as
    torch.tensor_split makes them, or one block when there are few queries."""
    blocks = QUERY_BLOCKS if n_q >= 4 * QUERY_BLOCKS else 1
    base, extra = divmod(n_q, blocks)
    bounds = [0]
    for i in range(blocks):
        bounds.append(bounds[-1] + base + (i < extra))
    return list(zip(bounds[:-1], bounds[1:], strict=True))


def key_length(last_position: int, n_k: int) -> int:
    """Keys a query block reads: those up to its last query's position, rounded up."""
    return round_up(last_position + 1, n_k)


def gather_order(selected: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) positions per row: the selected ones first, ascending, then unselected padding."""
    return torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :n]


# --------------------------------------------------------------------------- attention
def causal_attention(q, k, v, q_pos, key_mask, dropout: float, static: bool = False) -> torch.Tensor:
    """Causal softmax attention of queries (B, H, N, dh) at positions q_pos (B, N) or (N,),
    ascending along each row, over keys 0..Tk-1; key_mask (B, Tk) marks real keys.

    Blocks of queries read only a prefix of the keys (one host sync for all blocks);
    static=True reads all keys in one call instead (no host sync, shapes fixed by the inputs').
    """
    n_q, n_k = q.shape[2], k.shape[2]
    q_pos = q_pos.expand(q.shape[0], n_q) if q_pos.dim() == 1 else q_pos
    key_pos = torch.arange(n_k, device=q.device)
    if static:
        mask = key_pos <= q_pos[..., None]
        if key_mask is not None:
            mask = mask & key_mask[:, None, :]
            # A query that sees no real key is a pad whose output is discarded: let it see all
            # keys, rather than give NaNs that would reach real gradients through the backward.
            mask = mask | ~mask.any(-1, keepdim=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], dropout_p=dropout)
    ranges = query_block_ranges(n_q)
    pos_blocks = [q_pos[:, lo:hi] for lo, hi in ranges]
    # A block's largest position is the last key any of its queries may see (ascending rows:
    # small for early blocks).
    last_keys = torch.stack([p.amax() for p in pos_blocks]).tolist()
    return _blocks(q, k, v, ranges, pos_blocks, last_keys, key_mask, dropout)


def full_causal_blocks(q, k, v, dropout: float) -> torch.Tensor:
    """Causal attention where every position 0..T-1 queries, in query blocks over key prefixes.

    For kernels with no fused causal path (SDPA with dropout on CPU scores all T x T pairs, the
    masked half included) this computes 5/8 of the pairs with 4 blocks. The shapes depend on T
    only: no host sync, so it compiles with fullgraph=True.
    """
    n = q.shape[2]
    ranges = query_block_ranges(n)
    pos = torch.arange(n, device=q.device)
    pos_blocks = [pos[None, lo:hi] for lo, hi in ranges]  # (1, n): one mask for the batch
    return _blocks(q, k, v, ranges, pos_blocks, [hi - 1 for _, hi in ranges], None, dropout)


def _blocks(q, k, v, ranges, pos_blocks, last_keys, key_mask, dropout: float) -> torch.Tensor:
    """Each query block [lo, hi) with positions pos_blocks attends to the keys up to its last
    position (last_keys, host ints), masked causally and by key_mask."""
    n_k = k.shape[2]
    key_pos = torch.arange(n_k, device=q.device)
    key_lengths = [key_length(last, n_k) for last in last_keys]
    outputs = []
    for (lo, hi), pos_b, n_keys, k_b, v_b in zip(ranges, pos_blocks, key_lengths, prefixes(k, key_lengths),
                                                prefixes(v, key_lengths), strict=True):
        mask = key_pos[:n_keys] <= pos_b[..., None]  # (B, n, n_keys)
        if key_mask is not None:
            mask = mask & key_mask[:, None, :n_keys]
        outputs.append(F.scaled_dot_product_attention(q[:, :, lo:hi], k_b, v_b, attn_mask=mask[:, None],
                                                      dropout_p=dropout))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


# --------------------------------------------------------------------------- a layer's execution
def mix_sparse(layer, h, decision, k, v, pos, key_mask):
    """Each operator of layer (a model.ChiarLayer) computes only its own tokens: gather,
    compute, scatter.

    Every token is computed by exactly one operator, so the operators' row sets are disjoint
    and cover the batch: one copy per operator puts the outputs back in place.
    """
    b, t, d = h.shape
    flat_h = h.reshape(b * t, d)
    flat_ops = decision.ops.reshape(-1)
    rows, outputs = [], []
    for op in layer.ops:
        if op == DCT:
            mine = (flat_ops == DCT).nonzero().squeeze(1)
            rows.append(mine)
            outputs.append(layer.dct(flat_h.index_select(0, mine)))
        elif op == ATTN:
            mine, y = sparse_attention(layer.mixer, layer.causal, h, decision.ops == ATTN, k, v, pos, key_mask)
            rows.append(mine)
            outputs.append(y)
        else:  # RBF is linear in T: it runs over the layer's positions, keeps its own tokens
            mine = (flat_ops == RBF).nonzero().squeeze(1)
            mixer = layer.mixer
            y = mixer.project_out(mixer.rbf(mixer.queries(h, pos), k, v, key_mask, layer.causal))
            rows.append(mine)
            outputs.append(y.reshape(b * t, d).index_select(0, mine))
    return merge_rows(b * t, rows, outputs).view(b, t, d)


def sparse_attention(mixer, causal: bool, h, selected, k, v, pos, key_mask):
    """Queries (and the output projection) of mixer (a layers.TokenMixer) for the selected
    tokens only; keys of all tokens. Returns the selected tokens' flat row indices and outputs."""
    b, t, d = h.shape
    counts = selected.sum(1)
    n, fewest = torch.stack([counts.max(), counts.min()]).tolist()  # one host sync
    if n == 0:
        return selected.new_zeros(0, dtype=torch.long), h.new_zeros(0, d)
    if fewest == t:  # every token attends: no gather needed
        y = mixer.project_out(mixer.attend(mixer.queries(h, pos), k, v, pos, key_mask, causal))
        return torch.arange(b * t, device=h.device), y.reshape(b * t, d)
    # Padded with unselected tokens (whose outputs are dropped) up to a rounded count, so
    # shapes repeat across batches.
    n = round_up(n, t)
    idx = gather_order(selected, n)
    valid = torch.arange(n, device=h.device) < counts[:, None]
    hq = h.gather(1, idx[..., None].expand(b, n, d))
    q = mixer.queries(hq, pos[idx])
    # Padding queries are masked as if at position 0 (key 0 only): whatever their real
    # positions, they must not widen the key range that real queries' blocks read.
    y = mixer.project_out(mixer.attend(q, k, v, torch.where(valid, pos[idx], 0), key_mask, causal))
    rows = torch.arange(b, device=h.device)[:, None] * t + idx
    if fewest == n:  # equal counts, no padding (top-k): skip the boolean-mask copies
        return rows.reshape(-1), y.reshape(-1, d)
    return rows[valid], y[valid]


def mix_static(layer, h, decision, k, v, pos, key_mask, offset: int):
    """Static shapes: the cheap operators (DCT, linear-time RBF) on every token, attention on
    a fixed number of query slots per sequence (the most the routing can send), written over them.

    Per sequence, the slots hold the attention tokens in position order, padded with other
    tokens whose attention output is discarded. No host sync and no data-dependent shape, so
    torch.compile(fullgraph=True) and CUDA graphs can take the whole step.
    """
    b, t, d = h.shape
    selected = decision.ops == ATTN
    cheap = tuple(op for op in layer.ops if op != ATTN)
    base = layer.mix_dense(h, decision, k, v, pos, key_mask, cheap)
    n = capacity_slots(layer.slot_rate, offset, t)
    if n == 0:
        return base
    idx = gather_order(selected, n)
    valid = selected.gather(1, idx)
    rows = idx[..., None].expand(b, n, d)
    q_pos = pos[idx]
    q = layer.mixer.queries(h.gather(1, rows), q_pos)
    y = layer.mixer.project_out(layer.mixer.attend(q, k, v, q_pos, key_mask, layer.causal, static=True))
    # Padding slots keep their token's cheap output, so the scatter rewrites it unchanged.
    y = torch.where(valid[..., None], y.to(base.dtype), base.gather(1, rows))
    return base.scatter(1, rows, y)


# --------------------------------------------------------------------------- autograd helpers
# Autograd's default backward for a slice or a row gather allocates a zero tensor the size of
# the whole input and scatters into it, once per slice. Sparse execution slices the same keys
# once per query block and reassembles every token from per-operator pieces, so on a CPU those
# full-size zero fills and accumulations were a tenth of the routed sub-layer's time
# (docs/benchmarks.md). These two functions do the same work with one buffer and plain copies.
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
