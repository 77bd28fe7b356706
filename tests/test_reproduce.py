"""`chiar reproduce` (smoke scale end to end through the CLI) and the two routing controls it needs:
random routing at a fixed share, and quantile (tau-tracking) routing."""

import copy

import pytest
import torch

from chiarformer import ChiarConfig, ChiarForCausalLM
from chiarformer.config import ATTN, DCT
from chiarformer.model import KVCache


def control_model(routing: str, attn_fraction: float = 0.25, seed: int = 0) -> ChiarForCausalLM:
    cfg = ChiarConfig(vocab_size=97, d_model=32, n_heads=2, n_layers=4, max_seq_len=64, dropout=0.0,
                      layout="dct_attn", routing=routing, attn_fraction=attn_fraction)
    torch.manual_seed(seed)
    return ChiarForCausalLM(cfg)


def attention_shares(out) -> list[float]:
    return [float((r.ops == ATTN).float().mean()) for r in out.routing[1:3]]


def warm_up(model, batches: int = 30, seed: int = 1) -> None:
    """Training-mode forward passes (no optimizer): quantile routing tracks tau on them."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randint(0, 97, (8, 64), generator=generator))


# ---------------------------------------------------------------- routing controls
@pytest.mark.parametrize("routing", ["random", "quantile"])
@pytest.mark.parametrize("training", [True, False])
def test_routing_controls_are_causal(routing, training):
    """Changing tokens after position t never changes the outputs at positions <= t, in training
    (fresh draws, tau updates) and in eval (fixed draws, stored tau)."""
    model = control_model(routing)
    warm_up(model, batches=5)
    model.train(training)
    ids = torch.randint(0, 97, (4, 48), generator=torch.Generator().manual_seed(7))
    for t in (5, 20, 40):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(0, 97, changed[:, t + 1 :].shape)
        outs = []
        for x in (ids, changed):
            twin = copy.deepcopy(model)  # tau tracking updates buffers: both passes start from one state
            torch.manual_seed(3)  # random routing draws in training: the same for both passes
            with torch.no_grad():
                outs.append(twin(x))
        torch.testing.assert_close(outs[0].logits[:, : t + 1], outs[1].logits[:, : t + 1], atol=1e-5, rtol=0)
        for info in outs[0].routing[1:3]:  # the case really routes: both operators in each routed layer
            assert (info.ops == ATTN).any() and (info.ops == DCT).any()


@pytest.mark.parametrize("target", [0.25, 0.5])
def test_quantile_routing_holds_the_attention_share(target):
    model = control_model("quantile", attn_fraction=target)
    warm_up(model)
    model.eval()
    with torch.no_grad():
        out = model(torch.randint(0, 97, (16, 64), generator=torch.Generator().manual_seed(9)))
    for share in attention_shares(out):
        assert abs(share - target) < 0.06, (share, target)


def test_quantile_routing_routes_a_batch_with_the_tau_from_before_it():
    model = control_model("quantile")
    router = model.model.layers[1].router
    before = router.tau.clone()
    model.train()
    with torch.no_grad():
        out = model(torch.randint(0, 97, (8, 64)), return_routing=True)
    info = out.routing[1]
    assert torch.equal(info.ops == ATTN, info.entropy > before)
    # the first update is a plain mean (of one batch): tau lands on that batch's 75th percentile
    torch.testing.assert_close(router.tau[0], torch.quantile(info.entropy.flatten(), 0.75))
    assert int(router.tau_updates) == 1


def test_quantile_tau_is_saved_and_restored_with_the_weights():
    model = control_model("quantile")
    warm_up(model, batches=12)
    model.eval()
    fresh = control_model("quantile", seed=1).eval()
    fresh.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (4, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fresh(ids).logits)
    assert int(fresh.model.layers[1].router.tau_updates) == 12


def test_random_routing_is_fixed_in_eval_and_decodes_as_one_pass():
    model = control_model("random").eval()
    ids = torch.randint(0, 97, (3, 64))
    with torch.no_grad():
        full = model(ids)
        again = model(torch.randint(0, 97, (3, 64)))  # other content, same positions: same routes
        cache = KVCache.empty(model.cfg.n_layers)
        first, second = model(ids[:, :30], cache=cache), model(ids[:, 30:], cache=cache)
    for a, b in zip(full.routing, again.routing, strict=True):
        assert torch.equal(a.ops, b.ops)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), full.logits, atol=1e-5, rtol=0)
    for share in attention_shares(full):
        assert 0.1 < share < 0.4  # 64 fixed draws at p = 0.25
    # the two routed layers draw independently
    assert not torch.equal(full.routing[1].ops, full.routing[2].ops)


def test_random_routing_in_training_draws_at_the_share():
    model = control_model("random", attn_fraction=0.5).train()
    with torch.no_grad():
        out = model(torch.randint(0, 97, (32, 64)))
    for share in attention_shares(out):
        assert abs(share - 0.5) < 0.03
