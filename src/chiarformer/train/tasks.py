"""The task registry: names, published defaults, and how each task's data reaches the engine.

Data loading itself lives in `chiarformer.data`; this module turns its outputs into the
engine's `TaskData` (LM windows or classification sets) and records the evaluation protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..errors import UserError
from .config import RunConfig
from .datasets import TaskData

LM_DEFAULTS = {
    "preset": "paper-17m",
    # Published: AdamW(0.9, 0.95), wd 0.01, lr 1e-4, warm-up 500, cosine to 1e-6, 128 sequences/step,
    # clip 1.0, context 256 in non-overlapping windows, 10 epochs (17M).
    "train": {"lr": 1e-4, "min_lr": 1e-6, "warmup_steps": 500, "batch_size": 128, "epochs": 10.0},
    "data": {"seq_len": 256, "eval_stride": 0},
}


@dataclass
class TaskSpec:
    name: str
    kind: str  # "lm" or "cls"
    description: str
    source: str  # where the data comes from (shown by `chiar tasks` and in missing-data errors)
    defaults: dict = field(default_factory=dict)
    loader: str = ""  # name of the function in chiarformer.train.adapters that builds TaskData


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec("wikitext103", "lm", "WikiText-103 LM, GPT-2 BPE, the published protocol (train/valid/test)",
                 "official zip layout (wiki.{train,valid,test}.raw or .tokens) in DATA_DIR/wikitext103_raw or "
                 "DATA_DIR/wikitext-103-raw, Hugging Face parquet files, or `datasets` when online",
                 LM_DEFAULTS, "wikitext"),
        TaskSpec("wikitext2", "lm", "WikiText-2 LM, GPT-2 BPE (needs the train split, not on these machines)",
                 "DATA_DIR/wikitext2_raw/wiki.{train,valid,test}.raw, Hugging Face parquet, or `datasets` online",
                 LM_DEFAULTS, "wikitext"),
        TaskSpec("wt2-proxy", "lm", "PROXY (not the official protocol): train on WikiText-2 valid, "
                 "evaluate on WikiText-2 test (validation carved from the train text)",
                 "DATA_DIR/wikitext2_raw/wiki.{valid,test}.raw (shipped on these machines)",
                 {**LM_DEFAULTS, "train": {**LM_DEFAULTS["train"], "batch_size": 32}}, "wikitext"),
        TaskSpec("imdb-lm-proxy", "lm", "PROXY LM: train on IMDB train review text, evaluate on IMDB test review text",
                 "DATA_DIR/imdb/imdb_{train,test}.jsonl.xz or the aclImdb folder layout",
                 LM_DEFAULTS, "imdb_lm"),
        TaskSpec("text", "lm", "LM on your own UTF-8 text files (data.train_files, data.val_files, data.test_files)",
                 "any local UTF-8 files: --set data.train_files=[a.txt] --set data.val_files=[b.txt]",
                 LM_DEFAULTS, "text"),
        TaskSpec("imdb", "cls", "IMDB sentiment, GPT-2 BPE truncated to 256 tokens (the paper's 'IMDB')",
                 "DATA_DIR/imdb/imdb_{train,test}.jsonl.xz, the aclImdb folder layout, or Hugging Face parquet",
                 {"preset": "paper-17m", "model": {"n_classes": 2},
                  "train": {"lr": 5e-5, "min_lr": 1e-6, "warmup_steps": 100, "batch_size": 32, "epochs": 4.0},
                  "data": {"seq_len": 256}}, "imdb"),
        TaskSpec("lra-text", "cls", "LRA Text: IMDB as bytes, 1000 by default (--set data.seq_len=4000 possible)",
                 "DATA_DIR/imdb/imdb_{train,test}.jsonl.xz, the aclImdb folder layout, or Hugging Face parquet",
                 {"preset": "paper-17m", "model": {"n_classes": 2, "bidirectional": True},
                  "train": {"lr": 1e-4, "min_lr": 1e-6, "warmup_steps": 500, "batch_size": 32, "max_steps": 20000},
                  "data": {"seq_len": 1000}}, "imdb"),
        TaskSpec("listops", "cls", "LRA ListOps (generated with the LRA procedure; 10 classes)",
                 "generated locally (no download); cached under DATA_DIR/listops_cache",
                 {"preset": "paper-17m", "model": {"n_classes": 10, "bidirectional": True},
                  "train": {"lr": 1e-4, "min_lr": 1e-6, "warmup_steps": 1000, "batch_size": 32, "max_steps": 5000},
                  "data": {"seq_len": 2000}}, "listops"),
        TaskSpec("listops-flat", "cls", "the paper's flat 'ListOps' (one operator over 4-8 digits; not LRA)",
                 "generated locally (no download)",
                 {"preset": "paper-17m", "model": {"n_classes": 10},
                  "train": {"lr": 5e-5, "min_lr": 1e-6, "warmup_steps": 100, "batch_size": 32, "epochs": 4.0},
                  "data": {"seq_len": 32}}, "listops_flat"),
    ]
}


def task_defaults(name: str) -> dict:
    return TASKS[name].defaults


def finalize_model_config(cfg: RunConfig, data: TaskData) -> None:
    """Fill the model fields that the task decides: vocabulary size, classes, longest input."""
    changes = {}
    if cfg.model.vocab_size != data.vocab_size:
        changes["vocab_size"] = data.vocab_size
    if data.kind == "cls" and cfg.model.n_classes != data.n_classes:
        changes["n_classes"] = data.n_classes
    if cfg.model.max_seq_len < cfg.data.seq_len:
        changes["max_seq_len"] = cfg.data.seq_len
    if changes:
        cfg.model = cfg.model.replace(**changes)


def load_task(cfg: RunConfig, quiet: bool = False, splits: tuple[str, ...] | None = None) -> TaskData:
    """Build the task's data. `splits` limits what must be present (e.g. ("test",) for evaluation)."""
    if cfg.task not in TASKS:
        raise UserError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    spec = TASKS[cfg.task]
    from . import adapters

    loader: Callable = getattr(adapters, spec.loader)
    data = loader(cfg, spec, quiet=quiet, splits=splits)
    data.protocol.setdefault("task", cfg.task)
    return data


def tokenizer_for(cfg: RunConfig):
    """The tokenizer of a run's task, without loading its data (None when the task has none)."""
    from . import adapters

    return adapters.tokenizer_for(cfg)
