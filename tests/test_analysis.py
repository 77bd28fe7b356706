"""Routing analysis: calibration, routing views, reports and collapse detection.

Run folders come from the engine itself: one short real training run (tiny model, bytes
tokenizer, generated text, a few seconds) and folders written with the engine's own config and
checkpoint helpers. No shared data is needed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from chiarformer import ChiarConfig, ChiarForCausalLM
from chiarformer.analysis import calibrate as cal
from chiarformer.analysis import common
from chiarformer.analysis.collapse import detect_collapse, tail_window, train_records
from chiarformer.analysis.report import summarize_run
from chiarformer.analysis.route import render_ansi, render_html, render_png, route_text
from chiarformer.cli import main
from chiarformer.errors import UserError
from chiarformer.train.runs import load_run

WORDS = ("the a of to and in is was for on that with as by at from his her which an are were it this be "
         "river city music war king game film song team album season church station school army").split()


def _text(seed: int, n_words: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_words // 12):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ".")
    return "\n".join(lines) + "\n"


MODEL_SETS = ["model.d_model=32", "model.n_heads=2", "model.n_layers=4", "model.tau=0.8"]


def _run_config(tmp: Path, layout: str, extra: list[str] = ()):
    from chiarformer.train.run_config import resolve

    return resolve("text", "tiny", layout, None, [
        f"data.train_files=[{tmp / 'train.txt'}]", f"data.val_files=[{tmp / 'val.txt'}]",
        "data.tokenizer=bytes", "data.seq_len=64", *MODEL_SETS,
        "train.max_steps=8", "train.batch_size=8", "train.log_every=1", "train.eval_every=4",
        "train.progress=false", "train.warmup_steps=2", *extra,
    ])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("analysis")
    old = os.environ.get("CHIAR_CACHE_DIR")
    os.environ["CHIAR_CACHE_DIR"] = str(root / "cache")
    (root / "train.txt").write_text(_text(0, 6000))
    (root / "val.txt").write_text(_text(1, 1500))
    yield root
    if old is None:
        os.environ.pop("CHIAR_CACHE_DIR", None)
    else:
        os.environ["CHIAR_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def trained_run(workspace):
    """A real (short) training run of a routed model, through the engine."""
    from chiarformer.train.loop import train

    run = workspace / "chiar"
    train(_run_config(workspace, "dct_attn"), run, quiet=True)
    return run


def _write_run(workspace: Path, name: str, layout: str, metrics: list[dict], extra: list[str] = ()) -> Path:
    """A run folder written with the engine's helpers (config.yaml, best/last checkpoints)."""
    from chiarformer.model import build_model
    from chiarformer.train import checkpoint as C

    cfg = _run_config(workspace, layout, extra)
    cfg.model = cfg.model.replace(vocab_size=257)  # bytes tokenizer + end of text
    run = workspace / name
    run.mkdir()
    cfg.save(run / "config.yaml")
    torch.manual_seed(1)
    model = build_model(cfg.model, "lm")
    for which in ("best", "last"):
        (run / "checkpoints" / which).mkdir(parents=True)
        C.save_model_file(run / "checkpoints" / which / "model.safetensors", model.state_dict(), cfg.model.to_dict(),
                          {"step": 10})
        (run / "checkpoints" / which / "meta.json").write_text(json.dumps({"step": 10}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return run


def _train_records(n_steps: int, shares_at) -> list[dict]:
    return [{"kind": "train", "step": s, "tokens": 512 * s, "loss": 5.0 - 0.01 * s, "lr": 1e-4, "tokens_per_s": 1000.0,
             "op_share": shares_at(s), "meta_gate": 0.5 - 0.001 * s, "time": float(s)} for s in range(1, n_steps + 1)]


# --------------------------------------------------------------------------- collapse
def test_collapse_flags_only_operators_stuck_below_threshold():
    def shares(step):
        late = step > 80
        return [[1.0, 0.0, 0.0],
                [0.5, 0.5 - (0.004 if late else 0.2), 0.004 if late else 0.2],  # RBF collapses late
                [0.6, 0.4 if step % 2 else 0.0, 0.0],  # DA layer: attention dips to 0 sometimes, not stuck
                [0.0, 1.0, 0.0]]

    records = _train_records(100, shares)
    layer_ops = [(0,), (0, 1, 2), (0, 1), (1,)]
    found = detect_collapse(records, layer_ops)
    assert [(c.layer, c.op_name) for c in found] == [(1, "rbf")]
    assert found[0].max_share == pytest.approx(0.004)
    assert "layer 2: rbf" in found[0].describe()
    # an operator that recovers inside the window is not flagged
    records[-1]["op_share"][1][2] = 0.05
    assert detect_collapse(records, layer_ops) == []
    # without the layout: operators ever used define the routed layers; single-op layers are skipped
    assert [(c.layer, c.op) for c in detect_collapse(_train_records(100, shares))] == [(1, 2)]
    assert detect_collapse([{"kind": "eval", "step": 3}], layer_ops) == []


def test_tail_window_by_steps():
    rows = train_records([{"kind": "train", "step": s, "op_share": [[1, 0, 0]]} for s in (50, 10, 100, 90, 85, 79)])
    assert [r["step"] for r in rows] == [10, 50, 79, 85, 90, 100]
    assert [r["step"] for r in tail_window(rows, 0.2)] == [85, 90, 100]


# --------------------------------------------------------------------------- calibration maths
def test_taus_for_shares_hits_targets():
    rng = np.random.default_rng(0)
    h = rng.normal(0.85, 0.02, 10_000).astype(np.float32)
    (tau,) = cal.taus_for_shares(h, (0, 1), {0: 0.75, 1: 0.25})
    assert np.mean(h > np.float32(tau)) == pytest.approx(0.25, abs=1e-3)
    low, high = cal.taus_for_shares(h, (0, 1, 2), cal.layer_targets((0, 1, 2), None, None))
    assert np.mean(h <= low) == pytest.approx(1 / 3, abs=1e-3)
    assert np.mean(h > high) == pytest.approx(1 / 3, abs=1e-3)
    assert cal.layer_targets((0, 1, 2), 0.2, 0.3) == {0: pytest.approx(0.5), 2: 0.3, 1: 0.2}
    assert cal.layer_targets((0, 1), None, None) == {0: 0.75, 1: 0.25}
    with pytest.raises(UserError):
        cal.layer_targets((0, 1, 2), 0.8, 0.5)


def test_ties_go_to_the_nearer_side():
    h = np.array([0.1] * 65 + [0.2] * 25 + [0.3] * 10, dtype=np.float32)
    (tau,) = cal.taus_for_shares(h, (0, 1), {0: 0.75, 1: 0.25})  # 35% or 10% above are reachable: 35% is nearer
    assert np.mean(h > np.float32(tau)) == pytest.approx(0.35)
    (tau,) = cal.taus_for_shares(h, (0, 1), {0: 0.85, 1: 0.15})
    assert np.mean(h > np.float32(tau)) == pytest.approx(0.10)
    (tau,) = cal.taus_for_shares(h, (0, 1), {0: 0.0, 1: 1.0})
    assert np.mean(h > np.float32(tau)) == 1.0


def test_paper_taus_are_percentiles():
    h = np.linspace(0.0, 1.0, 101)
    low, high, mid = cal.paper_taus(h)
    assert (low, high, mid) == pytest.approx((0.33, 0.67, 0.5))


@pytest.mark.parametrize("layout, target", [("dct_attn", 0.25), ("dct_attn", 0.5), ("three_op", None)])
def test_calibrate_hidden_reaches_the_target(layout, target):
    torch.manual_seed(0)
    cfg = ChiarConfig.from_preset("tiny", d_model=32, n_heads=2, layout=layout, n_layers=5)
    model = ChiarForCausalLM(cfg).eval()
    batches = [common.Batch(torch.randint(0, cfg.vocab_size, (4, 64)), None) for _ in range(2)]
    result = cal.calibrate_hidden(model, batches, target)
    want = 1 / 3 if target is None else target
    for lc in result.layers:
        assert lc.achieved["attn"] == pytest.approx(want, abs=0.04), lc
        if layout == "three_op":
            assert lc.achieved["rbf"] == pytest.approx(1 / 3, abs=0.04)
    # the model routes with the new taus: a fresh pass reproduces the achieved shares
    stats = common.collect_routing(model, batches)
    for lc in result.layers:
        assert stats.share(lc.layer, 1) == pytest.approx(lc.achieved["attn"])
    assert model.cfg.tau == result.taus


def test_calibrate_refuses_what_has_no_tau():
    for cfg in (ChiarConfig.from_preset("tiny", layout="baseline"),
                ChiarConfig.from_preset("tiny", routing="topk", allow_noncausal=True),
                ChiarConfig.from_preset("tiny", routing="soft")):
        with pytest.raises(UserError):
            cal.calibrate_hidden(ChiarForCausalLM(cfg).eval(), [], 0.25)


# --------------------------------------------------------------------------- run folders
def test_calibrate_run_stores_taus_everywhere(trained_run, tmp_path, capsys):

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before_last = load_run(run, "last").model.state_dict()
    assert main(["calibrate", "--run", str(run), "--target-attn", "0.3", "--max-batches", "4"]) == 0
    out = capsys.readouterr().out
    assert "layer 2 (DA)" in out and "layer 3 (DA)" in out and "achieved" in out
    record = json.loads((run / "calibration.json").read_text())
    taus = record["taus"]
    assert len(taus) == 2 and record["method"] == "hidden"
    for row in record["layers"]:
        assert row["achieved"]["attn"] == pytest.approx(0.3, abs=0.05)
    assert common.read_run_config(run)["model"]["tau"] == pytest.approx(taus)
    for which in ("best", "last"):
        loaded = load_run(run, which)
        assert loaded.model.cfg.tau == pytest.approx(taus)
        for j, i in enumerate(loaded.model.cfg.routed_layers):
            assert float(loaded.model.model.layers[i].router.tau[0]) == pytest.approx(taus[j])
    after_last = load_run(run, "last").model.state_dict()
    for key, value in before_last.items():  # last keeps its own weights (only the tau buffers change)
        if not key.endswith("router.tau"):
            assert torch.equal(value, after_last[key]), key


def test_calibrate_paper_method(trained_run, workspace, tmp_path, capsys):
    base = _write_run(workspace, "base-for-paper", "baseline", [])
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["calibrate", "--run", str(run), "--method", "paper", "--baseline-run", str(base),
                 "--max-batches", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "paper"
    t2, t3 = result["taus"]
    assert t2 == t3  # one value for every routed layer: the midpoint of the 33rd/67th percentiles
    loaded = load_run(base)
    batches = common.validation_batches(loaded, "val", 8, 2)
    low, high, mid = cal.paper_taus(cal.embedding_entropies(loaded.model, batches))
    assert t2 == pytest.approx(mid)
    assert "baseline run" in result["source"]


def test_route_uses_the_models_own_decisions(trained_run, tmp_path):
    loaded = load_run(trained_run)
    text = "The river city was the king of music."
    view = route_text(loaded.model, loaded.tokenizer, text)
    ids = torch.tensor([loaded.tokenizer.encode(text)])
    with torch.no_grad():
        routing = loaded.model(ids, return_routing=True).routing
    for i, info in enumerate(routing):
        assert np.array_equal(view.ops[i], info.ops[0].numpy())
        assert np.allclose(view.entropy[i], info.entropy[0].numpy())
    assert view.routed == [1, 2]
    # change the model's thresholds: the view follows the model, nothing is re-thresholded here
    loaded.model.set_taus([0.0, 1.0])
    forced = route_text(loaded.model, loaded.tokenizer, text)
    assert (forced.ops[1] == 1).all() and (forced.ops[2] == 0).all()

    colored = render_ansi(view, color=True)
    plain = render_ansi(view, color=False)
    assert "\x1b[" in colored and "\x1b[" not in plain
    assert "layer 2 (DA" in plain and "L3 H" in plain

    page = render_html(view, title="t <x>")
    assert page.startswith("<!DOCTYPE html>") and "t &lt;x&gt;" in page
    assert "http" not in page and "<script" not in page and "<link" not in page  # self-contained
    assert page.count('class="tok op') >= 2 * len(view.ids)
    assert "H=" in page and "title=" in page

    png = render_png(view, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_route_cli(trained_run, tmp_path, capsys):
    html, png = tmp_path / "o.html", tmp_path / "o.png"
    assert main(["route", "--run", str(trained_run), "Hello there, city.", "--html", str(html), "--png", str(png),
                 "--color", "always"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[48;5;" in out and html.is_file() and png.is_file()
    assert main(["route", "--run", str(trained_run), "abc", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["tokens"]) == 3 and data["layers"][1]["ops"] == "DA"
    assert main(["route", "--run", str(tmp_path / "missing"), "abc"]) == 2
    assert "error:" in capsys.readouterr().err


def test_report(trained_run, workspace, tmp_path, capsys):
    def shares(step):
        return [[1.0, 0.0, 0.0], [0.995 if step > 16 else 0.6, 0.005 if step > 16 else 0.4, 0.0],
                [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]

    metrics = _train_records(20, shares) + [
        {"kind": "eval", "split": "val", "step": 20, "loss": 4.0, "ppl": 54.6, "bpb": 5.0, "accuracy": 0.1,
         "op_share": shares(20), "protocol": {"tokenizer": "bytes", "context": 64, "stride": 64}}]
    collapsed = _write_run(workspace, "collapsed", "dct_attn", metrics, ["model.meta_router=causal"])
    out = tmp_path / "docs" / "report.md"
    assert main(["report", str(trained_run), str(collapsed), "--out", str(out), "--max-batches", "1"]) == 0
    text = out.read_text()
    assert "| run | task | model |" in text
    assert "| chiar | text | dct_attn / threshold" in text
    assert "COLLAPSE at layer 2: attention" in text
    assert "**chiar**: no collapse" in text
    figures = out.parent / "report_figures"
    for name in ("training_curves.png", "op_usage_chiar.png", "op_usage_collapsed.png", "entropy_chiar.png",
                 "entropy_collapsed.png", "meta_gate.png"):
        assert (figures / name).read_bytes()[:4] == b"\x89PNG", name
        assert f"report_figures/{name}" in text
    summary = summarize_run(trained_run)
    assert summary.results is not None and summary.routed == [1, 2]
    # without --out: markdown on stdout, no figures
    assert main(["report", str(trained_run), "--no-entropy"]) == 0
    assert "Figures not written" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_flops_from_a_run(trained_run, capsys):
    assert main(["flops", "--run", str(trained_run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    measured = summarize_run(trained_run).results["best"]["val"]["op_share"]
    assert data["chiar"]["attention_share_per_layer"] == pytest.approx([row[1] for row in measured])


def test_embedding_entropies_follow_the_model_entropy_definition():
    """The published calibration uses the published entropy (DC power weighted 2x) on embeddings."""
    from chiarformer.analysis.calibrate import embedding_entropies
    from chiarformer.analysis.common import Batch
    from chiarformer.ops import reference_spectral_entropy, spectral_entropy

    ids = torch.randint(0, 64, (2, 10))
    for entropy, fn in (("ortho", spectral_entropy), ("reference", reference_spectral_entropy)):
        torch.manual_seed(0)
        model = ChiarForCausalLM(ChiarConfig.from_preset("tiny", vocab_size=64, entropy=entropy))
        with torch.no_grad():
            model.model.embed.weight.add_(0.05)  # a non-zero feature mean: the two definitions differ
        got = embedding_entropies(model, [Batch(ids, None)])
        np.testing.assert_allclose(got, fn(model.model.embed.weight[ids]).detach().reshape(-1).numpy(), atol=1e-6)
    assert np.abs(got - spectral_entropy(model.model.embed.weight[ids]).reshape(-1).numpy()).max() > 1e-3


def test_calibrate_says_it_rewrites_the_run(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = (run / "config.yaml").read_text()
    assert main(["calibrate", "--run", str(run), "--max-batches", "2", "--dry-run"]) == 0
    assert "dry run: nothing stored" in capsys.readouterr().out and (run / "config.yaml").read_text() == before
    assert main(["calibrate", "--run", str(run), "--max-batches", "2"]) == 0
    assert f"rewrote the run {run} in place" in capsys.readouterr().out
    assert (run / "config.yaml").read_text() != before


def test_route_png_shows_entropy_scale_tau_margins_and_only_present_operators(trained_run):
    from chiarformer.analysis.route import route_figure, tau_margin

    loaded = load_run(trained_run)
    text = "The river city was the king of music."
    for taus, legend in (([1.0, 1.0], ["DCT"]), ([0.0, 1.0], ["DCT", "ATTN"])):
        loaded.model.set_taus(taus)
        view = route_text(loaded.model, loaded.tokenizer, text)
        fig = route_figure(view)
        ax_op, ax_h, bar = fig.axes
        assert [t.get_text() for t in ax_op.get_legend().get_texts()] == legend
        assert bar.get_ylabel() == "spectral entropy H"
        margin = tau_margin(view, 1)
        assert np.allclose(margin, view.entropy[1] - taus[0])
        cells = [t.get_text() for t in ax_h.texts]
        assert cells[0] == f"{margin[0]:+.3f}".replace("0.", ".", 1)
        assert "H - tau" in ax_h.get_title()


def test_report_labels_proxies_and_keeps_lm_accuracy_off_the_classification_axis(workspace):
    from chiarformer.analysis.report import RunSummary, markdown_table, training_curves_figure

    def summary(name, kind, proxy):
        evals = [{"kind": "eval", "split": "val", "step": s, "loss": 3.0 / s, "accuracy": 0.1 * s} for s in (1, 2)]
        results = {"kind": kind, "protocol": {"tokenizer": "gpt2", "context": 64, "proxy": proxy}}
        return RunSummary(workspace / name, name, {"task": "t"}, None, evals, results)

    lm, cls = summary("lm-proxy", "lm", True), summary("cls", "cls", False)
    table = markdown_table([lm, cls])
    assert "proxy data, not the official protocol" in table and "PROXY" not in table
    fig = training_curves_figure([lm, cls])
    acc_axis = fig.axes[1]
    assert [line.get_label() for line in acc_axis.get_lines()] == ["cls"]  # the LM's next-token accuracy is not here
    assert "classification" in acc_axis.get_ylabel()
