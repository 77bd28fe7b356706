"""The `chiar` command line: bad input gives one `error:` line and exit status 2; train/eval/config/
tasks work end to end; quickstart runs (reduced size)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from chiarformer.cli import main
from chiarformer.data.tasks import TASKS
from chiarformer.train.metrics import format_metrics

from corpus import TINY, set_args, write_corpus


@pytest.fixture()
def text_task(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIAR_CACHE_DIR", str(tmp_path / "cache"))
    train_file = write_corpus(tmp_path / "train.txt", 2000, 0)
    test_file = write_corpus(tmp_path / "test.txt", 500, 1)
    sets = TINY + [f"data.train_files=[{train_file}]", f"data.test_files=[{test_file}]"]
    return ["--task", "text", "--preset", "tiny", "--model", "dct_attn", *set_args(sets)]


def run_main(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code, err, fragment):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, fragment", [
    (["train", "--task", "wikitext7"], "unknown task 'wikitext7'"),
    (["train", "--task", "listops", "--model", "zigzag"], "unknown layout 'zigzag'"),
    (["train", "--task", "listops", "--preset", "huge"], "unknown preset 'huge'"),
    (["train", "--task", "listops", "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
    (["train", "--task", "listops", "--set", "train.max_steps=many"], "train.max_steps expects an integer"),
    (["train", "--task", "listops", "--config", "/nonexistent/c.yaml"], "config file /nonexistent/c.yaml not found"),
    (["train", "--resume"], "--resume needs --out"),
    (["train", "--out", "/nonexistent/run", "--resume"], "not a run folder"),
    (["eval", "--run", "/nonexistent/run"], "run folder /nonexistent/run not found"),
    (["train", "--task", "listops", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, fragment):
    code, _, err = run_main(capsys, *argv)
    assert_user_error(code, err, fragment)


def test_missing_data_says_where_to_get_it(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("CHIAR_DATA_DIR", str(tmp_path / "empty"))
    # The hub is unreachable here. (HF_HUB_OFFLINE set now would not do: huggingface_hub reads it
    # once, at import, and an earlier test in the process may have imported it already.)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("chiarformer.data.hub.reachable", lambda *a, **k: False)
    code, _, err = run_main(capsys, "train", "--task", "wikitext103", "--preset", "tiny", "--set", "data.tokenizer=bytes",
                            "--out", str(tmp_path / "r"), "--quiet")
    assert_user_error(code, err, "WikiText-103")
    assert "tried" in err and "wiki.train.raw" in err
    assert not (tmp_path / "r").exists()


def test_subprocess_error_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "chiarformer.cli", "train", "--task", "listops",
                           "--set", "model.d_model=oops", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: model.d_model expects an integer, got 'oops'"]


def test_train_eval_resume_errors_and_config(capsys, tmp_path, text_task):
    run = tmp_path / "run"
    code, out, err = run_main(capsys, "train", *text_task, "--set", "train.max_steps=6", "--set", "train.eval_every=3",
                              "--out", str(run), "--quiet")
    assert code == 0, err
    results = json.loads((run / "results.json").read_text())
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["task"] == "text" and saved["model"]["d_model"] == 32 and saved["train"]["max_steps"] == 6
    assert saved["model"]["vocab_size"] == 257  # set by the task (bytes)

    # an existing run folder without --resume
    code, _, err = run_main(capsys, "train", *text_task, "--out", str(run))
    assert_user_error(code, err, "already exists; pass --resume")
    # a checkpoint that does not fit the given config
    code, _, err = run_main(capsys, "train", *text_task, "--set", "model.d_model=64", "--out", str(run), "--resume")
    assert_user_error(code, err, "does not fit")
    # resuming a finished run is a no-op
    code, _, err = run_main(capsys, "train", "--out", str(run), "--resume", "--quiet")
    assert code == 0, err

    # chiar eval reproduces the recorded test numbers from the best checkpoint
    code, out, err = run_main(capsys, "eval", "--run", str(run), "--split", "test", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["loss"] == pytest.approx(results["test"]["loss"], rel=1e-6)
    assert record["step"] == results["best"]["step"] and record["protocol"]["split"] == "test"
    assert {"ppl", "bpb", "protocol"} <= set(record)
    code, out, _ = run_main(capsys, "eval", "--run", str(run))
    assert code == 0 and "val:" in out and "ppl" in out and "protocol:" in out

    # a checkpoint whose tensors do not fit config.yaml
    cfg_text = (run / "config.yaml").read_text().replace("d_model: 32", "d_model: 64").replace("d_ff: 128", "d_ff: 256")
    (run / "config.yaml").write_text(cfg_text)
    code, _, err = run_main(capsys, "eval", "--run", str(run))
    assert_user_error(code, err, "does not fit")


def test_config_command_writes_a_loadable_commented_yaml(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    code, out, err = run_main(capsys, "config", "--task", "listops", "--preset", "tiny", "--model", "dct_attn",
                              "--set", "train.lr=3e-4", "-o", str(path))
    assert code == 0, err
    text = path.read_text()
    assert text.count("#") > 40
    values = yaml.safe_load(text)
    assert values["train"]["lr"] == 3e-4 and values["model"]["layout"] == "dct_attn"
    code, out, err = run_main(capsys, "config", "--config", str(path), "--set", "train.max_steps=3")
    assert code == 0 and "max_steps: 3" in out


def test_one_metrics_format_for_every_tool():
    lm = {"loss": 2.0, "ppl": 7.38905, "bpb": 1.25, "accuracy": 0.3}
    assert format_metrics(lm, "lm") == "loss 2.0000  ppl 7.39  bpb 1.2500"
    assert format_metrics(lm, None) == format_metrics(lm, "lm")  # an LM record says so by its ppl
    assert format_metrics({"loss": 2.0, "ppl": 7.39, "bpb": None}, "lm") == "loss 2.0000  ppl 7.39"
    assert format_metrics({"loss": 0.5, "accuracy": 0.75}, "cls") == "loss 0.5000  accuracy 0.7500"
    assert format_metrics({"accuracy": 0.75}, "cls") == "accuracy 0.7500"
    assert format_metrics({}, "lm") == format_metrics(None, "cls") == "-"


def test_tasks_command_lists_every_task(capsys):
    code, out, _ = run_main(capsys, "tasks")
    assert code == 0
    for name, spec in TASKS.items():
        assert f"{name}" in out and spec.source in out


def test_quickstart_smoke(capsys, tmp_path):
    code, out, err = run_main(capsys, "quickstart", "--steps", "4", "--examples", "64", "--n-eval", "32", "--quiet",
                              "--out", str(tmp_path / "qs"))
    assert code == 0, err
    for fragment in ("baseline", "CHIAR-Former", "topk, attn_fraction 0.25", "val accuracy", "test accuracy",
                     "parameters", "tokens/s", "attention share per layer", "forward MACs/token"):
        assert fragment in out, fragment
    row = next(line for line in out.splitlines() if line.startswith("attention share per layer"))
    shares = [float(x) for x in row.split()[4:]]
    assert shares[:4] == [1.0] * 4 and shares[4] == 0.0 and shares[7] == 1.0 and 0.0 < shares[5] < 1.0
    assert (tmp_path / "qs" / "quickstart.txt").is_file()


def test_output_into_a_closed_pipe_is_not_an_error():
    # `chiar flops ... | head -1`: the reader goes away early; no traceback, exit 0
    proc = subprocess.Popen([sys.executable, "-m", "chiarformer.cli", "flops", "--preset", "paper-17m", "--per-layer"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # nobody reads
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()
