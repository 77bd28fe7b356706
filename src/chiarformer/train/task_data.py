"""A run's task as the engine sees it: the registry's splits (chiarformer.data.tasks) wrapped as
LM windows or classification sets, and the model fields the task decides (vocabulary, classes).

The registry's task options are named as the fields of the run's `data` section, so a run
passes them through by name (`task_options_of`).
"""

from __future__ import annotations

import sys

import numpy as np

from ..data.lm import LMWindows
from ..data.tasks import load_task, task_options, task_tokenizer
from ..errors import UserError
from .datasets import TaskData
from .run_config import RunConfig


def task_options_of(cfg: RunConfig) -> dict:
    """The run's values of the options its task takes (chiarformer.data.tasks.task_options)."""
    return {name: getattr(cfg.data, name) for name in task_options(cfg.task)}


def tokenizer_for(cfg: RunConfig):
    """The run's tokenizer without loading its data."""
    return task_tokenizer(cfg.task, **task_options_of(cfg))


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


def load_task_data(cfg: RunConfig, quiet: bool = False) -> TaskData:
    """Load the run's task through the registry and wrap it for the engine."""
    d = cfg.data
    options = task_options_of(cfg)  # raises UserError for an unknown task before the message below
    if not quiet:
        print(f"preparing task {cfg.task} (cached after the first time)", file=sys.stderr, flush=True)
    task = load_task(cfg.task, data_dir=d.data_dir or None, cache_dir=d.cache_dir or None, seq_len=d.seq_len, **options)
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
