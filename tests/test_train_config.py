"""Run configuration: dataclass typing, YAML files, --set overrides and their errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from chiarformer.errors import UserError
from chiarformer.train.run_config import (
    DataConfig,
    RunConfig,
    TrainConfig,
    apply_sets,
    dump_yaml,
    field_comments,
    resolve,
)

REPO = Path(__file__).resolve().parents[1]


def test_set_overrides_are_typed_by_field():
    cfg = resolve("listops", "tiny", "baseline", sets=[
        "train.lr=3e-4", "train.max_steps=1_000", "train.compile=true", "data.seq_len=64",
        "model.d_model=32", "model.routing=topk", "train.warmup_steps=1e2",
    ])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 1000 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.compile is True
    assert cfg.train.warmup_steps == 100
    assert cfg.data.seq_len == 64
    assert cfg.model.layout == "baseline" and cfg.model.d_model == 32
    assert cfg.model.d_ff == 4 * 32  # the "4 * d_model" default follows d_model


def test_set_model_union_and_list_fields():
    cfg = resolve("listops", "tiny", "dct_attn", sets=["model.tau=0.8"])
    assert cfg.model.tau == 0.8
    cfg = resolve("listops", "tiny", "dct_attn", sets=["model.tau=[0.8, 0.85]"])
    assert cfg.model.tau == [0.8, 0.85]
    cfg = resolve("listops", "tiny", "dct_attn", sets=["model.tau=none"])
    assert cfg.model.tau is None
    cfg = resolve("text", "tiny", "baseline", sets=["data.train_files=[a.txt, b.txt]"])
    assert cfg.data.train_files == ["a.txt", "b.txt"]


@pytest.mark.parametrize("item, fragment", [
    ("train.lrr=1", "unknown config key 'train.lrr'"),
    ("model.nope=1", "unknown config key 'model.nope'"),
    ("optim.lr=1", "unknown config key 'optim.lr'"),
    ("train.max_steps=ten", "train.max_steps expects an integer"),
    ("train.lr=fast", "train.lr expects a number"),
    ("train.compile=maybe", "train.compile expects true or false"),
    ("model.d_model=3.5", "model.d_model expects an integer"),
    ("train.precision=fp8", "train.precision='fp8' is not one of"),
    ("model.layout=zigzag", "unknown layout 'zigzag'"),
    ("train.lr", "--set expects key=value"),
    ("train.batch_size=0", "train.batch_size must be > 0"),
])
def test_bad_sets_are_user_errors(item, fragment):
    with pytest.raises(UserError, match=None) as err:
        resolve("listops", "tiny", "baseline", sets=[item])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_task_and_preset():
    with pytest.raises(UserError, match="unknown task 'wikitext7'"):
        resolve("wikitext7", "tiny")
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        resolve("listops", "huge")
    with pytest.raises(UserError, match="no task given"):
        resolve(None, "tiny")


def test_yaml_file_and_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "# a comment\n"
        "task: listops\npreset: tiny\n"
        "model:\n  layout: baseline  # inline comment\n  d_model: 32\n"
        "train:\n  lr: 3e-4   # YAML 1.1 reads this as a string: typed by the field\n  max_steps: 7\n"
        "data:\n  seq_len: 48\n"
    )
    cfg = resolve(config_file=path)
    assert (cfg.task, cfg.preset, cfg.model.layout, cfg.model.d_model) == ("listops", "tiny", "baseline", 32)
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 7 and cfg.data.seq_len == 48
    # flags beat the file, --set beats both
    cfg = resolve(layout="dct_attn", config_file=path, sets=["train.max_steps=9", "model.layout=D,DA,A",
                                                              "model.n_layers=3"])
    assert cfg.model.layout == "D,DA,A" and cfg.train.max_steps == 9


def test_yaml_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        resolve(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: listops\ntrain: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        resolve(config_file=bad)
    bad.write_text("task: listops\ntrain:\n  learning_rate: 1\n")
    with pytest.raises(UserError, match="unknown config key 'train.learning_rate'"):
        resolve(config_file=bad)
    bad.write_text("task: listops\nschedule:\n  x: 1\n")
    with pytest.raises(UserError, match="unknown config key"):
        resolve(config_file=bad)


def test_resolved_yaml_round_trips_and_every_field_is_commented(tmp_path):
    cfg = resolve("listops", "tiny", "dct_attn", sets=["model.tau=[0.8, 0.9]", "model.n_layers=4", "train.min_lr=1e-6"])
    text = dump_yaml(cfg)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    again = RunConfig.load(path)
    assert again.to_dict() == cfg.to_dict()
    for cls in (TrainConfig, DataConfig, RunConfig):
        comments = field_comments(cls)
        missing = [f.name for f in dataclasses.fields(cls) if not comments.get(f.name)]
        assert not missing, f"{cls.__name__} fields without a comment: {missing}"
    # every line of a section carries its comment in the file
    train_lines = [line for line in text.splitlines() if line.startswith("  ") and "lr:" in line]
    assert all("#" in line for line in train_lines)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = resolve(config_file=path)
    assert cfg.task and cfg.model.layout
    assert "#" in path.read_text()  # the examples are commented


def test_apply_sets_after_load_keeps_validation():
    cfg = resolve("listops", "tiny", "baseline")
    with pytest.raises(UserError):
        apply_sets(cfg, ["train.min_lr=1"])  # above lr
