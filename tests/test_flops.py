"""Analytic multiply-add accounting (chiarformer.flops) and `chiar flops`.

The analytic count is checked against torch.utils.flop_counter.FlopCounterMode on the real
model. FlopCounterMode counts FLOPs = 2 x MACs for matrix products and nothing for elementwise
work. How it treats scaled_dot_product_attention matters here:
- on CUDA (flash / memory-efficient / cuDNN kernels) it counts the full s_q x s_k problem for
  QK^T and for the weighted sum, ignoring is_causal and any mask;
- on CPU, torch dispatches to aten._scaled_dot_product_flash_attention_for_cpu, which is not in
  its registry and does not decompose, so it counts NOTHING for attention (checked below).
We register the same full-shape formula for the CPU kernel, and compare with the analytic
count's "kernel" convention, which counts the shapes this code hands to its kernels.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from chiarformer import ChiarConfig, ChiarForCausalLM
from chiarformer import flops as fl
from chiarformer.cli import main


def _sdpa_cpu(query_shape, key_shape, value_shape, *args, **kwargs):
    return sdpa_flop_count(query_shape, key_shape, value_shape)


CPU_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu}


def measured_macs_per_token(cfg: ChiarConfig, t: int, batch: int = 2) -> float:
    torch.manual_seed(0)
    model = ChiarForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, t))
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model(ids)
    return counter.get_total_flops() / 2 / (batch * t)


def observed_shares(cfg: ChiarConfig, t: int, batch: int = 2):
    torch.manual_seed(0)
    model = ChiarForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, t))
    with torch.no_grad():
        routing = model(ids, return_routing=True).routing
    attn = [float((routing[i].ops == 1).float().mean()) for i in cfg.routed_layers]
    rbf = [float((routing[i].ops == 2).float().mean()) for i in cfg.routed_layers]
    return attn, rbf


def test_cpu_sdpa_is_invisible_to_flop_counter_mode_without_a_mapping():
    q = torch.randn(1, 2, 32, 8)
    with FlopCounterMode(display=False) as plain:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as mapped:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    full = 2 * (2 * 2 * 32 * 32 * 8)  # QK^T and AV, full square although causal
    assert mapped.get_total_flops() == full
    assert plain.get_total_flops() == 0  # why CPU_SDPA exists (torch 2.13 counts nothing here)


def test_baseline_by_hand():
    cfg = ChiarConfig.from_preset("paper-17m", layout="baseline")
    d, ff, v, t = 256, 1024, 50257, 256
    count = fl.count_flops(cfg, t)
    per_layer = 3 * d * d + 2 * d * (t + 1) / 2 + d * d + 2 * d * ff
    assert count.forward_per_token == pytest.approx(4 * per_layer + d * v)
    assert count.component("head") == d * v
    assert count.forward_per_sequence == pytest.approx(count.forward_per_token * t)
    assert count.train_per_token == pytest.approx(3 * count.forward_per_token)
    full = fl.count_flops(cfg, t, scores="full")
    assert full.component("scores") == pytest.approx(4 * 2 * d * t)


def test_training_step_counts_the_entropy_once():
    cfg = ChiarConfig.from_preset("paper-17m")  # D, DA, DA, A: two routed layers
    d = 256
    count = fl.count_flops(cfg, 256, attn_fraction=0.25)
    assert count.entropy_per_token == 2 * (d * d + 2 * d)
    assert count.train_per_token == pytest.approx(3 * count.forward_per_token - 2 * count.entropy_per_token)


def test_chiar_by_hand_17m():
    cfg = ChiarConfig.from_preset("paper-17m")  # D, DA, DA, A
    d, t, f = 256, 256, 0.25
    count = fl.count_flops(cfg, t, attn_fraction=f)
    routed = (d * d + 2 * d) + 2 * d * d + f * (d * d + d * (t + 1) + d * d) + (1 - f) * d * d
    attn = 4 * d * d + d * (t + 1)
    assert count.mixing_per_token == pytest.approx(d * d + 2 * routed + attn)
    assert count.attention_share_per_layer == [0.0, f, f, 1.0]


def test_paper_definition_and_spec_conventions():
    cmp = fl.compare(ChiarConfig.from_preset("paper-17m"), 256, attn_fraction=0.25)
    assert cmp.paper_attention_reduction == pytest.approx(0.625)
    # SPEC §3.8's figures count every query against all T keys and the DCT/router as O(d log d).
    spec = dict(scores="full", dct_cost="fft")
    c17 = fl.compare(ChiarConfig.from_preset("paper-17m"), 256, attn_fraction=0.25, **spec)
    assert c17.total_reduction == pytest.approx(0.05, abs=0.01)
    assert c17.attention_reduction == pytest.approx(0.50, abs=0.02)
    c400 = fl.compare(ChiarConfig.from_preset("paper-400m"), 256, attn_fraction=0.5, **spec)
    assert c400.total_reduction == pytest.approx(0.09, abs=0.01)
    c400 = fl.compare(ChiarConfig.from_preset("paper-400m"), 256, attn_fraction=0.25, **spec)
    assert c400.total_reduction == pytest.approx(0.13, abs=0.01)
    # As executed (dense DCT matrices, causal scores) the savings are much smaller.
    assert 0 < cmp.total_reduction < c17.total_reduction


def test_reductions_move_the_right_way():
    cfg = ChiarConfig.from_preset("paper-17m")
    a = [fl.compare(cfg, 256, attn_fraction=f).attention_reduction for f in (0.0, 0.25, 0.5, 1.0)]
    assert a == sorted(a, reverse=True)
    longer = fl.compare(cfg.replace(max_seq_len=4096), 4096, attn_fraction=0.25)
    assert longer.total_reduction > fl.compare(cfg, 256, attn_fraction=0.25).total_reduction
    dense = fl.compare(cfg.replace(execution="dense"), 256, attn_fraction=0.25)
    assert dense.total_reduction < 0  # the published execution saves nothing (SPEC §3.1)
    same = fl.compare(cfg.replace(layout="baseline"), 256)
    assert same.total_reduction == pytest.approx(0.0) and same.attention_reduction == pytest.approx(0.0)


def test_three_operator_shares_and_errors():
    assert fl.layer_shares((0, 1, 2), 0.25) == {0: 0.375, 1: 0.25, 2: 0.375}
    assert fl.layer_shares((0, 2), 0.3) == {0: pytest.approx(0.7), 2: 0.3}
    from chiarformer.errors import UserError

    with pytest.raises(UserError):
        fl.layer_shares((0, 1, 2), 0.8, 0.5)
    with pytest.raises(UserError):
        fl.count_flops(ChiarConfig.from_preset("tiny"), 64, attn_fraction=[0.1])
    with pytest.raises(UserError):
        fl.count_flops(ChiarConfig.from_preset("tiny"), 64, scores="bogus")


def _tiny(**kw) -> ChiarConfig:
    return ChiarConfig.from_preset("tiny", **kw)


@pytest.mark.parametrize(
    "cfg, fraction",
    [
        (_tiny(layout="baseline"), None),
        (_tiny(routing="topk", allow_noncausal=True, attn_fraction=0.25), 0.25),  # exactly k per sequence
        (_tiny(tau=0.0), 1.0),  # H > 0 always: every token to attention, through the gather path
        (_tiny(tau=1.0), 0.0),  # H <= 1 always: every token to the DCT
        (_tiny(execution="dense"), None),
        (_tiny(layout="three_op", tau=[[0.3, 0.9], [0.3, 0.9]]), "observed"),
        (_tiny(meta_router="causal", routing="topk", allow_noncausal=True, attn_fraction=0.5), 0.5),
        (_tiny(routing="capacity", tau=0.0, attn_fraction=0.25), "observed"),  # every token a candidate, capped
        # Layers that run dense although execution="sparse" (sparse.runs_dense): hard routing with
        # the published straight-through, and the published quadratic RBF.
        (_tiny(routing="hard", straight_through="all"), "observed"),
        (_tiny(layout="D,DR,DA,A", rbf="reference_quadratic", allow_noncausal=True, tau=[0.84, 0.84]), "observed"),
    ],
    ids=["baseline", "topk-0.25", "tau0-all-attn", "tau1-all-dct", "dense", "three-op", "meta-topk-0.5", "capacity",
         "hard-st-all", "published-rbf"],
)
@pytest.mark.parametrize("t", [64, 192])
def test_matches_flop_counter_mode(cfg, fraction, t):
    batch = 2
    measured = measured_macs_per_token(cfg, t, batch)
    kwargs = {}
    if fraction == "observed":
        kwargs["attn_fraction"], kwargs["rbf_fraction"] = observed_shares(cfg, t, batch)
    elif fraction is not None:
        kwargs["attn_fraction"] = fraction
    analytic = fl.count_flops(cfg, t, scores="kernel", batch_size=batch, **kwargs).forward_per_token
    assert analytic == pytest.approx(measured, rel=0.05)


def test_cli_json_and_text(capsys):
    assert main(["flops", "--preset", "paper-17m", "--attn-fraction", "0.25", "--seq-len", "256", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"attention_reduction", "total_reduction", "components"} <= set(data)
    assert 0 < data["total_reduction"] < data["attention_reduction"] < 1
    assert set(data["components"]) == set(fl.COMPONENTS)
    assert data["paper_attention_reduction"] == pytest.approx(0.625)

    assert main(["flops", "--preset", "paper-17m", "--attn-fraction", "0.25", "--per-layer"]) == 0
    text = capsys.readouterr().out
    assert "62.50%" in text and "paper's definition" in text and "attention sub-layer reduction" in text

    assert main(["flops", "--preset", "tiny", "--model", "three_op", "--seq-len", "128", "--json",
                 "--scores", "full", "--dct-cost", "fft", "--batch", "4"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["chiar"]["layers"][1]["ops"] == "DRA"
    assert math.isfinite(data["total_reduction"])


def test_cli_user_errors(capsys):
    assert main(["flops", "--preset", "paper-17m", "--model", "XYZ"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["flops", "--attn-fraction", "1.5"]) == 2
    assert main(["flops", "--run", "/nonexistent/run"]) == 2
