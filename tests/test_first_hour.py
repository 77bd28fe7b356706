"""The first hour of a new user: `chiar --version`, `python -m chiarformer`, `chiar config` without
--task, honest comments and time figures, `chiar eval --max-batches` saying "partial", and the
quickstart's tokens/s (median, noisy, load warning) and progress lines when output is not a terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from chiarformer import quickstart
from chiarformer.cli import build_parser, main

from corpus import TINY, set_args, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "chiarformer", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and re.fullmatch(r"chiar \S+\n", done.stdout), done.stdout + done.stderr
    done = subprocess.run([sys.executable, "-m", "chiarformer", "frobnicate"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ")


def test_config_without_task_prints_a_loadable_default(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "No --task given" in out
    assert yaml.safe_load(out)["task"] == "wikitext103"


def test_comments_describe_the_preset_values(capsys):
    assert main(["config", "--task", "listops", "--preset", "tiny"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("vocab_size:"))
    assert line.split("#")[0].split(":")[1].strip() == "512"
    assert not line.split("#")[1].strip().startswith("GPT-2 BPE")  # 512 is not the GPT-2 vocabulary


def test_one_quickstart_time_everywhere():
    figure = "about 2 min"
    readme = (ROOT / "README.md").read_text()
    assert figure in readme.split("## ")[0]  # the install/first-run block at the top
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert figure in sub.choices["quickstart"].format_help() and figure in parser.format_help()
    for text in (readme, sub.choices["quickstart"].format_help(), quickstart.__doc__):
        assert "2.5 min" not in text and "< 5 min" not in text and "2 min each" not in text


def test_no_user_facing_text_mentions_shared_machines():
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "configs").glob("*.yaml"),
             *(ROOT / "src").rglob("*.py")]
    hits = [str(f) for f in files if "shared machine" in f.read_text(encoding="utf-8").lower()]
    assert hits == []


def test_eval_with_max_batches_says_partial(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHIAR_CACHE_DIR", str(tmp_path / "cache"))
    train = write_corpus(tmp_path / "train.txt", 3000, 0)
    run = tmp_path / "run"
    args = ["--task", "text", "--preset", "tiny", *set_args(TINY + [f"data.train_files=[{train}]", "train.max_steps=2"])]
    assert main(["train", *args, "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--max-batches", "1"]) == 0
    assert "(partial: 1 batch(es)" in capsys.readouterr().out
    assert main(["eval", "--run", str(run)]) == 0
    assert "partial" not in capsys.readouterr().out


def test_median_tokens_per_s(tmp_path):
    records = [{"kind": "train", "tokens_per_s": v} for v in (100.0, 5000.0, 300.0, 200.0)] + [{"kind": "eval"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert quickstart.median_tokens_per_s(tmp_path) == 250.0  # one fast window does not move it
    assert quickstart.median_tokens_per_s(tmp_path / "none") is None


def test_quickstart_warns_under_load_and_shows_progress_off_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("os.getloadavg", lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr("chiarformer.train.display.PROGRESS_S", 0.0)  # a line after every step
    quickstart.run_quickstart(steps=4, n_train=64, n_eval=32, out=str(tmp_path / "qs"))
    captured = capsys.readouterr()  # neither stream is a terminal here
    assert "train tokens/s (median, noisy)" in captured.out
    assert "WARNING: the machine's load average reached 64.0" in captured.out
    assert "step 3/4: loss" in captured.err


def test_quickstart_does_not_count_its_own_threads_as_load(tmp_path, monkeypatch, capsys):
    busy = float(os.cpu_count() or 1)  # the run's own threads on every core, nothing else
    monkeypatch.setattr("os.getloadavg", lambda: (busy, busy, busy))
    quickstart.run_quickstart(steps=2, n_train=64, n_eval=32, out=str(tmp_path / "qs"))
    assert "WARNING" not in capsys.readouterr().out
