"""From chiarformer.data to the engine's TaskData, one function per kind of task.

Each function takes (cfg: RunConfig, spec: TaskSpec, quiet, splits) and returns TaskData with
LM windows or classification sets and a protocol dict saying exactly what was measured.
`splits` names the splits the caller needs (None = all); others may be left out (None).
"""

from __future__ import annotations

import sys

import numpy as np

from ..errors import UserError
from .datasets import ClassificationSet, LMWindows, TaskData


def _need(splits, name: str) -> bool:
    return splits is None or name in splits


def _note(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr, flush=True)


def _data_dir(cfg):
    return cfg.data.data_dir or None


def _tokenizer(name: str):
    from ..data.tokenizer import get_tokenizer

    return get_tokenizer(name)


def tokenizer_for(cfg):
    """The run's tokenizer (for `load_run`), or None for tasks with a fixed private vocabulary."""
    if cfg.task == "lra-text":
        return _tokenizer("bytes")
    if cfg.task in ("listops", "listops-flat"):
        return listops_vocabulary(cfg)
    return _tokenizer(cfg.data.tokenizer)


def _lm_data(cfg, train_tokens, val_tokens, test_tokens, tokenizer, protocol: dict) -> TaskData:
    d = cfg.data
    if train_tokens is not None and d.max_train_tokens:
        train_tokens = train_tokens[: d.max_train_tokens]
    stride = d.eval_stride or d.seq_len

    def windows(tokens, eval_mode: bool):
        if tokens is None:
            return None
        return LMWindows(np.asarray(tokens), d.seq_len, stride if eval_mode else d.seq_len)

    protocol = {
        "kind": "lm",
        "tokenizer": tokenizer.name,
        "tokenizer_source": getattr(tokenizer, "source", tokenizer.name),
        "context": d.seq_len,
        "stride": stride,
        "ppl": "exp(mean next-token cross-entropy per token over the scored targets)",
        "windows": "non-overlapping, each scores its seq_len-1 next tokens (published)" if stride == d.seq_len
        else f"sliding, every token scored once with >= {d.seq_len - stride} tokens of context",
        **protocol,
    }
    for name, tokens in (("train", train_tokens), ("val", val_tokens), ("test", test_tokens)):
        if tokens is not None:
            protocol[f"{name}_tokens"] = int(len(tokens))
    return TaskData(
        kind="lm", train=windows(train_tokens, False), val=windows(val_tokens, True), test=windows(test_tokens, True),
        vocab_size=tokenizer.vocab_size, protocol=protocol, token_bytes=tokenizer.token_byte_lengths(),
        tokenizer=tokenizer, pad_id=tokenizer.pad_id,
    )


def _carve(tokens, fraction: float, what: str):
    from ..data.text import carve_tail

    if fraction <= 0:
        raise UserError(f"{what} has no validation split; set data.val_fraction > 0 to carve one from it")
    return carve_tail(tokens, fraction, what)


# ---------------------------------------------------------------------------- WikiText
def wikitext(cfg, spec, quiet=False, splits=None) -> TaskData:
    from ..data.wikitext import wikitext_tokens

    tok = _tokenizer(cfg.data.tokenizer)
    d = cfg.data

    def split(version: str, name: str):
        _note(quiet, f"loading WikiText-{version} {d.variant} {name} ({tok.name} tokens, cached after the first time)")
        return wikitext_tokens(version, name, tok, variant=d.variant, data_dir=_data_dir(cfg))

    if cfg.task == "wt2-proxy":
        train = val = test = None
        if _need(splits, "train") or _need(splits, "val"):
            train, val = _carve(split("2", "valid"), d.val_fraction, "WikiText-2 valid (the proxy's training text)")
        if _need(splits, "test"):
            test = split("2", "test")
        protocol = {
            "source": f"WikiText-2 {d.variant}",
            "proxy": "PROXY: trained on WikiText-2 valid (last {:.0%} held out for validation), tested on WikiText-2 "
                     "test; not the official WikiText-2 protocol".format(d.val_fraction),
            "splits": {"train": "wiki.valid head", "val": "wiki.valid tail", "test": "wiki.test"},
        }
        return _lm_data(cfg, train, val, test, tok, protocol)
    version = "103" if cfg.task == "wikitext103" else "2"
    train = split(version, "train") if _need(splits, "train") else None
    val = split(version, "valid") if _need(splits, "val") else None
    test = split(version, "test") if _need(splits, "test") else None
    protocol = {"source": f"WikiText-{version} {d.variant}", "proxy": None,
                "splits": {"train": "wiki.train", "val": "wiki.valid", "test": "wiki.test"}}
    return _lm_data(cfg, train, val, test, tok, protocol)


# ---------------------------------------------------------------------------- user text
def text(cfg, spec, quiet=False, splits=None) -> TaskData:
    from ..data.cache import Cache
    from ..data.text import corpus_tokens, file_source, join_with_eot

    d = cfg.data
    if not d.train_files:
        raise UserError("task 'text' needs data.train_files, e.g. --set data.train_files=[train.txt] "
                        "(and optionally data.val_files / data.test_files)")
    tok = _tokenizer(d.tokenizer)
    cache = Cache()

    def tokens(files):
        arrays = [corpus_tokens(file_source(f), tok, cache, "text-" + tok.name) for f in files]
        return join_with_eot(arrays, tok.eot_id)

    train = val = test = None
    if d.val_files:
        if _need(splits, "train"):
            train = tokens(d.train_files)
        if _need(splits, "val"):
            val = tokens(d.val_files)
        val_source = "data.val_files"
    else:
        if _need(splits, "train") or _need(splits, "val"):
            train, val = _carve(tokens(d.train_files), d.val_fraction, "the training text")
        val_source = f"last {d.val_fraction:.0%} of the training text"
    if d.test_files and _need(splits, "test"):
        test = tokens(d.test_files)
    protocol = {"source": "user text files", "proxy": None,
                "splits": {"train": list(map(str, d.train_files)), "val": val_source,
                           "test": list(map(str, d.test_files)) or None}}
    return _lm_data(cfg, train, val, test, tok, protocol)


# ---------------------------------------------------------------------------- IMDB
def _imdb_rows(cfg, split: str):
    from .. import data as data_pkg

    loader = getattr(data_pkg, "imdb_rows", None) or getattr(data_pkg, "load_imdb", None)
    if loader is None:
        raise UserError("this chiarformer.data has no IMDB loader")
    return loader(split, data_dir=_data_dir(cfg))


def imdb_lm(cfg, spec, quiet=False, splits=None) -> TaskData:
    raise UserError("task imdb-lm-proxy is not wired to chiarformer.data yet")


def imdb(cfg, spec, quiet=False, splits=None) -> TaskData:
    raise UserError(f"task {cfg.task} is not wired to chiarformer.data yet")


# ---------------------------------------------------------------------------- ListOps
def listops_vocabulary(cfg):
    return None


def listops(cfg, spec, quiet=False, splits=None) -> TaskData:
    raise UserError("task listops is not wired to chiarformer.data yet")


def listops_flat(cfg, spec, quiet=False, splits=None) -> TaskData:
    raise UserError("task listops-flat is not wired to chiarformer.data yet")
