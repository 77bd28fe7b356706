"""`chiar reproduce` (smoke scale end to end through the CLI) and the two routing controls it needs:
random routing at a fixed share, and quantile (tau-tracking) routing."""

import copy
import json
import lzma
import random
import shutil
from pathlib import Path

import pytest
import torch

from chiarformer import ChiarConfig, ChiarForCausalLM
from chiarformer.cli import main
from chiarformer.model import KVCache
from chiarformer.operators import ATTN, DCT
from chiarformer.reproduce.matrix import CLAIMS, LM, build_matrix
from chiarformer.reproduce.run import run_config
from chiarformer.train.loop import Trainer


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


# ---------------------------------------------------------------- chiar reproduce, smoke scale
SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2_tokenizer"
WORDS = "the cat sat on a mat and dog ran to red ball film plot good bad great awful".split()


def tiny_data(root: Path) -> Path:
    """A data folder with small WikiText-2 raw files and IMDB JSON lines (balanced labels)."""
    rng = random.Random(0)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    (root / "wikitext2_raw").mkdir(parents=True)
    (root / "wikitext2_raw" / "wiki.valid.raw").write_text("\n".join(f" = T{i} = \n{text(150)}" for i in range(4)))
    (root / "wikitext2_raw" / "wiki.test.raw").write_text(f" = T = \n{text(150)}\n")
    (root / "imdb").mkdir()
    for split in ("train", "test"):
        with lzma.open(root / "imdb" / f"imdb_{split}.jsonl.xz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps({"id": f"{split}/{i}", "label": i % 2, "text": text(40)}) + "\n" for i in range(50))
    return root


def test_reproduce_smoke_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHIAR_DATA_DIR", str(tiny_data(tmp_path / "data")))
    monkeypatch.setenv("CHIAR_CACHE_DIR", str(tmp_path / "cache"))
    out, results = tmp_path / "runs", tmp_path / "results"
    args = ["reproduce", "--scale", "smoke", "--out", str(out), "--results", str(results)]
    runnable = build_matrix("smoke").runs

    # An interrupted run: E1-dct_attn stops right after its checkpoint at step 1 of 2.
    real_save = Trainer.save_checkpoint

    def save_then_stop(self, which):
        real_save(self, which)
        if which == "last" and self.run_dir.name == "E1-dct_attn-s0" and self.progress.step == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)
    assert main([*args, "--only", "E1"]) == 130
    first = capsys.readouterr().out
    assert "estimated time" in first and "E1-baseline-s0" in first and "[to run]" in first  # the plan came first
    assert (results / "smoke" / "E1-baseline-s0.json").is_file()
    assert not (results / "smoke" / "E1-dct_attn-s0.json").is_file()
    monkeypatch.setattr(Trainer, "save_checkpoint", real_save)

    # The whole matrix: the finished run is skipped, the interrupted one resumes, the rest run.
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "interrupted: resumes" in text
    assert "E1-baseline-s0: done" in text and "E1-dct_attn-s0: resuming from step 1" in text
    assert "skipped" not in text  # every run of the matrix is built now, E6's mixed ones included
    # E7 runs right after the E1 pair it reads, before the next experiment's runs.
    assert text.index("E7-calibration-s0: published calibration") < text.index("E2-baseline-s0: training")
    for spec in runnable:
        record = json.loads((results / "smoke" / f"{spec.name}.json").read_text())
        assert record["test"] and record["protocol"]["steps"] == 2
        assert record["command"].startswith("chiar train --task " + spec.task)
        assert record["code"]["torch"] == torch.__version__ and record["tokens_per_s"] > 0
    e7 = json.loads((results / "smoke" / "E7-calibration-s0.json").read_text())
    assert e7["paper"]["layers"] and e7["ours"]["layers"]
    assert json.loads((results / "smoke" / "E6-gate-causal-s0.json").read_text())["meta_gate"] is not None
    mixed = json.loads((results / "smoke" / "E6-mixed-gate-causal-s0.json").read_text())["mixture"]
    assert sum(mixed["extra_batches"].values()) == 2 and mixed["test"]["text"]["ppl"] > 1  # mix.prob=1 at smoke

    # Everything is complete now: a second invocation trains nothing.
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "0 run(s) trained" in again and "training ..." not in again

    # The report reads only the records (the run folders are gone).
    claims, figures = tmp_path / "docs" / "claims.md", tmp_path / "docs" / "figures"
    shutil.rmtree(out)
    assert main([*args, "--report", "--claims", str(claims), "--figures", str(figures)]) == 0
    doc = claims.read_text()
    for claim in CLAIMS:
        assert sum(line.startswith(f"| **{claim}**") for line in doc.splitlines()) == 1
    assert "not testable here" in doc and "chiar reproduce --scale paper --only E2" in doc
    assert any(figures.glob("*.png"))
    assert (figures / "smoke-E1-curves.png").is_file() and "[curves](" in doc  # every LM run's learning curve

    # The records alone mark the runs done: run folders do not outlive the session that trained them.
    assert main(args) == 0
    assert "0 run(s) trained" in capsys.readouterr().out


@pytest.mark.skipif(not SHARED_TOKENIZER.is_dir(), reason="shared GPT-2 tokenizer absent")
def test_paper_scale_is_the_published_protocol_and_plans_without_data(tmp_path, capsys, monkeypatch):
    data = tmp_path / "no-wikitext"
    data.mkdir()
    (data / "gpt2_tokenizer").symlink_to(SHARED_TOKENIZER)  # the tokenizer is there, the corpus is not
    monkeypatch.setenv("CHIAR_DATA_DIR", str(data))
    e1 = [r for r in build_matrix("paper").runs if r.experiment == "E1" and r.group == "dct_attn"][0]
    cfg = run_config(e1, tmp_path)
    t = cfg.train
    assert (cfg.task, cfg.preset, cfg.model.layout, cfg.data.seq_len) == ("wikitext2", "paper-17m", "dct_attn", 256)
    assert (t.batch_size, t.lr, t.warmup_steps, t.min_lr, t.epochs, t.max_steps) == (128, 1e-4, 500, 1e-6, 10.0, 0)
    common = ["--out", str(tmp_path / "r"), "--results", str(tmp_path / "res")]
    assert main(["reproduce", "--scale", "paper", "--plan", "--only", "E2", *common]) == 0
    assert "E2-dct_attn-s2" in capsys.readouterr().out
    # Running it here stops at the loaders' one-line error naming `chiar download`.
    assert main(["reproduce", "--scale", "paper", "--only", "E2", "--seeds", "1", *common]) == 2
    assert "chiar download wikitext103" in capsys.readouterr().err


def test_report_withholds_a_verdict_that_rests_on_a_run_that_did_not_learn(tmp_path):
    from chiarformer.reproduce.report import write_report

    def record(group, seed, ppl):
        return {"name": f"E1-{group}-s{seed}", "experiment": "E1", "group": group, "seed": seed, "family": "lm",
                "test": {"ppl": ppl}, "unigram_ppl": 2000.0, "attn_shares": [0.25, 0.25] if group != "baseline" else []}

    (tmp_path / "cpu").mkdir()
    learned = [record("baseline", s, 700.0 + s) for s in range(3)] + [record("dct_attn", s, 900.0 + s) for s in range(3)]
    for r in learned:
        (tmp_path / "cpu" / f"{r['name']}.json").write_text(json.dumps(r))
    claims = tmp_path / "claims.md"

    def e1_row():
        write_report(tmp_path, "cpu", claims, tmp_path / "figures")
        return next(line for line in claims.read_text().splitlines() if line.startswith("| **E1**"))

    assert "| supported" in e1_row() and "did not learn" not in e1_row()
    stuck = record("dct_attn", 2, 1500.0)  # above half the unigram PPL of its data
    (tmp_path / "cpu" / "E1-dct_attn-s2.json").write_text(json.dumps(stuck))
    assert "no verdict: E1-dct_attn-s2 did not learn" in e1_row()


def test_cpu_runs_on_the_wikitext2_proxy_all_take_e1s_budget():
    """One budget for every run on the main corpus (at half of it the routed models did not clearly
    learn), so E3's and E4's PPLs stand beside E1's."""
    def budget(run):
        sets = dict(s.split("=", 1) for s in run.sets)
        return float(sets["train.epochs"]), int(sets["train.batch_size"])

    runs = build_matrix("cpu").runs
    e1 = next(r for r in runs if r.experiment == "E1")
    epochs, batch = budget(e1)
    assert round(epochs * LM["cpu"].train_tokens_wt2 / (batch * 256)) == 220
    main_corpus = [r for r in runs if r.task == e1.task]
    assert {r.experiment for r in main_corpus} == {"E1", "E3", "E4", "E6"}
    assert {budget(r) for r in main_corpus} == {(epochs, batch)}


def _lm_record(experiment, group, seed, ppl, rbf=0.0):
    """A minimal finished LM run record, as the report reads it (RBF share `rbf` in layers 2-3)."""
    share = [[1.0, 0.0, 0.0], [0.1, 0.9 - rbf, rbf], [0.1, 0.9 - rbf, rbf], [0.0, 1.0, 0.0]]
    return {"name": f"{experiment}-{group}-s{seed}", "experiment": experiment, "group": group, "seed": seed,
            "family": "lm", "task": "wikitext2-proxy", "test": {"ppl": ppl}, "unigram_ppl": 2000.0,
            "op_share": share, "attn_shares": [0.9 - rbf, 0.9 - rbf], "curves": {"train": [], "val": []}}


def _report_row(root, claim, records):
    """The docs/claims.md row of `claim` written from exactly these records (scale cpu)."""
    from chiarformer.reproduce.report import write_report

    runs = root / "cpu"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    for r in records:
        (runs / f"{r['name']}.json").write_text(json.dumps(r))
    write_report(root, "cpu", root / "claims.md", root / "figures")
    return next(line for line in (root / "claims.md").read_text().splitlines() if line.startswith(f"| **{claim}**"))


def test_report_puts_e1s_ppl_beside_e3_and_calls_rbf_collapse_only_when_it_happens(tmp_path):
    def e3_row(rbf):
        runs = [_lm_record("E1", "baseline", s, 870.0 + s) for s in range(3)]
        runs += [_lm_record("E3", g, s, 950.0 + s, rbf) for g in ("soft", "hard") for s in range(3)]
        return _report_row(tmp_path, "E3", runs)

    row = e3_row(rbf=0.9)
    assert "E1 baseline (same data, budget and seeds): test PPL 871.00" in row
    assert "| contradicted" in row and "RBF share 90.0" in row
    assert "| supported" in e3_row(rbf=0.001)


def test_report_gives_no_verdict_before_three_seeds_a_side(tmp_path):
    # The rule: a verdict rests on at least 3 seeds. Runs land one at a time, so the
    # report must say "no verdict yet" in between, not judge on one or two seeds.
    def e4(n_seeds, random_ppl):
        runs = [_lm_record("E4", "quantile-0.25", s, 900.0 + s) for s in range(n_seeds)]
        runs += [_lm_record("E4", "random-0.25", s, random_ppl + s) for s in range(n_seeds)]
        return _report_row(tmp_path, "E4", runs)

    for n in (1, 2):
        assert "no verdict yet (fewer than 3 seeds a side) at 0.25" in e4(n, 990.0)
    assert "entropy routing better at 0.25" in e4(3, 990.0)
    assert "entropy routing no better than random at 0.25" in e4(3, 900.5)

    def e3(n_hard):
        runs = [_lm_record("E3", "soft", s, 950.0, rbf=0.9) for s in range(3)]
        runs += [_lm_record("E3", "hard", s, 950.0, rbf=0.9) for s in range(n_hard)]
        return _report_row(tmp_path, "E3", runs)

    assert "| no verdict yet" in e3(2) and "| contradicted" in e3(3)

    e1 = [_lm_record("E1", "baseline", s, 870.0 + s) for s in range(3)]
    assert "| no verdict yet" in _report_row(tmp_path, "E1", e1 + [_lm_record("E1", "dct_attn", 0, 990.0)])
