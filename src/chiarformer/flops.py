"""Analytic multiply-add (MAC) accounting for CHIAR-Former and its full-attention baseline.

Counts forward multiply-adds per token (an average over the T positions of a sequence; per
sequence = per token x T) for every component, per layer, as this package's model executes them
(src/chiarformer/model.py, layers.py, ops.py):

=============  ===========================================================================
component      what is counted (d = d_model, V = vocab, f = the layer's share of a token kind)
=============  ===========================================================================
head           d*V: final hidden state times the tied embedding (the LM head); every token.
               (A bidirectional classifier instead pools once per sequence: (d^2 + d C) / T.)
qkv            K and V (2 d^2) for EVERY token of a layer that has attention or RBF (later
               attention queries need all earlier keys); Q (d^2) only for the tokens whose
               query is computed (attention-routed tokens; see "RBF" below)
scores         attention QK^T and the weighted sum of V: 2 d keys-per-query MACs per query;
               the number of keys per query follows the `scores` convention (below)
out_proj       output projection d^2, for the tokens that computed a query
ffn            2 d d_ff, every token of every layer (one FFN shared by all operators)
dct            DCT operator iDCT(DCT(x) * w), for DCT-routed tokens. layers.DCTMixer applies it
               as ONE fused d x d matrix C^T diag(w) C (d^2 per token), built once per forward
               call of each layer that has a DCT operator (d^3 per call, whatever the batch;
               counted per token only when a batch size is given: d^3 / (batch * T))
rbf            random-feature kernel attention, chunked prefix sums (layers.TokenMixer.rbf)
router         routed layers: the spectral entropy of every token (one DCT, d^2, + 2d for the
               squares and p log p); soft/hard routing adds the Linear (d+1) -> n_ops
meta_router    MetaRouter gate Linear(d -> 1) per token (causal prefix mean) when enabled
=============  ===========================================================================

Not counted (negligible or not multiply-adds): LayerNorms (O(d) per token per sub-layer),
GELU, softmax, RoPE rotations, residual adds, dropout, the embedding lookup, the loss.
A training step costs about 3x the forward (the backward pass is about twice the forward's
matrix work), except the routers' spectral entropy, which has no backward pass (counted once).

Conventions for the attention scores (`scores=`):
  causal  (default) the useful causal work: the query at position t attends t + 1 keys, so
          a query attends (T + 1) / 2 keys on average (routed queries are assumed spread
          evenly over positions); bidirectional attention attends T.
  kernel  the shapes this code hands to its kernels, which is what
          torch.utils.flop_counter.FlopCounterMode counts: the fused causal kernel of an
          attention-only layer gets the full T x T problem, and routed queries are cut into
          blocks (sparse.query_block_ranges), each reading the keys up to its last query (5/8
          of T on average with 4 blocks), at the sizes sparse.round_up gives the kernels; RBF
          chunks count their full square.
  full    every query against all T keys (the convention behind SPEC §3.8's figures).
DCT cost (`dct_cost=`): "matmul" (default, what ops.dct executes: d^2 per transform) or
"fft" (a nominal d log2 d per transform, the O(d log d) the paper assumes).

Execution: with sparse execution (the default) each operator runs on its own tokens, except
that RBF, being linear in T, runs over all positions of its layer (queries and output
projection for every token) as soon as any token takes it. Dense execution (the published
behaviour) and soft routing run every operator on every token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import ChiarConfig
from .errors import UserError
from .layers import RBF_CHUNK
from .operators import ATTN, DCT, RBF, Op, layer_letters
from .routing import capacity_slots, static_slot_rate
from .sparse import key_length, query_block_ranges, round_up, runs_dense

COMPONENTS = ("head", "qkv", "scores", "out_proj", "ffn", "dct", "rbf", "router", "meta_router")
# Components of the token-mixing ("attention") sub-layer: everything but FFN and head.
MIXING = ("qkv", "scores", "out_proj", "dct", "rbf", "router", "meta_router")
SCORE_CONVENTIONS = ("causal", "kernel", "full")
DCT_COSTS = ("matmul", "fft")
TRAIN_FACTOR = 3  # training step ~ forward + backward (2x forward)


@dataclass
class LayerFlops:
    index: int
    ops: tuple[int, ...]
    shares: dict[int, float]  # operator id -> share of the layer's tokens
    macs: dict[str, float]  # component -> forward MACs per token

    @property
    def mixing(self) -> float:
        return sum(v for k, v in self.macs.items() if k in MIXING)

    @property
    def total(self) -> float:
        return sum(self.macs.values())


@dataclass
class FlopsCount:
    """Forward multiply-adds of one configuration at one sequence length."""

    config: ChiarConfig
    seq_len: int
    scores: str
    dct_cost: str
    layers: list[LayerFlops]
    model_macs: dict[str, float] = field(default_factory=dict)  # head, meta_router (per token)
    batch_size: int | None = None  # sequences per call, when the per-call DCT build is folded in

    @property
    def per_call(self) -> float:
        """MACs per forward call that do not scale with tokens: building the fused DCT operators.

        Included in the per-token numbers only when batch_size was given.
        """
        if self.dct_cost != "matmul":
            return 0.0
        return float(sum(DCT in layer.ops for layer in self.layers)) * float(self.config.d_model) ** 3

    def component(self, name: str) -> float:
        """Forward MACs per token of one component, summed over layers."""
        return self.model_macs.get(name, 0.0) + sum(layer.macs.get(name, 0.0) for layer in self.layers)

    def components(self) -> dict[str, float]:
        return {name: self.component(name) for name in COMPONENTS}

    @property
    def forward_per_token(self) -> float:
        return sum(self.components().values())

    @property
    def forward_per_sequence(self) -> float:
        return self.forward_per_token * self.seq_len

    @property
    def entropy_per_token(self) -> float:
        """Forward MACs of the routers' spectral entropy (not differentiated)."""
        return sum(len(layer.ops) > 1 for layer in self.layers) * entropy_macs(self.config.d_model, self.dct_cost)

    @property
    def train_per_token(self) -> float:
        return training_macs(self.forward_per_token, self.entropy_per_token)

    @property
    def mixing_per_token(self) -> float:
        """The token-mixing ("attention") sub-layers: all but FFN and head."""
        return sum(self.component(name) for name in MIXING)

    @property
    def attention_share_per_layer(self) -> list[float]:
        return [layer.shares.get(ATTN, 0.0) for layer in self.layers]

    def to_dict(self) -> dict:
        return {
            "layout": self.config.layout,
            "seq_len": self.seq_len,
            "forward_per_token": self.forward_per_token,
            "forward_per_sequence": self.forward_per_sequence,
            "train_step_per_token": self.train_per_token,
            "train_step_per_sequence": self.train_per_token * self.seq_len,
            "attention_sublayer_per_token": self.mixing_per_token,
            "components": self.components(),
            "attention_share_per_layer": self.attention_share_per_layer,
            "per_call_dct_build": self.per_call,
            "per_call_included": self.batch_size is not None,
            "layers": [
                {
                    "layer": layer.index + 1,
                    "ops": layer_letters(layer.ops),
                    "shares": {Op(op).key: share for op, share in layer.shares.items()},
                    "components": dict(layer.macs),
                    "attention_sublayer": layer.mixing,
                    "total": layer.total,
                }
                for layer in self.layers
            ],
        }


# --------------------------------------------------------------------------- shares
def layer_shares(ops: tuple[int, ...], attn_fraction: float, rbf_fraction: float | None = None) -> dict[int, float]:
    """Share of a layer's tokens per operator.

    A single-operator layer gives it every token. In a routed layer attention takes
    attn_fraction; RBF takes rbf_fraction, by default an equal split of what attention leaves
    with the DCT ((1 - f) / 2), or attn_fraction itself in a layer without attention; the DCT
    takes the rest.
    """
    if len(ops) == 1:
        return {ops[0]: 1.0}
    shares: dict[int, float] = {}
    if ATTN in ops:
        shares[ATTN] = attn_fraction
    if RBF in ops:
        if rbf_fraction is not None:
            shares[RBF] = rbf_fraction
        elif ATTN not in ops:
            shares[RBF] = attn_fraction
        elif DCT in ops:
            shares[RBF] = (1.0 - attn_fraction) / 2.0
        else:
            shares[RBF] = 1.0 - attn_fraction
    if DCT in ops:
        shares[DCT] = 1.0 - sum(shares.values())
    elif len(shares) == 2 and abs(sum(shares.values()) - 1.0) > 1e-9:
        raise UserError(f"operator shares {shares} of a layer without DCT must sum to 1")
    for op, share in shares.items():
        if not -1e-9 <= share <= 1.0 + 1e-9:
            raise UserError(f"share of operator {Op(op).key} is {share:.3f}; it must lie in [0, 1]")
        shares[op] = min(max(share, 0.0), 1.0)
    return {op: shares[op] for op in ops}


# --------------------------------------------------------------------------- counting
def count_flops(
    cfg: ChiarConfig,
    seq_len: int | None = None,
    attn_fraction: float | list[float] | None = None,
    rbf_fraction: float | list[float] | None = None,
    scores: str = "causal",
    dct_cost: str = "matmul",
    batch_size: int | None = None,
) -> FlopsCount:
    """Forward MACs per token of the causal LM described by cfg, at sequence length seq_len.

    attn_fraction / rbf_fraction: the share of each routed layer's tokens sent to attention /
    RBF (a number for all routed layers, or a list with one entry per routed layer);
    attn_fraction defaults to cfg.attn_fraction. batch_size: sequences per forward call; when
    given, the per-call cost of building the fused DCT operator (d^3 per DCT layer) is spread
    over the batch's tokens and included; when None it is left out (it vanishes per token as the
    batch grows) and reported by FlopsCount.per_call.
    """
    if scores not in SCORE_CONVENTIONS:
        raise UserError(f"scores={scores!r} is not one of {', '.join(SCORE_CONVENTIONS)}")
    if dct_cost not in DCT_COSTS:
        raise UserError(f"dct_cost={dct_cost!r} is not one of {', '.join(DCT_COSTS)}")
    t = cfg.max_seq_len if seq_len is None else int(seq_len)
    if t < 1:
        raise UserError(f"sequence length must be positive, got {t}")
    routed = cfg.routed_layers
    f_attn = _per_routed(attn_fraction if attn_fraction is not None else cfg.attn_fraction, routed, "attn_fraction")
    f_rbf = _per_routed(rbf_fraction, routed, "rbf_fraction")

    layers = []
    for i, ops in enumerate(cfg.layer_ops):
        j = routed.index(i) if i in routed else None
        shares = layer_shares(ops, f_attn[j] if j is not None else 1.0, f_rbf[j] if j is not None else None)
        layers.append(LayerFlops(i, ops, shares, _layer_macs(cfg, ops, shares, t, scores, dct_cost, j is not None, batch_size)))

    d = cfg.d_model
    if cfg.bidirectional:  # classifier: MLP head on the mean-pooled state, once per sequence
        model_macs = {"head": float(d * d + d * cfg.n_classes) / t}
    else:  # causal LM: the tied LM head on every token
        model_macs = {"head": float(d * cfg.vocab_size)}
    if cfg.meta_router == "causal":
        model_macs["meta_router"] = float(d)
    return FlopsCount(cfg, t, scores, dct_cost, layers, model_macs, batch_size)


def _per_routed(value, routed: list[int], name: str) -> list:
    if value is None or isinstance(value, (int, float)):
        out = [None if value is None else float(value)] * len(routed)
    else:
        out = [None if v is None else float(v) for v in value]
        if len(out) != len(routed):
            raise UserError(f"{name} lists {len(out)} value(s) but the layout has {len(routed)} routed layer(s)")
    for v in out:
        if v is not None and not 0.0 <= v <= 1.0:
            raise UserError(f"{name} must lie in [0, 1], got {v}")
    return out


def _transform_macs(d: int, dct_cost: str) -> float:
    """One DCT of a d-vector."""
    return d * d if dct_cost == "matmul" else d * math.log2(d)


def training_macs(forward: float, entropy: float) -> float:
    """A training step's MACs from the forward's: the backward costs ~2x the forward, except the
    routing entropy (`entropy` of the forward MACs), which is not differentiated."""
    return TRAIN_FACTOR * (forward - entropy) + entropy


def entropy_macs(d: int, dct_cost: str) -> float:
    """Spectral entropy of one token: one DCT, the squares, p log p."""
    return _transform_macs(d, dct_cost) + 2.0 * d


def _layer_macs(cfg, ops, shares, t: int, scores: str, dct_cost: str, routed: bool, batch_size=None) -> dict[str, float]:
    d, d_ff = cfg.d_model, cfg.d_ff
    dense = runs_dense(cfg, ops)  # the layer's own decision (model.ChiarLayer.dense)
    p_dct, p_attn, p_rbf = shares.get(DCT, 0.0), shares.get(ATTN, 0.0), shares.get(RBF, 0.0)
    macs = {name: 0.0 for name in ("qkv", "scores", "out_proj", "ffn", "dct", "rbf", "router")}
    macs["ffn"] = 2.0 * d * d_ff

    transform = _transform_macs(d, dct_cost)
    if routed:
        macs["router"] = entropy_macs(d, dct_cost)
        if cfg.routing in ("soft", "hard"):
            macs["router"] += (d + 1.0) * len(ops)

    # Which tokens each operator actually runs on (execution shares). Fixed query slots
    # (model.ChiarLayer.mix_static) run the DCT on every token and attention on all slots.
    rate = static_slot_rate(cfg) if routed else None
    static = rate is not None and not dense and ATTN in ops
    run_dct = (1.0 if dense or static else p_dct) if DCT in ops else 0.0
    run_attn = (1.0 if dense else p_attn) if ATTN in ops else 0.0
    if static:
        run_attn = capacity_slots(rate, 0, t) / t
    run_rbf = (1.0 if (dense or p_rbf > 0) else 0.0) if RBF in ops else 0.0  # RBF runs over all positions

    if run_dct:
        # the fused operator: one d x d product per token (an FFT-style DCT would need two
        # transforms and the filter multiplies)
        macs["dct"] = run_dct * (d * d if dct_cost == "matmul" else 2.0 * transform + d)
    if DCT in ops and dct_cost == "matmul" and batch_size:
        # building C^T diag(w) C: d^3 once per call, even when no token takes the DCT
        macs["dct"] += float(d) ** 3 / (batch_size * t)

    # The published RBF brings its own projections (counted in "rbf"), not the TokenMixer's.
    mixer_rbf = RBF in ops and cfg.rbf != "reference_quadratic"
    if ATTN in ops or mixer_rbf:
        if dense:
            q_share = 1.0  # one query projection shared by both kernels
            out_share = (ATTN in ops) + mixer_rbf  # each kernel's output is projected
        else:
            q_share = out_share = run_attn + run_rbf
        macs["qkv"] = 2.0 * d * d + q_share * d * d
        macs["out_proj"] = out_share * d * d

    if run_attn:
        # fixed slots read every key in one call (kernel convention: the shapes handed over)
        if static and scores == "kernel":
            keys = float(t)
        else:
            keys = _keys_per_query(t, run_attn, scores, bidirectional=cfg.bidirectional)
        macs["scores"] = run_attn * 2.0 * d * keys
    if run_rbf:
        macs["rbf"] = run_rbf * _rbf_per_token(cfg, t, scores)
    return macs


def _keys_per_query(t: int, share: float, scores: str, bidirectional: bool = False) -> float:
    """Average number of keys a query multiplies with, under the chosen convention."""
    if bidirectional or scores == "full":
        return float(t)
    if scores == "causal":
        return (t + 1) / 2.0
    # kernel: the fused causal call sees T x T; gathered queries, padded to a rounded count,
    # go in blocks, each reading the keys up to its last query (sparse.causal_attention)
    n = max(1, round(share * t))
    if n >= t:
        return float(t)
    total = 0.0
    for lo, hi in query_block_ranges(round_up(n, t)):
        real = min(hi, n)  # padding queries come last, masked as if at position 0
        # with queries spread evenly, the last of the first `real` queries sits at about real * T / n
        last_position = min(t, math.ceil(real * t / n)) - 1 if real > lo else 0
        total += (hi - lo) * key_length(last_position, t)
    return total / n


def _rbf_per_token(cfg: ChiarConfig, t: int, scores: str) -> float:
    """RBF kernel attention MACs per position (all positions run it; see module docstring)."""
    d, heads, r = cfg.d_model, cfg.n_heads, cfg.rbf_features
    features = 2.0 * r * d  # phi(q) and phi(k): (dh x R) per head, for queries and keys
    if cfg.rbf == "reference_quadratic":  # published RBFMix: x W, unmasked T x T phi phi^T, A phi, 2R -> d, own FFN
        return d * r + t * 4.0 * r + 2.0 * r * d + 2.0 * d * cfg.d_ff
    if cfg.bidirectional:
        return features + 2.0 * (2.0 * r * d)  # phi(K)^T V once, phi(Q) times it
    # causal_linear, in chunks of RBF_CHUNK: state update phi(k) v^T and readout phi(q) S
    # (2R x dh each per head), plus the masked square inside each chunk.
    chunks = [min(RBF_CHUNK, t - s) for s in range(0, t, RBF_CHUNK)]
    if scores == "causal":
        inner = sum(c * (c + 1) / 2.0 for c in chunks) / t
    else:
        inner = sum(c * c for c in chunks) / t
    return features + 2.0 * (2.0 * r * d) + inner * (2.0 * r * heads + d)


# --------------------------------------------------------------------------- comparison
def baseline_config(cfg: ChiarConfig) -> ChiarConfig:
    """The full-attention baseline of the same size: every layer attention, no MetaRouter."""
    return cfg.replace(layout="baseline", meta_router="none", routing="threshold", tau=None, allow_noncausal=True)


def paper_attention_reduction(count: FlopsCount) -> float:
    """The paper's figure: 1 - mean over layers of the share of tokens that take attention.

    It counts attention sub-layer evaluations avoided, each as one unit, whatever it costs:
    K/V projections, the DCT, the router, the FFN and the LM head are all left out.
    """
    shares = count.attention_share_per_layer
    return 1.0 - sum(shares) / len(shares)


@dataclass
class Comparison:
    baseline: FlopsCount
    chiar: FlopsCount

    @property
    def attention_reduction(self) -> float:
        """1 - token-mixing sub-layer MACs of CHIAR / those of the baseline (DCT, router, K/V included)."""
        return 1.0 - self.chiar.mixing_per_token / self.baseline.mixing_per_token

    @property
    def total_reduction(self) -> float:
        """1 - all forward MACs of CHIAR / those of the baseline (FFN and LM head included)."""
        return 1.0 - self.chiar.forward_per_token / self.baseline.forward_per_token

    @property
    def paper_attention_reduction(self) -> float:
        return paper_attention_reduction(self.chiar)

    def to_dict(self) -> dict:
        base, chiar = self.baseline, self.chiar
        return {
            "seq_len": chiar.seq_len,
            "conventions": {
                "scores": chiar.scores,
                "dct_cost": chiar.dct_cost,
                "batch_size": chiar.batch_size,
                "unit": "multiply-adds (MACs)",
            },
            "attention_reduction": self.attention_reduction,
            "total_reduction": self.total_reduction,
            "paper_attention_reduction": self.paper_attention_reduction,
            "train_step_factor": TRAIN_FACTOR,
            "components": {
                name: {"baseline": base.component(name), "chiar": chiar.component(name)} for name in COMPONENTS
            },
            "baseline": base.to_dict(),
            "chiar": chiar.to_dict(),
        }


def compare(cfg: ChiarConfig, seq_len: int | None = None, **kwargs) -> Comparison:
    """CHIAR (cfg) against the full-attention baseline of the same size."""
    base_kwargs = {k: v for k, v in kwargs.items() if k in ("scores", "dct_cost", "batch_size")}
    return Comparison(count_flops(baseline_config(cfg), seq_len, **base_kwargs), count_flops(cfg, seq_len, **kwargs))


# --------------------------------------------------------------------------- text
def _fmt(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3f}{unit}"
    return f"{x:.0f}"


def _runs(values: list[float]) -> str:
    """0.00, 0.50 x26, 1.00: repeated neighbours collapsed."""
    parts: list[list] = []
    for v in values:
        text = f"{v:.2f}"
        if parts and parts[-1][0] == text:
            parts[-1][1] += 1
        else:
            parts.append([text, 1])
    return ", ".join(t if n == 1 else f"{t} x{n}" for t, n in parts)


def format_comparison(cmp: Comparison, preset: str | None = None, per_layer: bool = False) -> str:
    base, chiar = cmp.baseline, cmp.chiar
    cfg = chiar.config
    t = chiar.seq_len
    shares = _runs(chiar.attention_share_per_layer)
    lines = [
        f"Forward multiply-adds (MACs) per token, {preset or 'custom'} (d={cfg.d_model}, layers={cfg.n_layers}, "
        f"heads={cfg.n_heads}, d_ff={cfg.d_ff}, vocab={cfg.vocab_size}), T={t}",
        f"CHIAR layout {cfg.layout!r}, routing {cfg.routing!r}, {cfg.execution} execution; attention share per layer: {shares}",
        f"conventions: scores={chiar.scores} (keys per query), dct_cost={chiar.dct_cost}; LayerNorms, softmax, "
        "GELU, RoPE not counted (O(d) per token)",
        "",
        f"{'component':<13}{'baseline':>12}{'CHIAR':>12}{'saved':>12}",
    ]
    for name in COMPONENTS:
        b, c = base.component(name), chiar.component(name)
        if b == 0 and c == 0:
            continue
        lines.append(f"{name:<13}{_fmt(b):>12}{_fmt(c):>12}{_fmt(b - c):>12}")
    lines += [
        f"{'attn sub-layer':<13}{_fmt(base.mixing_per_token):>12}{_fmt(chiar.mixing_per_token):>12}"
        f"{_fmt(base.mixing_per_token - chiar.mixing_per_token):>12}",
        f"{'forward':<13}{_fmt(base.forward_per_token):>12}{_fmt(chiar.forward_per_token):>12}"
        f"{_fmt(base.forward_per_token - chiar.forward_per_token):>12}",
        "",
        f"per sequence (x T={t}): forward baseline {_fmt(base.forward_per_sequence)}, CHIAR {_fmt(chiar.forward_per_sequence)}; "
        f"training step (~{TRAIN_FACTOR}x forward, entropy 1x): baseline {_fmt(base.train_per_token * t)}, "
        f"CHIAR {_fmt(chiar.train_per_token * t)}",
        "",
        f"attention sub-layer reduction (ours): {100 * cmp.attention_reduction:6.2f}%   "
        "= 1 - token-mixing MACs CHIAR / baseline (Q/K/V, scores, out-proj, DCT, RBF, router)",
        f"total forward reduction (ours):       {100 * cmp.total_reduction:6.2f}%   "
        "= 1 - all forward MACs CHIAR / baseline (FFN and LM head included)",
    ]
    if cfg.routed_layers or any(len(ops) == 1 and ops[0] != ATTN for ops in cfg.layer_ops):
        lines.append(
            f"paper's definition:                   {100 * cmp.paper_attention_reduction:6.2f}%   "
            "= 1 - mean over layers of the share of tokens taking attention (each attention "
            "sub-layer evaluation counted as one unit; K/V for all tokens, DCT, router, FFN, head ignored)"
        )
    if per_layer:
        lines += ["", "CHIAR per layer (MACs per token):"]
        header = f"{'layer':<7}{'ops':<5}" + "".join(f"{n:>10}" for n in COMPONENTS[1:-1]) + f"{'mixing':>10}"
        lines.append(header)
        for layer in chiar.layers:
            row = f"{layer.index + 1:<7}{layer_letters(layer.ops):<5}"
            row += "".join(f"{_fmt(layer.macs.get(n, 0.0)):>10}" for n in COMPONENTS[1:-1])
            lines.append(row + f"{_fmt(layer.mixing):>10}")
    return "\n".join(lines)
