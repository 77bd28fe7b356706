"""Per-token routing by spectral entropy, and the MetaRouter gate over the first layer.

A router sees each token's hidden vector h and its spectral entropy H(h). Operators are
ordered by the entropy they serve: DCT (smooth, low H) < RBF < attention (high H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .operators import ATTN, DCT, ENTROPY_ORDER


@dataclass
class RoutingInfo:
    """What one layer decided, for every token."""

    ops: torch.Tensor  # (B, T) int64 operator id: 0 = DCT, 1 = attention, 2 = RBF
    entropy: torch.Tensor | None  # (B, T) float32 spectral entropy of the router's input
    probs: torch.Tensor | None = None  # (B, T, n_ops) router probabilities (soft/hard), in `order`
    order: tuple[int, ...] = ()  # operator ids of the columns of probs


@dataclass
class Decision:
    ops: torch.Tensor  # (B, T) chosen operator id
    probs: torch.Tensor | None  # (B, T, n_ops) soft/hard probabilities, None otherwise
    weight: torch.Tensor | None  # hard: (B, T) straight-through multiplier, == 1 in value
    attn_count: torch.Tensor | None = None  # capacity: (B,) attention tokens so far, for a KV cache


# routing="random": a fixed seed per layer for the evaluation draws (distinct from any run seed).
RANDOM_ROUTE_SEED = 16_000
# routing="quantile": tau moves this far towards each batch's quantile (an EMA), after a plain
# running mean over the first 1 / TAU_TRACK_RATE batches so the initial tau leaves no bias.
TAU_TRACK_RATE = 0.1


def random_route_draws(layer: int, n_positions: int) -> torch.Tensor:
    """routing="random" in eval mode: one fixed uniform per (layer, position), so evaluation is
    deterministic, a KV cache routes as a full pass does, and nothing depends on content."""
    generator = torch.Generator().manual_seed(RANDOM_ROUTE_SEED + layer)
    return torch.rand(n_positions, generator=generator)


class Router(nn.Module):
    def __init__(self, cfg, ops: tuple[int, ...], taus: tuple[float, ...], layer: int = 0):
        super().__init__()
        self.mode = cfg.routing
        self.order = tuple(op for op in ENTROPY_ORDER if op in ops)
        self.register_buffer("order_ids", torch.tensor(self.order), persistent=False)
        self.attn_fraction = cfg.attn_fraction
        self.straight_through = cfg.straight_through
        self.capacity_rate = cfg.capacity_factor * cfg.attn_fraction
        self.register_buffer("tau", torch.tensor(taus, dtype=torch.float32))
        if self.mode in ("soft", "hard"):
            self.logits = nn.Linear(cfg.d_model + 1, len(self.order))
        if self.mode == "random":  # not in checkpoints: a pure function of (layer, position)
            self.register_buffer("eval_draws", random_route_draws(layer, cfg.max_seq_len), persistent=False)
        if self.mode == "quantile":  # batches tracked so far; saved with tau, so resuming is exact
            self.register_buffer("tau_updates", torch.zeros((), dtype=torch.long))

    def set_tau(self, taus: tuple[float, ...]) -> None:
        self.tau.copy_(torch.tensor(taus, dtype=torch.float32))

    def forward(self, h: torch.Tensor, entropy: torch.Tensor, key_mask: torch.Tensor | None,
                pos: torch.Tensor | None = None, attn_before: torch.Tensor | None = None) -> Decision:
        """pos (T,): the tokens' positions; attn_before (B,): capacity routing's count of earlier
        (cached) attention tokens. Both matter to routing="capacity" only."""
        order = self.order_ids
        if self.mode in ("threshold", "capacity"):
            # bucketize: H <= tau_0 -> first operator, ..., H > tau_last -> attention
            ops = order[torch.bucketize(entropy, self.tau)]
            if self.mode == "threshold":
                return Decision(ops, None, None)
            candidates = ops == ATTN if key_mask is None else (ops == ATTN) & key_mask
            accepted, count = capacity_limit(candidates, pos, self.capacity_rate, attn_before)
            return Decision(torch.where(candidates & ~accepted, DCT, ops), None, None, count)
        if self.mode == "topk":
            return Decision(self.top_k(entropy, key_mask), None, None)
        if self.mode == "random":
            return Decision(self.random_route(entropy, key_mask, pos), None, None)
        if self.mode == "quantile":
            ops = order[torch.bucketize(entropy, self.tau)]  # with the tau from before this batch
            if self.training:
                self.track_tau(entropy, key_mask)
            return Decision(ops, None, None)
        features = torch.cat([h, entropy[..., None].to(h.dtype)], dim=-1)
        probs = torch.softmax(self.logits(features).float(), dim=-1)
        choice = probs.argmax(-1)
        weight = None
        if self.mode == "hard" and self.straight_through == "chosen":  # value 1, gradient of the chosen probability
            chosen = probs.gather(-1, choice[..., None])[..., 0]
            weight = 1.0 + chosen - chosen.detach()
        return Decision(order[choice], probs, weight)

    def blend(self, decision: Decision) -> torch.Tensor | None:
        """Weights (B, T, n_ops) that mix every operator's output, or None when tokens select one.

        soft: the probabilities. hard with straight_through="all" (published): onehot - p.detach() + p,
        the one-hot choice in value with the gradient of every probability.
        """
        if self.mode == "soft":
            return decision.probs
        if self.mode == "hard" and self.straight_through == "all":
            probs = decision.probs
            onehot = torch.nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)
            return onehot - probs.detach() + probs
        return None

    def random_route(self, entropy: torch.Tensor, key_mask: torch.Tensor | None, pos: torch.Tensor) -> torch.Tensor:
        """Attention with probability attn_fraction per token, independent of content: in training
        fresh draws from the global generator (which the training loop seeds at every step), in
        eval the fixed draws of this layer at the tokens' positions. Padding goes to the DCT."""
        if self.training:
            draws = torch.rand(entropy.shape, device=entropy.device)
        else:
            draws = self.eval_draws[pos].expand(entropy.shape)
        attend = draws < self.attn_fraction
        if key_mask is not None:
            attend = attend & key_mask
        return torch.where(attend, ATTN, DCT)

    @torch.no_grad()
    def track_tau(self, entropy: torch.Tensor, key_mask: torch.Tensor | None) -> None:
        """Move tau towards the (1 - attn_fraction) quantile of this batch's real-token entropies.

        Called after the batch is routed: a batch never sees its own quantile, so no token's route
        depends on other tokens of its batch; eval mode uses the stored tau unchanged.
        """
        real = entropy if key_mask is None else entropy[key_mask]
        target = torch.quantile(real.float().flatten(), 1.0 - self.attn_fraction)
        rate = torch.clamp(1.0 / (self.tau_updates + 1).float(), min=TAU_TRACK_RATE)
        self.tau.lerp_(target.expand_as(self.tau), rate)
        self.tau_updates += 1

    def top_k(self, entropy: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """Per sequence, the round(attn_fraction * length) highest-entropy real tokens go to attention.

        Without padding every sequence routes the same number of tokens (static shapes).
        """
        b, t = entropy.shape
        if key_mask is None:
            lengths = torch.full((b,), t, device=entropy.device)
            score = entropy
        else:
            lengths = key_mask.sum(1)
            score = entropy.masked_fill(~key_mask, -1.0)  # pads rank last
        k = torch.round(self.attn_fraction * lengths.float()).long()
        ranks = score.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        return torch.where(ranks < k[:, None], ATTN, DCT)


def static_slot_rate(cfg) -> float | None:
    """Attention query slots per position when a routed layer runs with fixed slots
    (model.ChiarLayer.mix_static: capacity routing, and top-k with bidirectional attention), else None."""
    if cfg.routing == "capacity":
        return cfg.capacity_factor * cfg.attn_fraction
    if cfg.routing == "topk" and cfg.bidirectional:  # top-k sends round(attn_fraction * T) <= ceil(...) tokens
        return cfg.attn_fraction
    return None


def capacity_slots(rate: float, offset: int, t: int) -> int:
    """Most attention tokens among t new positions after `offset` earlier ones (capacity_limit's bound)."""
    return min(t, math.ceil(rate * (offset + t)))


def capacity_limit(candidates: torch.Tensor, pos: torch.Tensor, rate: float,
                   before: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept candidates (B, T) in position order while at most ceil(rate * (p + 1)) of the
    positions 0..p are accepted; returns (accepted, accepted count per sequence).

    The running count follows a_p = min(a_{p-1} + c_p, bound_p) (a candidate is refused exactly
    when the bound is reached), which unrolls to a_p = S_p + min(a_init, min_{q<=p}(bound_q - S_q))
    with S the running sum of candidates: a cumulative minimum, no loop and no host sync. A route
    depends only on the token and earlier ones, and `before` (the count over a KV cache) continues
    it exactly, so cached decoding routes as one full pass does.
    """
    c = candidates.long()
    s = c.cumsum(1)
    bound = torch.ceil(rate * (pos.to(torch.float64) + 1)).long()
    start = torch.zeros_like(s[:, :1]) if before is None else before[:, None]
    slack = torch.minimum(torch.cummin(bound - s, dim=1).values, start)
    count = s + slack
    previous = torch.cat([start, count[:, :-1]], dim=1)
    return count > previous, count[:, -1]


def collapse_penalty(probs: list[torch.Tensor]) -> torch.Tensor:
    """Minus the entropy of mean operator usage, summed over routed layers.

    Minimising lambda * this pushes usage away from a single operator; it acts on the
    undetached router probabilities, so it changes the router's gradient.
    """
    total = probs[0].new_zeros(())
    for p in probs:
        usage = p.reshape(-1, p.shape[-1]).mean(0)
        total = total + torch.special.xlogy(usage, usage).sum()
    return total


def reference_collapse_penalty(routing: list[RoutingInfo], soft: bool) -> torch.Tensor:
    """The published form: sum(q log(q + 1e-8)) of the mean detached gates q per routed layer.

    Gates are one-hot choices (threshold, hard) or probabilities (soft), padding included; no
    gradient reaches the model, so it only shifts the logged loss.
    """
    total = routing[0].ops.new_zeros((), dtype=torch.float32)
    for info in routing:
        if len(info.order) < 2:
            continue
        if soft:
            gates = info.probs.detach()
        else:
            gates = (info.ops[..., None] == torch.tensor(info.order, device=info.ops.device)).float()
        q = gates.reshape(-1, gates.shape[-1]).float().mean(0)
        total = total + (q * (q + 1e-8).log()).sum()
    return total


class MetaRouter(nn.Module):
    """g = sigmoid(Linear(mean of x)); the first layer's output becomes g * layer(x) + (1 - g) * x.

    causal: the mean runs over each sequence's prefix, so position t sees positions <= t only.
    batch_mean (published): one g from the mean over batch and time; leaks the future.
    """

    def __init__(self, cfg):
        super().__init__()
        self.mode = cfg.meta_router
        self.gate = nn.Linear(cfg.d_model, 1)
        self.gate_init = cfg.meta_gate_init

    def reset_parameters(self) -> None:
        """Zero weights and bias logit(g0), so the gate starts at exactly meta_gate_init."""
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, math.log(self.gate_init / (1 - self.gate_init)))  # no tensor: works on meta

    def forward(self, x: torch.Tensor, prefix_sum: torch.Tensor | None, prefix_len: int,
                key_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate (B, T, 1) or (1, 1, 1), and the running sum to cache for generation.

        key_mask (B, prefix_len + T) marks real tokens: padding (left-padded prompts) is left
        out of the causal mean, so a padded prompt gets the gates it gets alone.
        """
        if self.mode == "batch_mean":
            return torch.sigmoid(self.gate(x.mean(dim=(0, 1), keepdim=True))), None
        if key_mask is None:
            counts = torch.arange(prefix_len + 1, prefix_len + x.shape[1] + 1, device=x.device, dtype=x.dtype)[:, None]
        else:
            real = key_mask[:, -x.shape[1] :, None]
            x = x * real.to(x.dtype)
            counts = key_mask.cumsum(1)[:, -x.shape[1] :, None].clamp_min(1).to(x.dtype)
        sums = x.cumsum(dim=1)
        if prefix_sum is not None:
            sums = sums + prefix_sum[:, None]
        return torch.sigmoid(self.gate(sums / counts)), sums[:, -1]

