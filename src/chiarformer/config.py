"""Model configuration: one dataclass, named presets, and the per-layer layout it implies.

Every field is documented where it is declared; `ChiarConfig.from_preset(name, **overrides)`
is the usual way in. Layouts are resolved into one operator set per layer, e.g.
"dct_attn" with 4 layers -> ["D", "DA", "DA", "A"].
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .errors import UserError
from .operators import LETTERS, RBF, Op

LAYOUTS = ("baseline", "dct_attn", "three_op", "dct_only")
ROUTINGS = ("threshold", "soft", "hard", "topk", "capacity", "random", "quantile")
META_ROUTERS = ("none", "causal", "batch_mean")
EXECUTIONS = ("sparse", "dense")
NORMS = ("post", "pre", "per_operator")
RBF_FORMS = ("causal_linear", "reference_quadratic")
DCT_SCALES = ("ortho", "reference")
ENTROPIES = ("ortho", "reference")
STRAIGHT_THROUGH = ("chosen", "all")
DROPOUT_PLACEMENTS = ("sublayers", "reference")
COLLAPSE_FORMS = ("probs", "reference")
DCT_IMPLS = ("auto", "matmul", "fft")

# The mean of E[z^2 log z^2] for z ~ N(0, 1) (= 2 - Euler's gamma - ln 2). A Gaussian vector
# of size d has normalised spectral entropy close to 1 - GAUSS_ENTROPY_GAP / ln d (0.868 at
# d=256, 0.895 at d=1024): where the published thresholds sit (SPEC §3.4).
GAUSS_ENTROPY_GAP = 2.0 - 0.5772156649015329 - math.log(2.0)


def gaussian_entropy(d: int) -> float:
    """Expected normalised spectral entropy of an isotropic Gaussian vector of size d."""
    return 1.0 - GAUSS_ENTROPY_GAP / math.log(d)


@dataclass
class ChiarConfig:
    # --- sizes ---
    vocab_size: int = 50257  # vocabulary size; tasks set it from their tokenizer (GPT-2 BPE 50257, bytes 257)
    d_model: int = 256  # hidden size d (the DCT runs along this axis)
    n_heads: int = 4  # attention heads; d_model must divide evenly
    n_layers: int = 4  # transformer layers
    d_ff: int = 0  # FFN hidden size; 0 means 4 * d_model (as published)
    max_seq_len: int = 256  # longest sequence accepted (RoPE has no hard limit; this is a guard)
    dropout: float = 0.1  # dropout probability (published 0.1); where it applies: dropout_placement

    # --- which operator each layer may use ---
    layout: str = "dct_attn"  # baseline | dct_attn | three_op | dct_only | per-layer "D,DA,DRA,A"
    routing: str = "threshold"  # threshold | soft | hard | topk | capacity | random | quantile (how routed layers choose)
    # Entropy threshold(s): None = the Gaussian-vector entropy at d_model (the published
    # operating point); a float for every routed layer; a list with one entry per routed
    # layer; for three-operator layers each entry is a pair (tau_low, tau_high).
    tau: float | list | None = None
    attn_fraction: float = 0.25  # share of tokens sent to attention by routing="topk"; the bound's share for "capacity"
    # routing="random" (a control, not a method): each token takes attention with probability
    # attn_fraction whatever its content. routing="quantile": threshold routing whose tau follows,
    # in training, the (1 - attn_fraction) quantile of earlier batches' entropies (routing.Router).
    # routing="capacity": threshold routing in which at most ceil(capacity_factor * attn_fraction
    # * (p + 1)) of a sequence's first p + 1 tokens take attention (candidates above tau, earliest
    # first; the overflow goes to the DCT). Causal, and every routed layer computes exactly
    # ceil(capacity_factor * attn_fraction * T) query slots per sequence: static shapes, no host sync.
    capacity_factor: float = 1.25
    collapse_reg: float = 0.0  # lambda of the collapse regulariser (published 0.01); soft/hard (see collapse_form)
    # probs: lambda * sum(u log u) of the mean router probabilities u (acts on the router) |
    # reference (published): the same on detached gates (one-hot for threshold/hard), threshold
    # mode included: a constant in the loss, no gradient (SPEC §7).
    collapse_form: str = "probs"

    # --- options, including the published (reference) behaviours ---
    meta_router: str = "none"  # none | causal (prefix mean) | batch_mean (published; NON-CAUSAL)
    meta_gate_init: float = 0.5  # initial MetaRouter gate g (the published code starts at 0.5)
    execution: str = "sparse"  # sparse (each operator runs on its own tokens) | dense (published)
    # post: x <- LN(x + f(x)) with one LayerNorm for the token-mixing sub-layer | pre:
    # x <- x + f(LN(x)) | per_operator (published): each operator has its own LayerNorm,
    # LN_op(x + op(x)), and the layer selects (or, soft, blends) the normalised outputs.
    norm: str = "post"
    # causal_linear: kernel attention on the layer's Q/K/V with prefix sums | reference_quadratic
    # (published RBFMix, NON-CAUSAL): on x itself, fixed frequencies (d, R) ~ N(0, 2 gamma),
    # unmasked softmax(phi phi^T) phi over all T x T, projection 2R -> d and its own FFN.
    rbf: str = "causal_linear"
    rbf_features: int = 64  # random Fourier frequencies R (features are [cos, sin]: 2R values)
    rbf_gamma: float = 1.0  # RBF kernel width: k(q, k) = exp(-gamma |q - k|^2 / 2)
    dct_scale: str = "ortho"  # ortho | reference (published: the DCT round trip gives 2x)
    # Spectral entropy the routers see: ortho (orthonormal DCT) | reference (published: from its
    # unnormalised DCT, so the DC coefficient's power counts 2x; its 1e-8 epsilons; differentiable,
    # so soft/hard routers back-propagate through H as in the published code).
    entropy: str = "ortho"
    # Hard routing's straight-through gradient: chosen (through the chosen probability) |
    # all (published: onehot - p.detach() + p, through every probability; needs every operator's
    # output, so those layers run dense).
    straight_through: str = "chosen"
    # sublayers: dropout on each token-mixing output and the FFN output | reference (published):
    # after the GELU inside the FFN and after the FFN, none on DCT/attention outputs, and in the
    # classifier head. Both also drop embeddings and attention weights.
    dropout_placement: str = "sublayers"
    dct_impl: str = "auto"  # auto (= matmul, a fixed choice, not measured) | matmul (d^2) | fft (d log d)
    allow_noncausal: bool = False  # let a causal LM use options that leak the future (labelled)
    rope_base: float = 10000.0  # RoPE frequency base
    bidirectional: bool = False  # classification only: attention sees the whole sequence
    n_classes: int = 2  # classification only: number of labels
    init_std: float = 0.02  # N(0, std) init for Linear and Embedding weights

    def __post_init__(self) -> None:
        if self.d_ff == 0:
            self.d_ff = 4 * self.d_model
        if isinstance(self.tau, tuple):
            self.tau = list(self.tau)
        self.validate()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, name: str, **overrides) -> ChiarConfig:
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> ChiarConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown model config key(s): {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> ChiarConfig:
        return self.from_dict({**self.to_dict(), **changes})

    # ---------------------------------------------------------------- derived views
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def layer_ops(self) -> list[tuple[int, ...]]:
        """Operator ids available in each layer, in the fixed order DCT, ATTN, RBF."""
        return parse_layout(self.layout, self.n_layers)

    @property
    def routed_layers(self) -> list[int]:
        return [i for i, ops in enumerate(self.layer_ops) if len(ops) > 1]

    def layer_taus(self, layer: int) -> tuple[float, ...]:
        """Thresholds of a routed layer: (tau,) for two operators, (tau_low, tau_high) for three."""
        n_ops = len(self.layer_ops[layer])
        routed = self.routed_layers
        tau = self.tau
        if isinstance(tau, list):
            tau = tau[routed.index(layer)]
        if tau is None:
            tau = gaussian_entropy(self.d_model)
        taus = tuple(float(t) for t in tau) if isinstance(tau, (list, tuple)) else (float(tau),)
        if n_ops == 3 and len(taus) == 1:
            # One number for three operators: a narrow band around it (published midpoint use).
            taus = (taus[0] - 0.005, taus[0] + 0.005)
        if len(taus) != n_ops - 1:
            raise UserError(f"layer {layer} routes {n_ops} operators and needs {n_ops - 1} tau value(s), got {len(taus)}")
        return taus

    def noncausal_options(self) -> list[str]:
        """Options set here that let a position see later positions (or other sequences)."""
        leaks = []
        if self.meta_router == "batch_mean":
            leaks.append("meta_router='batch_mean' (gate averages over batch and time)")
        if self.rbf == "reference_quadratic" and any(RBF in ops for ops in self.layer_ops):
            leaks.append("rbf='reference_quadratic' (unmasked T x T softmax)")
        if self.routing == "topk" and self.routed_layers:
            leaks.append("routing='topk' (a token's route depends on the entropies of later tokens)")
        return leaks

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        def choice(name: str, options: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in options:
                raise UserError(f"{name}={value!r} is not one of {', '.join(options)}")

        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_seq_len", "rbf_features", "n_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise UserError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise UserError(f"head size d_model/n_heads={self.head_dim} must be even for RoPE")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.attn_fraction <= 1.0:
            raise UserError(f"attn_fraction must be in [0, 1], got {self.attn_fraction}")
        if not self.capacity_factor > 0.0:
            raise UserError(f"capacity_factor must be positive, got {self.capacity_factor}")
        if not 0.0 < self.meta_gate_init < 1.0:
            raise UserError(f"meta_gate_init must be in (0, 1), got {self.meta_gate_init}")
        choice("routing", ROUTINGS)
        choice("meta_router", META_ROUTERS)
        choice("execution", EXECUTIONS)
        choice("norm", NORMS)
        choice("rbf", RBF_FORMS)
        choice("dct_scale", DCT_SCALES)
        choice("dct_impl", DCT_IMPLS)
        choice("entropy", ENTROPIES)
        choice("straight_through", STRAIGHT_THROUGH)
        choice("dropout_placement", DROPOUT_PLACEMENTS)
        choice("collapse_form", COLLAPSE_FORMS)
        layer_ops = self.layer_ops  # raises on a bad layout
        if self.routing in ("topk", "random", "quantile") and any(len(ops) > 2 for ops in layer_ops):
            raise UserError(f"routing={self.routing!r} picks attention tokens only; use threshold/soft/hard for "
                            "three operators")
        if isinstance(self.tau, list) and len(self.tau) != len(self.routed_layers):
            raise UserError(f"tau lists {len(self.tau)} value(s) but the layout has {len(self.routed_layers)} routed layer(s)")
        for layer in self.routed_layers:
            self.layer_taus(layer)


def parse_layout(layout: str, n_layers: int) -> list[tuple[int, ...]]:
    """Per-layer operator sets for a named layout or an explicit string like "D,DA,DRA,A"."""
    if layout == "baseline":
        letters = ["A"] * n_layers
    elif layout == "dct_only":
        letters = ["D"] * n_layers
    elif layout in ("dct_attn", "three_op"):
        if n_layers < 3:
            raise UserError(f"layout {layout!r} needs at least 3 layers (DCT first, routed middle, attention last)")
        middle = "DA" if layout == "dct_attn" else "DRA"
        letters = ["D"] + [middle] * (n_layers - 2) + ["A"]
    elif "," in layout or set(layout) <= set(LETTERS):
        letters = [part.strip().upper() for part in layout.split(",")]
        if len(letters) != n_layers:
            raise UserError(f"layout {layout!r} names {len(letters)} layer(s) but n_layers={n_layers}")
    else:
        raise UserError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)} or a string like 'D,DA,A'")
    result = []
    for part in letters:
        if not part or set(part) - set(LETTERS) or len(set(part)) != len(part):
            raise UserError(f"layer spec {part!r} in layout {layout!r} must use distinct letters from D, R, A")
        result.append(tuple(sorted(int(Op.from_letter(c)) for c in part)))
    return result


# Every option that reproduces the published code (github hackie123/CHIAR-former @ 9602c6e, SPEC §7);
# tau is the midpoint of its config.py thresholds 0.8935 / 0.8973.
REFERENCE_OPTIONS: dict = dict(
    execution="dense", norm="per_operator", dct_scale="reference", entropy="reference", straight_through="all",
    rbf="reference_quadratic", dropout_placement="reference", collapse_form="reference", meta_router="batch_mean",
    tau=(0.8935 + 0.8973) / 2,
)

PRESETS: dict[str, dict] = {
    # The paper's v1 scale ("17M" without the 12.9M-parameter tied embedding).
    "paper-17m": dict(vocab_size=50257, d_model=256, n_heads=4, n_layers=4, max_seq_len=256, dropout=0.1),
    # The paper's v2 scale.
    "paper-400m": dict(vocab_size=50257, d_model=1024, n_heads=16, n_layers=28, max_seq_len=256, dropout=0.1),
    # The published code's behaviour as a whole, at both published sizes (each option: docs/model.md).
    # Its CHIAR models use the batch-mean MetaRouter (NON-CAUSAL: a causal LM also needs
    # allow_noncausal=True); its baseline has none (add meta_router="none" for layout="baseline").
    "reference-17m": dict(vocab_size=50257, d_model=256, n_heads=4, n_layers=4, max_seq_len=256, dropout=0.1,
                          **REFERENCE_OPTIONS),
    "reference-400m": dict(vocab_size=50257, d_model=1024, n_heads=16, n_layers=28, max_seq_len=256, dropout=0.1,
                           **REFERENCE_OPTIONS),
    # For tests and CPU-sized experiments.
    "tiny": dict(vocab_size=512, d_model=64, n_heads=4, n_layers=4, max_seq_len=256, dropout=0.0),
}
