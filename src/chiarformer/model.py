"""CHIAR-Former: a transformer whose layers route each token, by the spectral entropy of its
hidden vector, to cheap DCT mixing or to causal self-attention (or to RBF kernel attention).

Reading order: ChiarLayer (one layer: route, mix, FFN) -> ChiarModel (embedding, layers,
MetaRouter) -> ChiarForCausalLM (tied LM head, loss, generation with a KV cache) ->
ChiarForSequenceClassification (masked mean pooling, MLP head).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .config import ChiarConfig
from .errors import UserError
from .layers import DCTMixer, FeedForward, ReferenceRBF, TokenMixer
from .loss import cross_entropy
from .operators import ATTN, DCT, RBF, Op
from .ops import reference_spectral_entropy, spectral_entropy
from .routing import (
    Decision,
    MetaRouter,
    Router,
    RoutingInfo,
    collapse_penalty,
    reference_collapse_penalty,
    static_slot_rate,
)
from .sampling import check_sampling, next_tokens
from .sparse import mix_sparse, mix_static, runs_dense


@dataclass
class KVCache:
    """Keys/values of every token seen so far (DCT-routed ones too), per layer."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    key_mask: torch.Tensor | None = None  # (B, T_seen) real tokens, or None when all are
    meta_sum: torch.Tensor | None = None  # running sum of the MetaRouter's input
    length: int = 0
    attn_counts: list = field(default_factory=list)  # capacity routing: (B,) attention tokens so far, per layer

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls(keys=[None] * n_layers, values=[None] * n_layers, attn_counts=[None] * n_layers)


class ChiarLayer(nn.Module):
    """Token mixing (one operator per token) then the shared FFN, each a residual sub-layer."""

    def __init__(self, cfg: ChiarConfig, index: int):
        super().__init__()
        self.ops = cfg.layer_ops[index]
        self.post_norm = cfg.norm != "pre"
        self.causal = not cfg.bidirectional
        published_rbf = RBF in self.ops and cfg.rbf == "reference_quadratic"
        self.dense = runs_dense(cfg, self.ops)
        scale = 2.0 if cfg.dct_scale == "reference" else 1.0
        self.dct = DCTMixer(cfg.d_model, scale, cfg.dct_impl) if DCT in self.ops else None
        self.entropy_of = reference_spectral_entropy if cfg.entropy == "reference" else partial(spectral_entropy,
                                                                                                impl=cfg.dct_impl)
        own_rbf = RBF in self.ops and not published_rbf
        self.mixer = TokenMixer(cfg, with_rbf=own_rbf) if ATTN in self.ops or own_rbf else None
        inner_dropout = cfg.dropout if cfg.dropout_placement == "reference" else 0.0
        self.rbf_ref = ReferenceRBF(cfg, inner_dropout) if published_rbf else None
        self.router = Router(cfg, self.ops, cfg.layer_taus(index), index) if len(self.ops) > 1 else None
        if cfg.norm == "per_operator":  # published: LN_op(x + op(x)) inside each operator
            self.op_norms = nn.ModuleDict({Op(op).key: nn.LayerNorm(cfg.d_model) for op in self.ops})
        else:
            self.op_norms = None
            self.norm_mix = nn.LayerNorm(cfg.d_model)
        # Fixed query slots per sequence (no host sync, static shapes): capacity routing, and
        # top-k with bidirectional attention, whose one attention call reads every key anyway.
        self.slot_rate = static_slot_rate(cfg) if self.router is not None else None
        self.norm_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout, inner_dropout)
        # Dropout on token-mixing outputs (none in the published placement).
        self.dropout = nn.Dropout(0.0 if cfg.dropout_placement == "reference" else cfg.dropout)

    def forward(self, x, pos, key_mask, cache: KVCache | None, index: int, want_entropy: bool):
        h = x if self.post_norm else self.norm_mix(x)
        mixed, decision, entropy = self.token_mixing(h, pos, key_mask, cache, index, want_entropy)
        if self.op_norms is not None:  # already LN_op(x + op(x)), selected or blended
            x = mixed
        elif self.post_norm:
            x = self.norm_mix(x + self.dropout(mixed))
        else:
            x = x + self.dropout(mixed)
        x = self.norm_ffn(x + self.ffn(x)) if self.post_norm else x + self.ffn(self.norm_ffn(x))
        order = self.router.order if self.router is not None else self.ops
        return x, RoutingInfo(decision.ops, entropy, decision.probs, order)

    def token_mixing(self, h, pos, key_mask, cache, index, want_entropy=False):
        """Route each token of h (B, T, d), run the operators; returns (mixed, decision, entropy)."""
        entropy = None
        if self.router is not None or want_entropy:
            # Ours has no gradient (routers learn through their Linear); the published one has.
            entropy = self.entropy_of(h)
        new_mask = None if key_mask is None else key_mask[:, -h.shape[1] :]
        if self.router is not None:
            before = cache.attn_counts[index] if cache is not None else None
            decision = self.router(h, entropy, new_mask, pos, before)
            if cache is not None:
                cache.attn_counts[index] = decision.attn_count
        else:
            decision = Decision(torch.full(h.shape[:2], self.ops[0], device=h.device, dtype=torch.long), None, None)
        k = v = None
        if self.mixer is not None:
            k, v = self.mixer.keys_values(h, pos)
            if cache is not None:
                if cache.keys[index] is not None:
                    k = torch.cat([cache.keys[index], k], dim=2)
                    v = torch.cat([cache.values[index], v], dim=2)
                cache.keys[index], cache.values[index] = k, v
        if self.dense:
            mixed = self.mix_dense(h, decision, k, v, pos, key_mask)
        elif h.shape[1] == 1:  # decoding: one token per sequence, no gather to save work on
            mixed = self.mix_dense(h, decision, k, v, pos, key_mask, self.chosen_ops(decision))
        elif self.slot_rate is not None:
            mixed = mix_static(self, h, decision, k, v, pos, key_mask, cache.length if cache is not None else 0)
        else:
            mixed = mix_sparse(self, h, decision, k, v, pos, key_mask)
        if self.op_norms is not None and not self.blends(decision):  # blends normalise inside mix_dense
            mixed = self.normalise_selected(h, mixed, decision.ops)
        if decision.weight is not None:
            mixed = mixed * decision.weight[..., None].to(mixed.dtype)
        return mixed, decision, None if entropy is None else entropy.detach()

    def normalise_operator(self, op: int, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The published per-operator sub-layer: LN_op(h + op(h))."""
        return self.op_norms[Op(op).key](h + self.dropout(y))

    def normalise_selected(self, h, mixed, ops):
        """Each token's sub-layer normalised by its own operator's LayerNorm (sparse execution)."""
        z = h + self.dropout(mixed)
        out = self.op_norms[Op(self.ops[0]).key](z)
        for op in self.ops[1:]:
            out = torch.where((ops == op)[..., None], self.op_norms[Op(op).key](z), out)
        return out

    # ------------------------------------------------------------------ execution
    def mix_dense(self, h, decision, k, v, pos, key_mask, ops=None):
        """Published behaviour: every operator on every token, then select (or blend).

        ops: compute only these operators (those some token chose), e.g. one at batch 1 decoding.
        """
        ops = self.ops if ops is None else ops
        outs = {}
        if DCT in ops:
            outs[DCT] = self.dct(h)
        if ATTN in ops or (RBF in ops and self.rbf_ref is None):
            q = self.mixer.queries(h, pos)
            if ATTN in ops:
                outs[ATTN] = self.mixer.project_out(self.mixer.attend(q, k, v, pos, key_mask, self.causal))
            if RBF in ops and self.rbf_ref is None:
                outs[RBF] = self.mixer.project_out(self.mixer.rbf(q, k, v, key_mask, self.causal))
        if RBF in ops and self.rbf_ref is not None:
            outs[RBF] = self.rbf_ref(h, key_mask)
        if self.blends(decision):  # soft, or the published straight-through: weights on every output
            blend = self.router.blend(decision)
            if self.op_norms is not None:  # published: sum_i g_i LN_i(x + op_i(x))
                outs = {op: self.normalise_operator(op, h, y) for op, y in outs.items()}
            return sum(blend[..., i, None].to(h.dtype) * outs[op] for i, op in enumerate(self.router.order))
        mixed = outs[ops[0]]
        for op in ops[1:]:
            mixed = torch.where((decision.ops == op)[..., None], outs[op], mixed)
        return mixed

    @staticmethod
    def blends(decision) -> bool:
        """Soft routing and the published all-probability straight-through mix every operator's output."""
        return decision.probs is not None and decision.weight is None

    def chosen_ops(self, decision) -> tuple[int, ...]:
        """The operators some token chose (one host sync over B values); blended routing runs dense."""
        chosen = set(decision.ops.flatten().tolist())
        return tuple(op for op in self.ops if op in chosen)


class ChiarModel(nn.Module):
    """Token embedding -> layers (the first optionally gated by the MetaRouter) -> final LayerNorm."""

    def __init__(self, cfg: ChiarConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(ChiarLayer(cfg, i) for i in range(cfg.n_layers))
        self.meta_router = MetaRouter(cfg) if cfg.meta_router != "none" else None
        self.norm_out = nn.LayerNorm(cfg.d_model)

    def forward(self, input_ids, attention_mask=None, cache: KVCache | None = None, want_entropy=False):
        b, t = input_ids.shape
        offset = cache.length if cache is not None else 0
        if offset + t > self.cfg.max_seq_len:
            raise UserError(f"sequence length {offset + t} exceeds max_seq_len={self.cfg.max_seq_len}")
        pos = torch.arange(offset, offset + t, device=input_ids.device)
        key_mask = self.key_mask(attention_mask, cache, b, t, input_ids.device)

        x = self.dropout(self.embed(input_ids))
        routing, gate = [], None
        for i, layer in enumerate(self.layers):
            y, info = layer(x, pos, key_mask, cache, i, want_entropy)
            if i == 0 and self.meta_router is not None:
                prefix = cache.meta_sum if cache is not None else None
                gate, running_sum = self.meta_router(x, prefix, offset, key_mask)
                if cache is not None:
                    cache.meta_sum = running_sum
                y = gate * y + (1 - gate) * x
            x = y
            routing.append(info)
        if cache is not None:
            cache.length += t
        return self.norm_out(x), routing, gate

    @staticmethod
    def key_mask(attention_mask, cache, b, t, device):
        """Boolean (B, T_seen) mask of real tokens, or None when every token is real."""
        seen = cache.key_mask if cache is not None else None
        if attention_mask is None and seen is None:
            return None
        if attention_mask is None:
            mask = torch.ones(b, t, dtype=torch.bool, device=device)
        else:
            mask = attention_mask.to(device, torch.bool)
        if cache is not None:
            if seen is None:
                seen = torch.ones(b, cache.length, dtype=torch.bool, device=device)
            mask = cache.key_mask = torch.cat([seen, mask], 1)
        return None if bool(mask.all()) else mask


def next_token_targets(labels: torch.Tensor, n_positions: int) -> torch.Tensor:
    """(B, n_positions) targets aligned with the logits (-100 where a position has none); labels
    as in next_token_pairs."""
    targets = labels[:, 1:]
    return F.pad(targets, (0, n_positions - targets.shape[1]), value=-100)


def next_token_pairs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, targets) for next-token scoring; labels start at the first input position.

    labels[:, 1:] are the targets of the positions before them: with labels as long as the input,
    the last position has no target; with labels one longer (the published windows of C + 1
    tokens, of which C are input) every position is scored.
    """
    targets = labels[:, 1:]
    return logits[:, : targets.shape[1]], targets


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # cross-entropy only
    aux_loss: torch.Tensor | None = None  # collapse regulariser; train on loss + aux_loss
    # Per layer: the operator each token took (always; the training loop counts them) and the
    # router's entropy (single-operator layers compute theirs only with return_routing=True).
    routing: list[RoutingInfo] | None = None
    meta_gate: torch.Tensor | None = None


def init_module(module: nn.Module, std: float) -> None:
    """N(0, std) for Linear and Embedding weights, zero biases; the MetaRouter's own init, which
    overrides its Linear's, so a module must be initialised after its children."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, MetaRouter):
        module.reset_parameters()


class ChiarPreTrained(nn.Module):
    """Shared by both heads: init, parameter counts, taus, the collapse regulariser."""

    def __init__(self, cfg: ChiarConfig):
        super().__init__()
        self.cfg = cfg
        self.model = ChiarModel(cfg)

    def init_weights(self) -> None:
        # In module order, so a seed gives the same weights as before init_module existed; the
        # MetaRouter is visited before its Linear, so its own init is applied again at the end.
        for module in self.modules():
            init_module(module, self.cfg.init_std)
        if self.model.meta_router is not None:
            self.model.meta_router.reset_parameters()

    def num_parameters(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        embedding = self.model.embed.weight.numel()
        return {"total": total, "embedding": embedding, "non_embedding": total - embedding}

    def set_taus(self, taus: list) -> None:
        """Thresholds for the routed layers, in order (a float, or (low, high) for three operators)."""
        self.cfg = self.cfg.replace(tau=[list(t) if isinstance(t, (list, tuple)) else float(t) for t in taus])
        self.model.cfg = self.cfg
        for i in self.cfg.routed_layers:
            self.model.layers[i].router.set_tau(self.cfg.layer_taus(i))

    def aux_loss(self, routing: list[RoutingInfo], like: torch.Tensor) -> torch.Tensor:
        if self.cfg.collapse_reg and self.cfg.collapse_form == "reference" and self.cfg.routed_layers:
            return self.cfg.collapse_reg * reference_collapse_penalty(routing, self.cfg.routing == "soft")
        probs = [r.probs for r in routing if r.probs is not None]
        if not self.cfg.collapse_reg or not probs:
            return like.new_zeros(())
        return self.cfg.collapse_reg * collapse_penalty(probs)


class ChiarForCausalLM(ChiarPreTrained):
    def __init__(self, cfg: ChiarConfig):
        if cfg.bidirectional:
            raise UserError("bidirectional=True is for classification; a language model must be causal")
        leaks = cfg.noncausal_options()
        if leaks and not cfg.allow_noncausal:
            raise UserError(f"non-causal option(s) for a causal LM: {'; '.join(leaks)}; "
                            "set allow_noncausal=True to replicate the paper anyway")
        super().__init__(cfg)
        self.init_weights()

    def forward(self, input_ids, labels=None, attention_mask=None, return_routing=False, cache: KVCache | None = None):
        hidden, routing, gate = self.model(input_ids, attention_mask, cache, want_entropy=return_routing)
        logits = hidden @ self.model.embed.weight.T  # tied head
        loss = None
        if labels is not None:
            # Targets aligned with every position (no logits[:, :-1] copy of a (B, T-1, V) tensor,
            # no zero fill of one in backward: a fifth of a paper-17m step).
            loss = cross_entropy(logits.flatten(0, 1).float(), next_token_targets(labels, logits.shape[1]).flatten())
        return ModelOutput(logits, loss, self.aux_loss(routing, logits), routing, gate)

    def check_decodable(self) -> None:
        """Refuse token-by-token decoding (a KV cache) where a token's route depends on later tokens."""
        if self.cfg.routing == "topk" and self.cfg.routed_layers:
            raise UserError("routing='topk' ranks whole sequences and cannot decode token by token")
        if self.cfg.meta_router == "batch_mean":
            raise UserError("meta_router='batch_mean' mixes the batch and cannot decode token by token")
        if self.cfg.rbf == "reference_quadratic" and any(RBF in ops for ops in self.cfg.layer_ops):
            raise UserError("rbf='reference_quadratic' mixes all positions of a sequence and cannot decode token by token")

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, attention_mask=None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, seed: int | None = None):
        """Sample continuations with a KV cache; returns (B, prompt + generated) ids.

        temperature=0 is greedy; otherwise logits / temperature, then top_k, then top_p (the
        smallest set of tokens whose probability reaches top_p). Prompts of different lengths
        are left-padded, with attention_mask 1 on real tokens. A sequence that produced
        eos_token_id gets pad_token_id (default: the EOS id) from then on; decoding stops once
        every sequence has. seed: a private generator, so the same seed gives the same samples
        (the global RNG is untouched). Runs in eval mode (no dropout), then restores the mode.
        """
        self.check_decodable()
        if input_ids.shape[1] + max_new_tokens > self.cfg.max_seq_len:
            raise UserError(f"prompt + max_new_tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        check_sampling(max_new_tokens, temperature, top_k, top_p)
        if attention_mask is not None:
            mask = attention_mask.to(input_ids.device, torch.bool)
            # Left padding only: a pad after a real token would sit inside the sequence.
            if not bool(mask[:, -1].all()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
                raise UserError("prompts of different lengths must be padded on the left (attention_mask 0 before 1)")
        generator = torch.Generator(input_ids.device).manual_seed(seed) if seed is not None else None
        pad = eos_token_id if pad_token_id is None else pad_token_id
        was_training = self.training
        self.eval()
        try:
            cache = KVCache.empty(self.cfg.n_layers)
            tokens, step_input, step_mask = input_ids, input_ids, attention_mask
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            for _ in range(max_new_tokens):
                logits = self(step_input, attention_mask=step_mask, cache=cache).logits[:, -1].float()
                step_mask = None  # new tokens are real; the cache keeps the prompt's mask
                step_input = next_tokens(logits, temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    step_input = torch.where(done, pad, step_input)
                    done |= step_input == eos_token_id
                step_input = step_input[:, None]
                tokens = torch.cat([tokens, step_input], dim=1)
                if eos_token_id is not None and bool(done.all()):
                    break
        finally:
            self.train(was_training)
        return tokens


def classification_head(cfg: ChiarConfig, n_classes: int) -> nn.Sequential:
    """The classifier's MLP head (Linear d->d, GELU, dropout, Linear d->n_classes); also the
    classification heads of mixed-dataset training (train/mixture.py)."""
    # Named entries keep the weights at head.0 / head.2 whatever the dropout placement.
    head_dropout = cfg.dropout if cfg.dropout_placement == "reference" else 0.0
    return nn.Sequential(OrderedDict([("0", nn.Linear(cfg.d_model, cfg.d_model)), ("1", nn.GELU()),
                                      ("dropout", nn.Dropout(head_dropout)),
                                      ("2", nn.Linear(cfg.d_model, n_classes))]))


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the final states over the real tokens (all of them without a mask)."""
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class ChiarForSequenceClassification(ChiarPreTrained):
    """Backbone, mean of the final states over real tokens, MLP head."""

    def __init__(self, cfg: ChiarConfig):
        if cfg.meta_router == "batch_mean" and not cfg.allow_noncausal:
            raise UserError("meta_router='batch_mean' lets sequences in a batch see each other; "
                            "set allow_noncausal=True to replicate the paper")
        super().__init__(cfg)
        self.head = classification_head(cfg, cfg.n_classes)
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, labels=None, return_routing=False):
        hidden, routing, gate = self.model(input_ids, attention_mask, want_entropy=return_routing)
        logits = self.head(mean_pool(hidden, attention_mask))
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ModelOutput(logits, loss, self.aux_loss(routing, logits), routing, gate)


def build_model(cfg: ChiarConfig, kind: str) -> ChiarPreTrained:
    """The model a task of `kind` trains: "lm" (causal LM) or "cls" (sequence classifier)."""
    return ChiarForCausalLM(cfg) if kind == "lm" else ChiarForSequenceClassification(cfg)
