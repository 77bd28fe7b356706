"""A new task is one TaskSpec: registered in one place (the fixture below), it trains through
`chiar train`, is listed by `chiar tasks`, and its run evaluates and loads like any other."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from chiarformer.cli import main
from chiarformer.data import ClassificationData, Task, TaskSpec, get_tokenizer, register_task
from chiarformer.data.tasks import TASKS
from chiarformer.train.runs import load_run


def _toy_loader(*, data_dir, cache, seq_len, data_seed=0, val_fraction=0.1) -> Task:
    """Random byte strings labelled by the parity of their first byte."""
    tok = get_tokenizer("bytes")
    rng = np.random.default_rng(data_seed)
    rows = [rng.integers(0, 256, int(rng.integers(2, seq_len + 1))).tolist() for _ in range(80)]
    n_val = max(1, int(len(rows) * val_fraction))
    splits = {"train": rows[: -2 * n_val], "val": rows[-2 * n_val : -n_val], "test": rows[-n_val:]}
    data = {s: ClassificationData.from_sequences(r, [x[0] % 2 for x in r], tok.pad_id) for s, r in splits.items()}
    protocol = {"task": "toy-parity", "kind": "cls", "seed": data_seed, "sizes": {s: len(r) for s, r in splits.items()}}
    return Task("toy-parity", "cls", data["train"], data["val"], data["test"], tok, seq_len, protocol, n_classes=2)


@pytest.fixture()
def toy_task(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIAR_CACHE_DIR", str(tmp_path / "cache"))
    register_task(TaskSpec(
        "toy-parity", "cls", "parity of the first byte of random byte strings (a test task)", "generated in memory",
        _toy_loader, lambda options: get_tokenizer("bytes"),
        {"preset": "tiny", "model": {"d_model": 32, "n_layers": 3, "n_heads": 2, "n_classes": 2},
         "train": {"max_steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_every": 2, "log_every": 2,
                   "device": "cpu", "progress": False},
         "data": {"seq_len": 12}}))
    yield "toy-parity"
    TASKS.pop("toy-parity", None)


def test_a_registered_task_trains_through_chiar_train(capsys, tmp_path, toy_task):
    run = tmp_path / "run"
    code = main(["train", "--task", toy_task, "--model", "dct_attn", "--set", "data.data_seed=3", "--out", str(run)])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "best val" in out and "accuracy" in out
    results = json.loads((run / "results.json").read_text())
    assert results["kind"] == "cls" and {"loss", "accuracy"} <= set(results["test"])
    assert results["protocol"]["seed"] == 3  # data.data_seed reached the loader by its own name
    assert results["protocol"]["sizes"] == {"train": 64, "val": 8, "test": 8}
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["task"] == toy_task and saved["data"]["seq_len"] == 12 and saved["model"]["vocab_size"] == 257
    assert saved["train"]["max_steps"] == 4  # the task's own training defaults

    loaded = load_run(run)
    assert loaded.kind == "cls" and loaded.tokenizer.name == "bytes"
    code = main(["eval", "--run", str(run), "--split", "test", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["accuracy"] == pytest.approx(results["test"]["accuracy"])

    assert main(["tasks"]) == 0
    assert "toy-parity" in capsys.readouterr().out


def test_a_run_of_an_unknown_task_is_a_clear_error(capsys, tmp_path, toy_task):
    run = tmp_path / "run"
    assert main(["train", "--task", toy_task, "--out", str(run), "--quiet"]) == 0
    capsys.readouterr()
    del TASKS[toy_task]  # the task is gone (e.g. a plugin not installed): no silent guess of its kind
    code = main(["eval", "--run", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: unknown task 'toy-parity'") and len(err.splitlines()) == 1
