"""Run configuration: dataclasses, a commented YAML form, and `--set key=value` overrides.

A run is described by one `RunConfig`:

    task:   the task name (see `chiarformer.data.tasks.TASKS`)
    preset: the model preset the `model` section started from (informational once resolved)
    model:  every `chiarformer.ChiarConfig` field
    train:  `TrainConfig` (optimiser, schedule, precision, logging, checkpoints)
    data:   `DataConfig` (context length, evaluation stride, data folder, task-specific sizes; the
            task-specific fields are the registry's task options, by the same names)
    mix:    `MixConfig` (mixed-dataset training: auxiliary tasks and their rate; train/mixture.py)

Resolution order, later wins: dataclass defaults < the preset's model < the task's published
defaults (its train and data values, and model fields such as n_classes) < the YAML file
(--config) < --model/--preset flags < --set overrides. Values are typed by the
dataclass field types; an unknown key or a value of the wrong type is a `UserError`.
The resolved configuration is written into the run folder as commented YAML (config.yaml).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..atomic import atomic_write_text
from ..config import PRESETS, ChiarConfig
from ..data.tasks import TASKS, task_spec
from ..errors import UserError


@dataclass
class TrainConfig:
    seed: int = 0  # seeds weight init, data order and dropout (runs are reproducible on CPU)
    max_steps: int = 0  # optimizer steps; 0 = derived from `epochs` and the training-set size
    epochs: float = 1.0  # passes over the training set, used when max_steps is 0
    batch_size: int = 32  # sequences per optimizer step, summed over all processes (global batch)
    micro_batch_size: int = 0  # sequences per forward pass per process; 0 = no gradient accumulation
    lr: float = 1e-4  # peak learning rate (published: 1e-4 for LM, 5e-5 for classification)
    min_lr: float = 1e-6  # learning rate at the end of the cosine decay
    warmup_steps: int = 500  # linear warm-up steps before the cosine decay (capped at max_steps / 10 if larger)
    weight_decay: float = 0.01  # AdamW decay on matrices only (none on norms, biases, embeddings, 1-D gains)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16 | fp16 (published; CUDA only)
    compile: bool = False  # wrap the model in torch.compile
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda
    fsdp: bool = False  # shard parameters with FSDP2 fully_shard instead of DDP (multi-GPU, e.g. paper-400m)
    num_threads: int = 0  # CPU threads per process; 0 = all cores divided by the local process count
    deterministic: bool = False  # CUDA: deterministic kernels (slower); CPU runs are reproducible anyway at a fixed thread count
    bucket_batches: int = 0  # classification: sort each group of this many batches by length (less padding); 0 = off
    log_every: int = 10  # optimizer steps between metrics lines (and progress-bar updates)
    eval_every: int = 0  # optimizer steps between validation passes; 0 = 10 per run
    eval_batches: int = 0  # cap on validation batches per periodic pass; 0 = whole split (final passes: always whole)
    eval_batch_size: int = 0  # sequences per evaluation forward pass; 0 = the training micro-batch size
    ckpt_every: int = 0  # optimizer steps between `last` checkpoints; 0 = at every validation pass
    # checkpoint selection on validation: auto (loss for LM, accuracy for classification) | loss | accuracy
    select_metric: str = "auto"
    progress: bool = True  # show a progress bar on a terminal


@dataclass
class DataConfig:
    data_dir: str = ""  # folder holding the datasets; "" = $CHIAR_DATA_DIR, else ~/.cache/chiarformer/data (chiar download)
    cache_dir: str = ""  # token and ListOps caches; "" = $CHIAR_CACHE_DIR, else ~/.cache/chiarformer
    path: str = ""  # one dataset folder to read instead of searching data_dir (WikiText, IMDB, ListOps TSV files)
    seq_len: int = 256  # context: tokens per LM window, longest classification input (published: 256)
    eval_stride: int = 0  # LM evaluation stride; 0 = seq_len (non-overlapping windows, the published protocol)
    tokenizer: str = "gpt2"  # LM and IMDB tasks: gpt2 (GPT-2 BPE, published) | bytes (UTF-8 bytes; LRA Text)
    variant: str = "raw"  # WikiText: raw | tokens (the pre-tokenised files with <unk>)
    train_files: list = field(default_factory=list)  # task "text": UTF-8 training files
    val_files: list = field(default_factory=list)  # task "text": validation files (else the tail of the training text)
    test_files: list = field(default_factory=list)  # task "text": test files (else the tail of the training text)
    val_fraction: float = 0.1  # share carved from the training data for validation where a task has no val split
    test_fraction: float = 0.1  # task "text" without test_files: share of the training text held out as test
    data_seed: int = 0  # seed of generated data and of the validation carve-out (independent of train.seed)
    max_train_tokens: int = 0  # LM: use only the first N training tokens; 0 = all
    max_examples: int = 0  # classification: use only the first N training examples; 0 = all
    listops_train: int = 96000  # ListOps: training expressions (LRA: 96000; listops-flat: 10000)
    listops_val: int = 2000  # ListOps: validation expressions (LRA: 2000)
    listops_test: int = 2000  # ListOps: test expressions (LRA: 2000)
    listops_min_length: int = 500  # ListOps: keep expressions strictly longer than this (LRA: 500)
    listops_max_length: int = 2000  # ListOps: keep expressions strictly shorter than this (LRA: 2000)
    listops_max_depth: int = 10  # ListOps: maximum tree depth (LRA: 10)
    listops_min_args: int = 4  # listops-flat: fewest digits per expression (paper: 4)
    listops_max_args: int = 10  # ListOps: most arguments per operator (LRA: 10; listops-flat: 8 digits)
    listops_tokens: str = "lra"  # ListOps tokenisation: lra (alphanumeric tokens only) | brackets (keep [OP and ])
    workers: int = 0  # processes for data generation; 0 = every CPU


@dataclass
class MixConfig:
    # auxiliary tasks mixed into LM training (published: [wikitext2, imdb, listops]); [] = no mixing.
    # Each finds its data under data.data_dir and shares data.tokenizer, data.cache_dir and data.data_seed.
    tasks: list = field(default_factory=list)
    prob: float = 0.25  # chance per optimizer step of ONE extra batch from a task drawn uniformly from mix.tasks (published 0.25)
    # sequences per extra batch; 0 = as published (LM: train.batch_size, classification: max(8, batch_size // 4))
    batch_size: int = 0
    seq_len: int = 0  # classification aux tasks: longest input; 0 = each task's published length (LM aux tasks: data.seq_len)
    max_examples: int = 0  # classification aux tasks: use only the first N training examples; 0 = all
    max_train_tokens: int = 0  # LM aux tasks: use only the first N training tokens; 0 = all


@dataclass
class RunConfig:
    task: str = "listops"  # what to train on: one of chiarformer.data.tasks.TASKS
    preset: str = "paper-17m"  # model preset the model section started from: a name in config.PRESETS
    model: ChiarConfig = field(default_factory=ChiarConfig)  # the model (every ChiarConfig field)
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation, precision, logging, checkpoints
    data: DataConfig = field(default_factory=DataConfig)  # data source and shapes
    mix: MixConfig = field(default_factory=MixConfig)  # mixed-dataset training (auxiliary tasks); off by default

    # ------------------------------------------------------------------ dict / YAML round trip
    def to_dict(self) -> dict:
        return {
            "task": self.task,
            "preset": self.preset,
            "model": self.model.to_dict(),
            "train": dataclasses.asdict(self.train),
            "data": dataclasses.asdict(self.data),
            "mix": dataclasses.asdict(self.mix),
        }

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        """Build from a full or partial dict (as in config.yaml); unknown keys and wrong types raise UserError."""
        cfg = cls()
        apply_mapping(cfg, values)
        return cfg

    def to_yaml(self) -> str:
        return dump_yaml(self)

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_yaml(path))


SECTIONS = {"model": ChiarConfig, "train": TrainConfig, "data": DataConfig, "mix": MixConfig}
TOP_LEVEL = ("task", "preset")


# ---------------------------------------------------------------------------- reading values
def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"config file {path} is not valid YAML: {first}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping with sections task/model/train/data")
    return values


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert `value` (from YAML or a command-line string) to the type `hint`, or raise UserError."""

    def bad(expected: str) -> UserError:
        return UserError(f"{key} expects {expected}, got {value!r}")

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "~", "")):
            if type(None) in options:
                return None
        if isinstance(value, str):
            parsed = _parse_literal(value)
            if not isinstance(parsed, str):
                value = parsed
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, key)
            except UserError:
                continue
        names = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o)) for o in options)
        raise bad(names)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad("true or false")
    if hint is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    raise bad("an integer") from None
                if math.isfinite(number) and number.is_integer():
                    return int(number)
        raise bad("an integer")
    if hint is float:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad("a number") from None
        raise bad("a number")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    if hint is list or origin is list:
        if isinstance(value, str):
            parsed = _parse_literal(value)
            if isinstance(parsed, list):
                return parsed
            return [p.strip() for p in value.split(",") if p.strip()]  # a,b,c
        if isinstance(value, (list, tuple)):
            return list(value)
        raise bad("a list")
    return value


def _parse_literal(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _section_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def apply_mapping(cfg: RunConfig, values: dict, *, source: str = "config") -> None:
    """Apply a (partial) nested mapping {task, preset, model: {...}, train: {...}, data: {...}} to cfg."""
    if not isinstance(values, dict):
        raise UserError(f"{source} must be a mapping")
    unknown = sorted(set(values) - set(TOP_LEVEL) - set(SECTIONS))
    if unknown:
        raise UserError(
            f"unknown config key(s) in {source}: {', '.join(map(str, unknown))} "
            f"(top-level keys: {', '.join(TOP_LEVEL + tuple(SECTIONS))})"
        )
    for key in TOP_LEVEL:
        if key in values:
            setattr(cfg, key, coerce(values[key], str, key))
    model_changes = {}
    for name in SECTIONS:
        if name not in values or values[name] is None:
            continue
        section = values[name]
        if not isinstance(section, dict):
            raise UserError(f"section {name!r} in {source} must be a mapping of key: value")
        for key, value in section.items():
            if name == "model":
                model_changes[key] = value
            else:
                set_field(cfg, f"{name}.{key}", value)
    if model_changes:
        set_model_fields(cfg, model_changes)


def set_field(cfg: RunConfig, dotted: str, value: Any) -> None:
    """Set one dotted key (e.g. "train.lr"), typed by the dataclass field, from a parsed or string value."""
    parts = dotted.split(".")
    if len(parts) == 1 and parts[0] in TOP_LEVEL:
        setattr(cfg, parts[0], coerce(value, str, parts[0]))
        return
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise UserError(
            f"unknown config key {dotted!r}; use task, preset or section.field with a section of "
            f"{', '.join(SECTIONS)} (e.g. train.lr=3e-4)"
        )
    section, key = parts
    if section == "model":
        set_model_fields(cfg, {key: value})
        return
    obj = getattr(cfg, section)
    hints = _hints(type(obj))
    if key not in hints:
        raise UserError(f"unknown config key {dotted!r}; {section} fields: {', '.join(_section_names(type(obj)))}")
    setattr(obj, key, coerce(value, hints[key], dotted))
    validate_section(obj, section)


def set_model_fields(cfg: RunConfig, changes: dict) -> None:
    hints = _hints(ChiarConfig)
    typed = {}
    for key, value in changes.items():
        if key not in hints:
            raise UserError(f"unknown config key 'model.{key}'; model fields: {', '.join(_section_names(ChiarConfig))}")
        typed[key] = coerce(value, hints[key], f"model.{key}")
    current = cfg.model.to_dict()
    if "d_model" in typed and "d_ff" not in typed and current.get("d_ff") == 4 * current.get("d_model", 0):
        typed["d_ff"] = 0  # keep the "4 * d_model" default when d_model changes
    cfg.model = ChiarConfig.from_dict({**current, **typed})


def parse_sets(assignments: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in assignments or []:
        if "=" not in item:
            raise UserError(f"--set expects key=value (e.g. train.lr=3e-4), got {item!r}")
        key, value = item.split("=", 1)
        out.append((key.strip(), value.strip()))
    return out


def apply_sets(cfg: RunConfig, assignments: list[str], model_extra: dict | None = None) -> None:
    """Apply `--set key=value` strings in order; model fields are applied together at the end
    (with `model_extra` first), so e.g. model.layout and model.n_layers may change together."""
    model_changes = dict(model_extra or {})
    for key, value in parse_sets(assignments):
        if key.startswith("model."):
            hints = _hints(ChiarConfig)
            name = key[len("model."):]
            if name not in hints:
                raise UserError(f"unknown config key {key!r}; model fields: {', '.join(_section_names(ChiarConfig))}")
            model_changes[name] = value
        else:
            set_field(cfg, key, value)
    if model_changes:
        set_model_fields(cfg, model_changes)


# ---------------------------------------------------------------------------- checks
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
SELECT_METRICS = ("auto", "loss", "accuracy")
LISTOPS_TOKENS = ("lra", "brackets")


def validate_section(obj: Any, name: str) -> None:
    def positive(*keys: str, allow_zero: bool = False) -> None:
        for key in keys:
            value = getattr(obj, key)
            if value < 0 or (value == 0 and not allow_zero):
                raise UserError(f"{name}.{key} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    def choice(key: str, options: tuple[str, ...]) -> None:
        if getattr(obj, key) not in options:
            raise UserError(f"{name}.{key}={getattr(obj, key)!r} is not one of {', '.join(options)}")

    if isinstance(obj, TrainConfig):
        positive("batch_size", "lr", "log_every")
        positive("max_steps", "micro_batch_size", "warmup_steps", "eval_every", "eval_batches", "eval_batch_size",
                 "bucket_batches", "ckpt_every", "num_threads", "weight_decay", "grad_clip", "min_lr", "epochs", allow_zero=True)
        choice("precision", PRECISIONS)
        choice("device", DEVICES)
        choice("select_metric", SELECT_METRICS)
        if obj.min_lr > obj.lr:
            raise UserError(f"train.min_lr={obj.min_lr} exceeds train.lr={obj.lr}")
        if obj.max_steps == 0 and obj.epochs == 0:
            raise UserError("set train.max_steps or train.epochs to a positive value")
    elif isinstance(obj, MixConfig):
        positive("batch_size", "seq_len", "max_examples", "max_train_tokens", allow_zero=True)
    elif isinstance(obj, DataConfig):
        positive("seq_len")
        positive("eval_stride", "max_train_tokens", "max_examples", "workers", "listops_min_length", allow_zero=True)
        positive("listops_train", "listops_val", "listops_test", "listops_max_depth", "listops_min_args",
                 "listops_max_args")
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(obj, key) < 1.0:
                raise UserError(f"data.{key} must be between 0 and 1, got {getattr(obj, key)}")
        if obj.eval_stride > obj.seq_len:
            raise UserError(f"data.eval_stride={obj.eval_stride} exceeds data.seq_len={obj.seq_len}")
        if obj.listops_max_length <= obj.listops_min_length + 1:
            raise UserError("data.listops_max_length must exceed data.listops_min_length + 1")
        choice("listops_tokens", LISTOPS_TOKENS)
        choice("tokenizer", ("gpt2", "bytes"))
        choice("variant", ("raw", "tokens"))


def validate(cfg: RunConfig) -> None:
    task_spec(cfg.task)  # an unknown task is a UserError
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(PRESETS)}")
    validate_section(cfg.train, "train")
    validate_section(cfg.data, "data")
    validate_mix(cfg)
    cfg.model.validate()


def validate_mix(cfg: RunConfig) -> None:
    m = cfg.mix
    if not 0.0 <= m.prob <= 1.0:
        raise UserError(f"mix.prob must be between 0 and 1, got {m.prob}")
    validate_section(m, "mix")
    if not m.tasks:
        return
    for name in m.tasks:
        if not isinstance(name, str) or name not in TASKS:
            raise UserError(f"mix.tasks: unknown task {name!r}; choose from {', '.join(TASKS)}")
    if len(set(m.tasks)) != len(m.tasks) or cfg.task in m.tasks:
        raise UserError(f"mix.tasks={m.tasks} must name each auxiliary task once, and not the main task {cfg.task!r}")
    if task_spec(cfg.task).kind != "lm":
        raise UserError(f"mix.tasks needs a language-model main task; {cfg.task!r} is a classification task")


# ---------------------------------------------------------------------------- resolution
def resolve(
    task: str | None = None,
    preset: str | None = None,
    layout: str | None = None,
    config_file: str | Path | None = None,
    sets: list[str] | None = None,
) -> RunConfig:
    """Build the run configuration from the CLI inputs, in the documented precedence order."""
    file_values = read_yaml(config_file) if config_file else {}  # always a mapping (read_yaml checks)
    set_values = _split_sets(sets or [])
    task = task or set_values.get("task") or file_values.get("task")
    if not task:
        raise UserError("no task given; pass --task (one of " + ", ".join(TASKS) + ")")
    defaults = task_spec(task).defaults
    preset = preset or set_values.get("preset") or file_values.get("preset") or defaults.get("preset", "paper-17m")
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")

    cfg = RunConfig(task=task, preset=preset)
    # model: preset, then the task's model defaults (e.g. n_classes); then the file, the --model
    # flag and --set model.* together (so related fields may change at once).
    cfg.model = ChiarConfig.from_preset(preset)
    apply_mapping(cfg, {k: v for k, v in defaults.items() if k in SECTIONS}, source=f"task {task} defaults")
    file_model = file_values.get("model") or {}
    if not isinstance(file_model, dict):
        raise UserError(f"section 'model' in {config_file} must be a mapping of key: value")
    apply_mapping(cfg, {k: v for k, v in file_values.items() if k not in TOP_LEVEL and k != "model"},
                  source=str(config_file))
    model_changes = {}
    hints = _hints(ChiarConfig)
    for key, value in file_model.items():
        if key not in hints:
            raise UserError(f"unknown config key 'model.{key}' in {config_file}; model fields: "
                            f"{', '.join(_section_names(ChiarConfig))}")
        model_changes[key] = value
    if layout:
        model_changes["layout"] = layout
    apply_sets(cfg, [s for s in (sets or []) if s.split("=", 1)[0].strip() not in TOP_LEVEL], model_changes)
    validate(cfg)
    return cfg


def _split_sets(sets: list[str]) -> dict:
    out = {}
    for item in sets:
        if "=" in item:
            key, value = item.split("=", 1)
            if key.strip() in TOP_LEVEL:
                out[key.strip()] = value.strip()
    return out


def diff(a: RunConfig, b: RunConfig, sections: tuple[str, ...] = ("task", "model", "data")) -> list[str]:
    """Dotted keys whose values differ between two configs, limited to `sections`."""
    da, db = a.to_dict(), b.to_dict()
    out = []
    for section in sections:
        va, vb = da.get(section), db.get(section)
        if isinstance(va, dict):
            for key in va:
                if va.get(key) != vb.get(key):
                    out.append(f"{section}.{key}: {va.get(key)!r} vs {vb.get(key)!r}")
        elif va != vb:
            out.append(f"{section}: {va!r} vs {vb!r}")
    return out


# ---------------------------------------------------------------------------- commented YAML
_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*(?:#\s?(.*))?$")


@functools.cache
def field_comments(cls) -> dict[str, str]:
    """Comments of a dataclass's fields, read from its source: the inline `# comment`, else the
    block of comment lines just above the field (empty when the source is unavailable)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    block: list[str] = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if not text.startswith("---"):
                block.append(text)
            continue
        match = _FIELD.match(line)
        if match and match.group(1) in names and match.group(1) not in out:
            comment = match.group(2)
            out[match.group(1)] = comment.strip() if comment else " ".join(block)
        block = []
    return out


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()
    if text.endswith("..."):
        text = text[:-3].strip()
    return text


def dump_yaml(cfg: RunConfig, header: str | None = None) -> str:
    lines = []
    if header:
        lines += [f"# {line}" if line else "#" for line in header.splitlines()]
    else:
        lines += [
            "# chiarformer run configuration (resolved). Load with `chiar train --config FILE`;",
            "# override any field with `--set section.field=value`, e.g. --set train.lr=3e-4.",
        ]
    top = field_comments(RunConfig)
    for key in TOP_LEVEL:
        lines.append(f"{key}: {_yaml_value(getattr(cfg, key))}  # {top.get(key, '')}".rstrip(" #"))
    for name, cls in SECTIONS.items():
        obj = getattr(cfg, name)
        comments = field_comments(cls)
        lines.append("")
        lines.append(f"{name}:  # {top.get(name, '')}".rstrip(" #"))
        for f in dataclasses.fields(cls):
            value = getattr(obj, f.name)
            comment = comments.get(f.name, "")
            entry = f"  {f.name}: {_yaml_value(value)}"
            lines.append(f"{entry}  # {comment}" if comment else entry)
    return "\n".join(lines) + "\n"
