"""The task registry as the engine sees it: names, published training defaults, and the bridge
from `chiarformer.data.load_task` to the engine's `TaskData`.

Data loading lives in chiarformer.data (names, sources, caches, protocols); this module maps
the `data` section of a RunConfig onto that loader's options, wraps its outputs as LM windows
or classification sets, and fills in the model fields the task decides (vocabulary, classes).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from ..data.lm import LMWindows
from ..errors import UserError
from .config import RunConfig
from .datasets import TaskData

_LM_TRAIN = {"lr": 1e-4, "min_lr": 1e-6, "warmup_steps": 500, "batch_size": 128, "epochs": 10.0}
LM_DEFAULTS = {
    # Published: AdamW(0.9, 0.95), wd 0.01, lr 1e-4, warm-up 500, cosine to 1e-6, 128 sequences per
    # step, clip 1.0, GPT-2 BPE, context 256 in non-overlapping windows, 10 epochs (17M).
    "preset": "paper-17m",
    "train": _LM_TRAIN,
    "data": {"seq_len": 256, "eval_stride": 0, "tokenizer": "gpt2"},
}
# Published classification: mean pooling, MLP head, 4 epochs at lr 5e-5.
_CLS_TRAIN = {"lr": 5e-5, "min_lr": 1e-6, "warmup_steps": 100, "batch_size": 32, "epochs": 4.0}
# LRA (Tay et al. 2021): batch 32; ListOps 5k steps, Text 20k steps.
_LRA_TRAIN = {"lr": 1e-4, "min_lr": 1e-6, "warmup_steps": 1000, "batch_size": 32}


@dataclass
class TaskSpec:
    name: str
    kind: str  # "lm" or "cls"
    source: str  # where the data comes from (shown by `chiar tasks`)
    defaults: dict = field(default_factory=dict)  # RunConfig values before the preset, file and --set

    @property
    def description(self) -> str:
        from ..data import TASKS as DATA_TASKS

        return DATA_TASKS.get(self.name, "")


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec("wikitext103", "lm", "`chiar download wikitext103` (HF parquet into DATA_DIR/wikitext-103-raw-v1), "
                 "or the official wiki.*.raw in DATA_DIR/wikitext-103-raw", LM_DEFAULTS),
        TaskSpec("wikitext2", "lm", "`chiar download wikitext2` (HF parquet into DATA_DIR/wikitext-2-raw-v1), or the "
                 "official wiki.*.raw in DATA_DIR/wikitext-2-raw", LM_DEFAULTS),
        TaskSpec("wikitext2-proxy", "lm", "the valid and test splits of WikiText-2: `chiar download wikitext2`, or "
                 "wiki.{valid,test}.raw in DATA_DIR/wikitext2_raw", {**LM_DEFAULTS, "train": {**_LM_TRAIN, "batch_size": 32}}),
        TaskSpec("imdb-lm-proxy", "lm", "`chiar download imdb`, or DATA_DIR/imdb/imdb_{train,test}.jsonl.xz, or an "
                 "aclImdb folder",
                 {**LM_DEFAULTS, "train": {**_LM_TRAIN, "epochs": 2.0}}),
        TaskSpec("text", "lm", "your UTF-8 files: --set data.train_files=[a.txt] (optional val_files/test_files)",
                 {**LM_DEFAULTS, "train": {**_LM_TRAIN, "batch_size": 32, "epochs": 1.0}}),
        TaskSpec("imdb", "cls", "`chiar download imdb`, or DATA_DIR/imdb/imdb_{train,test}.jsonl.xz, or an aclImdb folder",
                 {"preset": "paper-17m", "model": {"n_classes": 2}, "train": _CLS_TRAIN,
                  "data": {"seq_len": 256, "tokenizer": "gpt2"}}),
        TaskSpec("lra-text", "cls", "`chiar download imdb`, or DATA_DIR/imdb/imdb_{train,test}.jsonl.xz, or an aclImdb folder",
                 {"preset": "paper-17m", "model": {"n_classes": 2, "bidirectional": True},
                  "train": {**_LRA_TRAIN, "max_steps": 20000, "bucket_batches": 16},
                  "data": {"seq_len": 1000, "tokenizer": "bytes"}}),
        TaskSpec("listops", "cls", "generated on first use (LRA procedure), cached under data.cache_dir; or LRA "
                 "basic_{train,val,test}.tsv files via data.path",
                 {"preset": "paper-17m", "model": {"n_classes": 10, "bidirectional": True},
                  "train": {**_LRA_TRAIN, "max_steps": 5000, "bucket_batches": 16}, "data": {"seq_len": 2000}}),
        TaskSpec("listops-flat", "cls", "generated on the fly (no download)",
                 {"preset": "paper-17m", "model": {"n_classes": 10}, "train": _CLS_TRAIN,
                  "data": {"seq_len": 10, "listops_train": 10000, "listops_val": 1000, "listops_test": 1000,
                           "listops_max_args": 8}}),
    ]
}


def task_defaults(name: str) -> dict:
    return TASKS[name].defaults


def data_options(cfg: RunConfig) -> dict:
    """Keyword arguments of chiarformer.data.load_task for this run (only those the task takes)."""
    from ..data import task_options

    d = cfg.data
    candidates = {
        "stride": d.eval_stride or None,
        "variant": d.variant,
        "tokenizer": d.tokenizer,
        "path": d.path or None,
        "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction,
        "seed": d.data_seed,
        "train": list(d.train_files) or None,
        "val": list(d.val_files) or None,
        "test": list(d.test_files) or None,
        "n_train": d.listops_train,
        "n_val": d.listops_val,
        "n_test": d.listops_test,
        "min_length": d.listops_min_length,
        "max_length": d.listops_max_length,
        "max_depth": d.listops_max_depth,
        "min_args": d.listops_min_args,
        "max_args": d.listops_max_args,
        "style": d.listops_tokens,
        "workers": d.workers or None,
    }
    accepted = task_options(cfg.task)
    return {k: v for k, v in candidates.items() if k in accepted}


class ClassificationView:
    """chiarformer.data.ClassificationData as the engine's dataset (kind, batch, n_tokens)."""

    kind = "cls"

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def lengths(self) -> np.ndarray:
        return self.data.lengths()

    def batch(self, indices) -> dict:
        return self.data.batch(np.asarray(indices, dtype=np.int64))

    def n_tokens(self, batch: dict) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def load_task(cfg: RunConfig, quiet: bool = False) -> TaskData:
    """Load the run's task through chiarformer.data and wrap it for the engine."""
    from .. import data as D

    if cfg.task not in TASKS:
        raise UserError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    d = cfg.data
    if not quiet:
        print(f"preparing task {cfg.task} (cached after the first time)", file=sys.stderr, flush=True)
    task = D.load_task(cfg.task, data_dir=d.data_dir or None, cache_dir=d.cache_dir or None, seq_len=d.seq_len,
                       **data_options(cfg))
    protocol = dict(task.protocol)
    if task.kind == "lm":
        train_tokens = task.train[: d.max_train_tokens] if d.max_train_tokens else task.train
        stride = d.eval_stride or d.seq_len
        if len(train_tokens) <= d.seq_len:
            raise UserError(f"task {cfg.task}: {len(train_tokens)} training tokens are fewer than one window of "
                            f"data.seq_len={d.seq_len} inputs and their targets")
        if d.max_train_tokens:
            protocol["train_tokens_used"] = int(len(train_tokens))
        return TaskData(
            kind="lm",
            train=LMWindows(train_tokens, d.seq_len),
            val=LMWindows(task.val, d.seq_len, stride),
            test=LMWindows(task.test, d.seq_len, stride),
            vocab_size=task.vocab_size,
            protocol=protocol,
            token_bytes=task.tokenizer.token_byte_lengths(),
        )
    train = task.train
    if d.max_examples and d.max_examples < len(train):
        train = train.select(np.arange(d.max_examples))
        protocol["train_examples_used"] = d.max_examples
    return TaskData(
        kind="cls",
        train=ClassificationView(train),
        val=ClassificationView(task.val),
        test=ClassificationView(task.test),
        vocab_size=task.vocab_size,
        n_classes=int(task.n_classes),
        protocol=protocol,
    )


def tokenizer_for(cfg: RunConfig):
    """The run's tokenizer without loading its data."""
    from ..data import ListOpsTokenizer, get_tokenizer

    if cfg.task in ("listops", "listops-flat"):
        return ListOpsTokenizer(cfg.data.listops_tokens)
    return get_tokenizer(cfg.data.tokenizer)


# Model fields that finalize_model_config fills in from the task.
TASK_FILLED_FIELDS = ("vocab_size", "n_classes", "max_seq_len")


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
