"""CHIAR-Former: a transformer whose layers route each token, by the spectral entropy of its
hidden vector, to cheap DCT mixing or to causal self-attention (or to RBF kernel attention).

Reading order: ChiarLayer (one layer: route, mix, FFN) -> ChiarModel (embedding, layers,
MetaRouter) -> ChiarForCausalLM (tied LM head, loss, generation with a KV cache) ->
ChiarForSequenceClassification (masked mean pooling, MLP head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ATTN, DCT, RBF, ChiarConfig
from .errors import UserError
from .gather import merge_rows
from .layers import DCTMixer, FeedForward, TokenMixer, round_up
from .loss import cross_entropy
from .ops import spectral_entropy
from .routing import Decision, MetaRouter, Router, RoutingInfo, capacity_slots, collapse_penalty


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
        self.post_norm = cfg.norm == "post"
        self.causal = not cfg.bidirectional
        # Soft routing blends every operator's output, so it always computes them all; a layer
        # with one operator has nothing to route, and both executions are the same for it.
        self.dense = cfg.execution == "dense" or cfg.routing == "soft" or len(self.ops) == 1
        scale = 2.0 if cfg.dct_scale == "reference" else 1.0
        self.dct = DCTMixer(cfg.d_model, scale, cfg.dct_impl) if DCT in self.ops else None
        self.dct_impl = cfg.dct_impl
        self.mixer = TokenMixer(cfg, with_rbf=RBF in self.ops) if ATTN in self.ops or RBF in self.ops else None
        self.router = Router(cfg, self.ops, cfg.layer_taus(index)) if len(self.ops) > 1 else None
        # Fixed query slots per sequence (no host sync, static shapes): capacity routing, and
        # top-k with bidirectional attention, whose one attention call reads every key anyway.
        self.static_slots = self.router is not None and (
            cfg.routing == "capacity" or (cfg.routing == "topk" and cfg.bidirectional))
        self.norm_mix = nn.LayerNorm(cfg.d_model)
        self.norm_ffn = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, pos, key_mask, cache: KVCache | None, index: int, want_entropy: bool):
        h = x if self.post_norm else self.norm_mix(x)
        mixed, decision, entropy = self.token_mixing(h, pos, key_mask, cache, index, want_entropy)
        mixed = self.dropout(mixed)
        if self.post_norm:
            x = self.norm_mix(x + mixed)
            x = self.norm_ffn(x + self.ffn(x))
        else:
            x = x + mixed
            x = x + self.ffn(self.norm_ffn(x))
        order = self.router.order if self.router is not None else self.ops
        return x, RoutingInfo(decision.ops, entropy, decision.probs, order)

    def token_mixing(self, h, pos, key_mask, cache, index, want_entropy=False):
        """Route each token of h (B, T, d), run the operators; returns (mixed, decision, entropy)."""
        entropy = None
        if self.router is not None or want_entropy:
            entropy = spectral_entropy(h, self.dct_impl)  # no gradient: routers learn through their Linear
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
        elif self.static_slots:
            mixed = self.mix_static(h, decision, k, v, pos, key_mask, cache.length if cache is not None else 0)
        else:
            mixed = self.mix_sparse(h, decision, k, v, pos, key_mask)
        if decision.weight is not None:
            mixed = mixed * decision.weight[..., None].to(mixed.dtype)
        return mixed, decision, entropy

    # ------------------------------------------------------------------ execution
    def mix_dense(self, h, decision, k, v, pos, key_mask, ops=None):
        """Published behaviour: every operator on every token, then select (or blend).

        ops: compute only these operators (those some token chose), e.g. one at batch 1 decoding.
        """
        ops = self.ops if ops is None else ops
        outs = {}
        if DCT in ops:
            outs[DCT] = self.dct(h)
        if ATTN in ops or RBF in ops:
            q = self.mixer.queries(h, pos)
            if ATTN in ops:
                outs[ATTN] = self.mixer.project_out(self.mixer.attend(q, k, v, pos, key_mask, self.causal))
            if RBF in ops:
                outs[RBF] = self.mixer.project_out(self.mixer.rbf(q, k, v, key_mask, self.causal))
        if decision.probs is not None and decision.weight is None:  # soft: blend by probability
            return sum(decision.probs[..., i, None].to(h.dtype) * outs[op] for i, op in enumerate(self.router.order))
        mixed = outs[ops[0]]
        for op in ops[1:]:
            mixed = torch.where((decision.ops == op)[..., None], outs[op], mixed)
        return mixed

    def chosen_ops(self, decision) -> tuple[int, ...]:
        """The operators some token chose (one host sync over B values); soft routing blends all."""
        if decision.probs is not None and decision.weight is None:
            return self.ops
        chosen = set(decision.ops.flatten().tolist())
        return tuple(op for op in self.ops if op in chosen)

    def mix_static(self, h, decision, k, v, pos, key_mask, offset: int):
        """Static shapes: the cheap operators (DCT, linear-time RBF) on every token, attention on
        a fixed number of query slots per sequence (the most the routing can send), written over them.

        Per sequence, the slots hold the attention tokens in position order, padded with other
        tokens whose attention output is discarded. No host sync and no data-dependent shape, so
        torch.compile(fullgraph=True) and CUDA graphs can take the whole step.
        """
        b, t, d = h.shape
        selected = decision.ops == ATTN
        cheap = tuple(op for op in self.ops if op != ATTN)
        base = self.mix_dense(h, decision, k, v, pos, key_mask, cheap)
        if self.router.mode == "capacity":
            n = capacity_slots(self.router.capacity_rate, offset, t)
        else:  # top-k sends round(attn_fraction * length) <= this many tokens
            n = min(t, math.ceil(self.router.attn_fraction * t))
        if n == 0:
            return base
        idx = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :n]  # (B, n)
        valid = selected.gather(1, idx)
        rows = idx[..., None].expand(b, n, d)
        q_pos = pos[idx]
        q = self.mixer.queries(h.gather(1, rows), q_pos)
        y = self.mixer.project_out(self.mixer.attend(q, k, v, q_pos, key_mask, self.causal, static=True))
        # Padding slots keep their token's cheap output, so the scatter rewrites it unchanged.
        y = torch.where(valid[..., None], y.to(base.dtype), base.gather(1, rows))
        return base.scatter(1, rows, y)

    def mix_sparse(self, h, decision, k, v, pos, key_mask):
        """Each operator computes only its own tokens: gather, compute, scatter.

        Every token is computed by exactly one operator, so the operators' row sets are disjoint
        and cover the batch: one copy per operator puts the outputs back in place.
        """
        b, t, d = h.shape
        flat_h = h.reshape(b * t, d)
        flat_ops = decision.ops.reshape(-1)
        rows, outputs = [], []
        for op in self.ops:
            if op == DCT:
                mine = (flat_ops == DCT).nonzero().squeeze(1)
                rows.append(mine)
                outputs.append(self.dct(flat_h.index_select(0, mine)))
            elif op == ATTN:
                mine, y = self.sparse_attention(h, decision.ops == ATTN, k, v, pos, key_mask)
                rows.append(mine)
                outputs.append(y)
            else:  # RBF is linear in T: it runs over the layer's positions, keeps its own tokens
                mine = (flat_ops == RBF).nonzero().squeeze(1)
                y = self.mixer.project_out(self.mixer.rbf(self.mixer.queries(h, pos), k, v, key_mask, self.causal))
                rows.append(mine)
                outputs.append(y.reshape(b * t, d).index_select(0, mine))
        return merge_rows(b * t, rows, outputs).view(b, t, d)

    def sparse_attention(self, h, selected, k, v, pos, key_mask):
        """Queries (and the output projection) for the selected tokens only; keys of all tokens.

        Returns the flat row indices of the selected tokens and their outputs.
        """
        b, t, d = h.shape
        counts = selected.sum(1)
        n, fewest = torch.stack([counts.max(), counts.min()]).tolist()  # one host sync
        if n == 0:
            return selected.new_zeros(0, dtype=torch.long), h.new_zeros(0, d)
        if fewest == t:  # every token attends: no gather needed
            y = self.mixer.project_out(self.mixer.attend(self.mixer.queries(h, pos), k, v, pos, key_mask, self.causal))
            return torch.arange(b * t, device=h.device), y.reshape(b * t, d)
        # Per row, the selected positions first (in order), padded with unselected ones (whose
        # outputs are dropped) up to a rounded count, so shapes repeat across batches.
        n = round_up(n, t)
        idx = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :n]
        valid = torch.arange(n, device=h.device) < counts[:, None]
        hq = h.gather(1, idx[..., None].expand(b, n, d))
        q = self.mixer.queries(hq, pos[idx])
        # Padding queries are masked as if at position 0 (key 0 only): whatever their real
        # positions, they must not widen the key range that real queries' blocks read.
        y = self.mixer.attend(q, k, v, torch.where(valid, pos[idx], 0), key_mask, self.causal)
        y = self.mixer.project_out(y)
        rows = torch.arange(b, device=h.device)[:, None] * t + idx
        if fewest == n:  # equal counts, no padding (top-k): skip the boolean-mask copies
            return rows.reshape(-1), y.reshape(-1, d)
        return rows[valid], y[valid]


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
                gate, running_sum = self.meta_router(x, prefix, offset)
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


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None  # cross-entropy only
    aux_loss: torch.Tensor | None = None  # collapse regulariser; train on loss + aux_loss
    # Per layer: the operator each token took (always; the training loop counts them) and the
    # router's entropy (single-operator layers compute theirs only with return_routing=True).
    routing: list[RoutingInfo] | None = None
    meta_gate: torch.Tensor | None = None


class ChiarPreTrained(nn.Module):
    """Shared by both heads: init, parameter counts, taus, the collapse regulariser."""

    def __init__(self, cfg: ChiarConfig):
        super().__init__()
        self.cfg = cfg
        self.model = ChiarModel(cfg)

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
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
            # Shift the labels, not the logits: logits[:, :-1] would copy a (B, T-1, V) tensor
            # forward and zero-fill one in backward (a fifth of a paper-17m step). Position t
            # predicts labels[t + 1]; the last position has no target and is ignored.
            targets = F.pad(labels[:, 1:], (0, 1), value=-100)
            loss = cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return ModelOutput(logits, loss, self.aux_loss(routing, logits), routing, gate)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """Sample continuations with a KV cache. temperature=0 means greedy."""
        if self.cfg.routing == "topk" and self.cfg.routed_layers:
            raise UserError("routing='topk' ranks whole sequences and cannot decode token by token")
        if self.cfg.meta_router == "batch_mean":
            raise UserError("meta_router='batch_mean' mixes the batch and cannot decode token by token")
        if input_ids.shape[1] + max_new_tokens > self.cfg.max_seq_len:
            raise UserError(f"prompt + max_new_tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        cache = KVCache.empty(self.cfg.n_layers)
        tokens, step_input = input_ids, input_ids
        for _ in range(max_new_tokens):
            logits = self(step_input, cache=cache).logits[:, -1].float()
            if top_k is not None:
                kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if temperature == 0:
                step_input = logits.argmax(-1, keepdim=True)
            else:
                step_input = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1)
            tokens = torch.cat([tokens, step_input], dim=1)
        return tokens


class ChiarForSequenceClassification(ChiarPreTrained):
    """Backbone, mean of the final states over real tokens, MLP head."""

    def __init__(self, cfg: ChiarConfig):
        if cfg.meta_router == "batch_mean" and not cfg.allow_noncausal:
            raise UserError("meta_router='batch_mean' lets sequences in a batch see each other; "
                            "set allow_noncausal=True to replicate the paper")
        super().__init__(cfg)
        self.head = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.GELU(), nn.Linear(cfg.d_model, cfg.n_classes))
        self.init_weights()

    def forward(self, input_ids, attention_mask=None, labels=None, return_routing=False):
        hidden, routing, gate = self.model(input_ids, attention_mask, want_entropy=return_routing)
        if attention_mask is None:
            pooled = hidden.mean(1)
        else:
            m = attention_mask.to(hidden.dtype)[..., None]
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        logits = self.head(pooled)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return ModelOutput(logits, loss, self.aux_loss(routing, logits), routing, gate)
