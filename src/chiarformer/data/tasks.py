"""The task registry: every task is one TaskSpec in TASKS (name, kind, description, data source,
loader, tokenizer, published training defaults); one call gives every split, the tokenizer and
the protocol.

    task = load_task("wikitext2-proxy", seq_len=256)            # options: see task_options()
    task.kind                     # "lm" or "cls"
    task.train, task.val, task.test
        # lm: 1-D uint16 token arrays (read-only memmaps); windowed by chiarformer.data.lm.LMWindows
        # cls: ClassificationData (.batch(indices) -> input_ids, attention_mask, labels)
    task.tokenizer                # encode/decode, vocab_size, pad_id, eot_id (LM), token_byte_lengths() (LM)
    task.vocab_size, task.pad_id, task.seq_len, task.n_classes (None for lm)
    task.protocol                 # JSON-able: dataset, split sources, tokenizer, context, stride, ...

A task's options are its loader's keyword arguments, named as the fields of the run
configuration's `data` section (chiarformer.train.run_config.DataConfig), so the engine passes
them through by name; `register_task(TaskSpec(...))` adds a task.

Every split exists (test included); validation never comes from test: where a dataset has
no validation split it is carved from the training data (the last fraction of the training
tokens for text, a seeded stratified sample for labelled examples). Proxies say so in their
name and in protocol["proxy"]. Unknown task names or options raise UserError.

Common keyword arguments: data_dir (default CHIAR_DATA_DIR or ~/.cache/chiarformer/data), cache_dir
(default CHIAR_CACHE_DIR or ~/.cache/chiarformer), seq_len (LM context, or classification
length; None = the task's published default). LM tasks also take eval_stride (evaluation stride,
0 = seq_len, the published non-overlapping protocol) and tokenizer ("gpt2" or "bytes").
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from .cache import Cache
from .classification import ClassificationData, stratified_split
from .files import checksum, require_file
from .imdb import imdb_examples, imdb_source
from .listops import LRA_SIZES, ListOpsTokenizer, generate_listops, generate_listops_flat, read_listops_tsv, write_listops_tsv
from .text import carve_tail, corpus_tokens, documents_tokens, file_source, join_with_eot
from .tokenizer import get_tokenizer
from .wikitext import cache_name as wikitext_cache_name
from .wikitext import wikitext_source

KINDS = ("lm", "cls")  # language modelling | sequence classification
DEFAULT_CONTEXT = 256  # published LM context
# CPU-sized LRA ListOps for quick runs: load_task("listops", **LISTOPS_CPU).
LISTOPS_CPU = {"listops_train": 20_000, "listops_val": 1_000, "listops_test": 1_000, "listops_min_length": 50,
               "listops_max_length": 250, "listops_max_depth": 6, "listops_max_args": 10}


@dataclass
class Task:
    name: str
    kind: str  # "lm" | "cls"
    train: np.ndarray | ClassificationData
    val: np.ndarray | ClassificationData
    test: np.ndarray | ClassificationData
    tokenizer: object
    seq_len: int
    protocol: dict
    n_classes: int | None = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id


@dataclass(frozen=True)
class TaskSpec:
    """One task, defined once. The loader is called as loader(data_dir=, cache=, seq_len=, **options);
    its other keyword arguments, with their defaults, are the task's options."""

    name: str
    kind: str  # one of KINDS
    description: str  # one line, shown by `chiar tasks`
    source: str  # where the data comes from, shown by `chiar tasks`
    loader: Callable[..., Task]
    tokenizer: Callable[[dict], object]  # the task's options -> its tokenizer, without loading any data
    defaults: dict = field(default_factory=dict)  # RunConfig values before the preset, the file and --set


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add a task to TASKS (for `chiar train --task NAME`, load_task, `chiar tasks`)."""
    if spec.kind not in KINDS:
        raise ValueError(f"task {spec.name!r}: kind must be one of {KINDS}, got {spec.kind!r}")
    TASKS[spec.name] = spec
    return spec


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def task_options(name: str) -> dict:
    """The task-specific options of `name` and their defaults."""
    params = inspect.signature(task_spec(name).loader).parameters.values()
    return {p.name: p.default for p in params if p.name not in ("data_dir", "cache", "seq_len")}


def _checked_options(name: str, options: dict) -> dict:
    accepted = task_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise UserError(f"task {name!r} has no option(s) {', '.join(unknown)}; "
                        f"it takes: {', '.join(accepted) or 'none'}")
    return {**accepted, **options}


def load_task(name: str, *, data_dir=None, cache_dir=None, seq_len: int | None = None, **options) -> Task:
    """Load task `name` (see TASKS) with its options (see task_options(name))."""
    spec = task_spec(name)
    options = _checked_options(name, options)
    if seq_len is not None and seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {seq_len}")
    return spec.loader(data_dir=data_dir, cache=Cache(cache_dir), seq_len=seq_len, **options)


def task_tokenizer(name: str, **options):
    """The tokenizer task `name` would use with these options, without loading its data."""
    return task_spec(name).tokenizer(_checked_options(name, options))


def _named_tokenizer(options: dict):
    return get_tokenizer(options["tokenizer"])


def _listops_tokenizer(options: dict):
    return ListOpsTokenizer(options["listops_tokens"])


# --- language modelling -------------------------------------------------------------------


def _lm_task(name, tokenizer, seq_len, stride, splits: dict, sources: dict, protocol: dict) -> Task:
    seq_len = seq_len or DEFAULT_CONTEXT
    stride = stride or seq_len
    if not 1 <= stride <= seq_len:
        raise UserError(f"stride must be between 1 and seq_len ({seq_len}), got {stride}")
    for split, tokens in splits.items():
        if len(tokens) < (seq_len if split == "train" else 2):
            raise UserError(f"{name} {split} split has {len(tokens)} tokens, too few for seq_len {seq_len}")
    protocol = {
        "task": name,
        "kind": "lm",
        **protocol,
        "splits": sources,
        "tokens": {s: int(len(t)) for s, t in splits.items()},
        "tokenizer": tokenizer.name,
        "context": seq_len,
        "stride": stride,
        "eval": "non-overlapping windows, remainder dropped" if stride == seq_len else "sliding windows, every token scored once",
    }
    return Task(name, "lm", splits["train"], splits["val"], splits["test"], tokenizer, seq_len, protocol)


def _wikitext(version, *, data_dir, cache, seq_len, eval_stride=0, variant="raw", tokenizer="gpt2", path="") -> Task:
    tok = get_tokenizer(tokenizer)
    splits, sources = {}, {}
    for split, file_split in (("train", "train"), ("val", "valid"), ("test", "test")):
        source = wikitext_source(version, file_split, variant, data_dir, path or None)
        splits[split] = corpus_tokens(source, tok, cache, wikitext_cache_name(version, variant, file_split, tok))
        sources[split] = source.description
    protocol = {"dataset": f"WikiText-{version} ({variant})", "proxy": False}
    return _lm_task(f"wikitext{version}", tok, seq_len, eval_stride, splits, sources, protocol)


def _wikitext2_proxy(*, data_dir, cache, seq_len, eval_stride=0, val_fraction=0.1, tokenizer="gpt2", path="") -> Task:
    tok = get_tokenizer(tokenizer)
    valid = wikitext_source("2", "valid", "raw", data_dir, path or None)
    test = wikitext_source("2", "test", "raw", data_dir, path or None)
    valid_tokens = corpus_tokens(valid, tok, cache, wikitext_cache_name("2", "raw", "valid", tok))
    train_tokens, val_tokens = carve_tail(valid_tokens, val_fraction, valid.description)
    test_tokens = corpus_tokens(test, tok, cache, wikitext_cache_name("2", "raw", "test", tok))
    splits = {"train": train_tokens, "val": val_tokens, "test": test_tokens}
    sources = {
        "train": f"{valid.description} (first {1 - val_fraction:.0%} of tokens)",
        "val": f"{valid.description} (last {val_fraction:.0%} of tokens)",
        "test": test.description,
    }
    protocol = {"dataset": "WikiText-2 (raw), proxy: trained on the valid split", "proxy": True}
    return _lm_task("wikitext2-proxy", tok, seq_len, eval_stride, splits, sources, protocol)


def _imdb_lm_proxy(*, data_dir, cache, seq_len, eval_stride=0, val_fraction=0.1, data_seed=0, tokenizer="gpt2",
                   path="") -> Task:
    tok = get_tokenizer(tokenizer)
    train_src, test_src = imdb_source("train", data_dir, path or None), imdb_source("test", data_dir, path or None)

    def build_train():
        texts, labels = train_src.read()
        kept, held = stratified_split(labels, val_fraction, data_seed)
        return {"train": documents_tokens([texts[i] for i in kept], tok), "val": documents_tokens([texts[i] for i in held], tok)}

    key = {"what": "imdb-lm", "source": train_src.checksum, "tokenizer": tok.fingerprint, "val_fraction": val_fraction,
           "seed": data_seed}
    train = cache.arrays(f"imdb-lm-train-{tok.name}", key, build_train)
    key = {"what": "imdb-lm", "source": test_src.checksum, "tokenizer": tok.fingerprint}
    test = cache.arrays(f"imdb-lm-test-{tok.name}", key, lambda: {"test": documents_tokens(test_src.read()[0], tok)})
    splits = {"train": train["train"], "val": train["val"], "test": test["test"]}
    sources = {
        "train": f"{train_src.description} ({1 - val_fraction:.0%} of reviews, seed {data_seed})",
        "val": f"{train_src.description} ({val_fraction:.0%} of reviews, stratified, seed {data_seed})",
        "test": test_src.description,
    }
    protocol = {"dataset": "IMDB review text, proxy LM corpus (reviews joined with end-of-text)", "proxy": True}
    return _lm_task("imdb-lm-proxy", tok, seq_len, eval_stride, splits, sources, protocol)


def _text(*, data_dir, cache, seq_len, eval_stride=0, train_files=(), val_files=(), test_files=(), val_fraction=0.1,
          test_fraction=0.1, tokenizer="gpt2") -> Task:
    if not train_files:
        raise UserError("the text task needs train_files=<file or list of files> (UTF-8 text)")
    tok = get_tokenizer(tokenizer)

    def load(paths):
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        sources = [file_source(p) for p in paths]
        arrays = [corpus_tokens(s, tok, cache, f"text-{Path(s.description).name}-{tok.name}") for s in sources]
        return join_with_eot(arrays, tok.eot_id), ", ".join(s.description for s in sources)

    train_tokens, train_desc = load(train_files)
    splits, sources = {}, {}
    if not test_files:
        train_tokens, splits["test"] = carve_tail(train_tokens, test_fraction, train_desc)
        sources["test"] = f"{train_desc} (last {test_fraction:.0%} of tokens)"
    else:
        splits["test"], sources["test"] = load(test_files)
    if not val_files:
        train_tokens, splits["val"] = carve_tail(train_tokens, val_fraction, train_desc)
        sources["val"] = f"{train_desc} (held-out tail, {val_fraction:.0%} of the rest)"
    else:
        splits["val"], sources["val"] = load(val_files)
    splits["train"], sources["train"] = train_tokens, train_desc
    return _lm_task("text", tok, seq_len, eval_stride, splits, sources, {"dataset": "user text files", "proxy": False})


# --- classification -----------------------------------------------------------------------


def _check_sizes(**sizes: int) -> None:
    for what, n in sizes.items():
        if not isinstance(n, int) or n < 1:
            raise UserError(f"{what} must be a positive integer, got {n!r}")


def _classification_task(name, tokenizer, seq_len, train, val, test, n_classes, protocol) -> Task:
    return Task(name, "cls", train, val, test, tokenizer, seq_len, {"task": name, "kind": "cls", **protocol}, n_classes)


def _imdb_task(name, default_len, *, data_dir, cache, seq_len, val_fraction, data_seed, tokenizer, path) -> Task:
    tok = get_tokenizer(tokenizer)
    seq_len = seq_len or default_len
    full_train, train_desc = imdb_examples("train", tok, data_dir, path or None, cache)
    full_test, test_desc = imdb_examples("test", tok, data_dir, path or None, cache)
    kept, held = stratified_split(full_train.labels, val_fraction, data_seed)
    protocol = {
        "dataset": "IMDB (aclImdb) sentiment",
        "splits": {"train": train_desc, "val": f"{train_desc} ({val_fraction:.0%} stratified, seed {data_seed})",
                   "test": test_desc},
        "tokenizer": tok.name,
        "seq_len": seq_len,
        "truncation": f"first {seq_len} tokens",
        "selection": "validation only; test evaluated once",
    }
    train, val, test = full_train.select(kept, seq_len), full_train.select(held, seq_len), full_test.truncated(seq_len)
    return _classification_task(name, tok, seq_len, train, val, test, 2, protocol)


SPLITS = ("train", "val", "test")


def _cut(rows: list, n_train: int, n_val: int) -> dict[str, list]:
    return {"train": rows[:n_train], "val": rows[n_train : n_train + n_val], "test": rows[n_train + n_val :]}


def _encode_rows(rows: list, tok: ListOpsTokenizer) -> ClassificationData:
    """(expression, label) rows as token sequences."""
    return ClassificationData.from_sequences([tok.encode(x) for x, _ in rows], [t for _, t in rows], tok.pad_id)


def _listops_examples(read_rows, tok: ListOpsTokenizer, seq_len: int, cache: Cache, key: dict) -> dict[str, ClassificationData]:
    def build():
        arrays = {}
        for split, split_rows in read_rows().items():
            data = _encode_rows(split_rows, tok)
            arrays |= {f"{split}_tokens": data.tokens, f"{split}_offsets": data.offsets, f"{split}_labels": data.labels}
        return arrays

    arrays = cache.arrays(f"listops-{tok.style}", {"what": "listops-tokens", "tokenizer": tok.fingerprint, **key}, build)
    out = {}
    for split in SPLITS:
        data = ClassificationData(arrays[f"{split}_tokens"], arrays[f"{split}_offsets"], arrays[f"{split}_labels"], tok.pad_id)
        out[split] = data.truncated(seq_len)
    return out


def _listops(
    *,
    data_dir,
    cache,
    seq_len,
    path="",
    listops_train=LRA_SIZES["n_train"],
    listops_val=LRA_SIZES["n_val"],
    listops_test=LRA_SIZES["n_test"],
    listops_min_length=LRA_SIZES["min_length"],
    listops_max_length=LRA_SIZES["max_length"],
    listops_max_depth=LRA_SIZES["max_depth"],
    listops_max_args=LRA_SIZES["max_args"],
    data_seed=0,
    listops_tokens="lra",
    workers=0,
) -> Task:
    tok = ListOpsTokenizer(listops_tokens)
    if path:
        folder = Path(path).expanduser()
        key = {"source": checksum([require_file(folder / f"basic_{s}.tsv", "ListOps TSV file") for s in SPLITS])}
        source = {"dataset": "LRA ListOps (files)"}
        seq_len = seq_len or LRA_SIZES["max_length"]
    else:
        _check_sizes(listops_train=listops_train, listops_val=listops_val, listops_test=listops_test)
        # The cache key and the protocol keep the generator's own names (existing caches stay valid).
        sizes = {"n_train": listops_train, "n_val": listops_val, "n_test": listops_test}
        rules = {"min_length": listops_min_length, "max_length": listops_max_length, "max_depth": listops_max_depth,
                 "max_args": listops_max_args}
        key = {"generator": "lra-listops-v1", "seed": data_seed, **sizes, **rules}

        def write_tsv(folder: Path) -> None:
            rows = generate_listops(listops_train + listops_val + listops_test, seed=data_seed, workers=workers or None,
                                    **rules)
            for split, split_rows in _cut(rows, listops_train, listops_val).items():
                write_listops_tsv(folder / f"basic_{split}.tsv", split_rows)

        folder = cache.folder("listops", key, write_tsv)
        source = {"dataset": "LRA ListOps (generated)", "generation": {"seed": data_seed, **sizes, **rules}}
        seq_len = seq_len or listops_max_length
    files = {s: folder / f"basic_{s}.tsv" for s in SPLITS}
    source["splits"] = {s: str(f) for s, f in files.items()}
    examples = _listops_examples(lambda: {s: read_listops_tsv(f) for s, f in files.items()}, tok, seq_len, cache, key)
    protocol = {**source, "tokenizer": tok.name, "seq_len": seq_len, "truncation": f"first {seq_len} tokens",
                "selection": "validation only; test evaluated once"}
    return _classification_task("listops", tok, seq_len, examples["train"], examples["val"], examples["test"], 10, protocol)


def _listops_flat(*, data_dir, cache, seq_len, listops_train=10_000, listops_val=1_000, listops_test=1_000,
                  listops_min_args=4, listops_max_args=8, data_seed=0, listops_tokens="lra") -> Task:
    tok = ListOpsTokenizer(listops_tokens)
    _check_sizes(listops_train=listops_train, listops_val=listops_val, listops_test=listops_test)
    rows = generate_listops_flat(listops_train + listops_val + listops_test, seed=data_seed, min_args=listops_min_args,
                                 max_args=listops_max_args)
    data = {s: _encode_rows(r, tok) for s, r in _cut(rows, listops_train, listops_val).items()}
    seq_len = seq_len or listops_max_args + 2
    protocol = {
        "dataset": "flat ListOps toy (paper's variant), splits disjoint",
        "generation": {"seed": data_seed, "n_train": listops_train, "n_val": listops_val, "n_test": listops_test,
                       "min_args": listops_min_args, "max_args": listops_max_args},
        "tokenizer": tok.name,
        "seq_len": seq_len,
        "selection": "validation only; test evaluated once",
    }
    data = {s: d.truncated(seq_len) for s, d in data.items()}
    return _classification_task("listops-flat", tok, seq_len, data["train"], data["val"], data["test"], 10, protocol)


# --- the published tasks ------------------------------------------------------------------

_LM_TRAIN = {"lr": 1e-4, "min_lr": 1e-6, "warmup_steps": 500, "batch_size": 128, "epochs": 10.0}
# Published LM: AdamW(0.9, 0.95), wd 0.01, lr 1e-4, warm-up 500, cosine to 1e-6, 128 sequences per
# step, clip 1.0, GPT-2 BPE, context 256 in non-overlapping windows, 10 epochs (17M).
_LM = {"preset": "paper-17m", "train": _LM_TRAIN, "data": {"seq_len": 256, "eval_stride": 0, "tokenizer": "gpt2"}}
# Published classification: mean pooling, MLP head, 4 epochs at lr 5e-5.
_CLS_TRAIN = {"lr": 5e-5, "min_lr": 1e-6, "warmup_steps": 100, "batch_size": 32, "epochs": 4.0}
# LRA (Tay et al. 2021): batch 32; ListOps 5k steps, Text 20k steps.
_LRA_TRAIN = {"lr": 1e-4, "min_lr": 1e-6, "warmup_steps": 1000, "batch_size": 32}
_IMDB_SOURCE = "`chiar download imdb`, or DATA_DIR/imdb/imdb_{train,test}.jsonl.xz, or an aclImdb folder"

for _spec in [
    TaskSpec("wikitext103", "lm", "LM on WikiText-103 train/valid/test (`chiar download wikitext103`)",
             "`chiar download wikitext103` (HF parquet into DATA_DIR/wikitext-103-raw-v1), or the official wiki.*.raw "
             "in DATA_DIR/wikitext-103-raw",
             functools.partial(_wikitext, "103"), _named_tokenizer, _LM),
    TaskSpec("wikitext2", "lm", "LM on WikiText-2 train/valid/test (`chiar download wikitext2`)",
             "`chiar download wikitext2` (HF parquet into DATA_DIR/wikitext-2-raw-v1), or the official wiki.*.raw in "
             "DATA_DIR/wikitext-2-raw",
             functools.partial(_wikitext, "2"), _named_tokenizer, _LM),
    TaskSpec("wikitext2-proxy", "lm",
             "PROXY LM: train on WikiText-2 valid (val = its last 10%), test on WikiText-2 test",
             "the valid and test splits of WikiText-2: `chiar download wikitext2`, or wiki.{valid,test}.raw in "
             "DATA_DIR/wikitext2_raw",
             _wikitext2_proxy, _named_tokenizer, {**_LM, "train": {**_LM_TRAIN, "batch_size": 32}}),
    TaskSpec("imdb-lm-proxy", "lm",
             "PROXY LM: IMDB train review text (val = 10% of reviews), test on IMDB test review text", _IMDB_SOURCE,
             _imdb_lm_proxy, _named_tokenizer, {**_LM, "train": {**_LM_TRAIN, "epochs": 2.0}}),
    TaskSpec("text", "lm", "LM on your UTF-8 files: train_files=, optional val_files= and test_files= (else carved "
             "from train's tail)",
             "your UTF-8 files: --set data.train_files=[a.txt] (optional val_files/test_files)",
             _text, _named_tokenizer, {**_LM, "train": {**_LM_TRAIN, "batch_size": 32, "epochs": 1.0}}),
    # partial keeps the options' defaults visible to task_options (inspect.signature)
    TaskSpec("imdb", "cls", "IMDB sentiment, GPT-2 BPE cut to 256 tokens (published), val = 10% of train",
             _IMDB_SOURCE,
             functools.partial(_imdb_task, "imdb", 256, val_fraction=0.1, data_seed=0, tokenizer="gpt2", path=""),
             _named_tokenizer,
             {"preset": "paper-17m", "model": {"n_classes": 2}, "train": _CLS_TRAIN,
              "data": {"seq_len": 256, "tokenizer": "gpt2"}}),
    TaskSpec("lra-text", "cls", "LRA Text: IMDB sentiment on UTF-8 bytes cut to 1000 (or 4000), val = 10% of train",
             _IMDB_SOURCE,
             functools.partial(_imdb_task, "lra-text", 1000, val_fraction=0.1, data_seed=0, tokenizer="bytes", path=""),
             _named_tokenizer,
             {"preset": "paper-17m", "model": {"n_classes": 2, "bidirectional": True},
              "train": {**_LRA_TRAIN, "max_steps": 20000, "bucket_batches": 16},
              "data": {"seq_len": 1000, "tokenizer": "bytes"}}),
    TaskSpec("listops", "cls", "LRA ListOps (generated, 10 classes; LRA sizes by default, LISTOPS_CPU for quick runs)",
             "generated on first use (LRA procedure), cached under data.cache_dir; or LRA basic_{train,val,test}.tsv "
             "files via data.path",
             _listops, _listops_tokenizer,
             {"preset": "paper-17m", "model": {"n_classes": 10, "bidirectional": True},
              "train": {**_LRA_TRAIN, "max_steps": 5000, "bucket_batches": 16}, "data": {"seq_len": 2000}}),
    TaskSpec("listops-flat", "cls", "the paper's flat ListOps toy: one operator over 4-8 digits, splits disjoint",
             "generated on the fly (no download)",
             _listops_flat, _listops_tokenizer,
             {"preset": "paper-17m", "model": {"n_classes": 10}, "train": _CLS_TRAIN,
              "data": {"seq_len": 10, "listops_train": 10000, "listops_val": 1000, "listops_test": 1000,
                       "listops_max_args": 8}}),
]:
    register_task(_spec)
