"""WikiText-2 and WikiText-103 (raw or tokenised variant), from local files or Hugging Face.

    text_source = wikitext_source("103", "train", variant="raw", data_dir=None, path=None)
    tokens = wikitext_tokens("2", "valid", tokenizer)       # cached uint16 ids of the split

Sources, tried in order (with `path`, only that folder is searched):
1. a folder in the official zip layout holding wiki.{train,valid,test}.{raw,tokens}, named
   like the zips (wikitext-103-raw, wikitext-2, ...) or wikitext2_raw, under the data folder;
2. Hugging Face parquet files <split>-*.parquet (as in the Salesforce/wikitext repository) or
   <split>/*.parquet (the hub's parquet conversion) in the config folder (wikitext-103-raw-v1,
   ...; HF split names train / validation / test);
3. `datasets.load_dataset("Salesforce/wikitext", config)` when `datasets` is installed and
   the hub answers (or HF_HUB_OFFLINE=1 with a filled cache).
HF rows are the file's lines, with blank lines (" \\n" in the files) stored as ""; the file text
is rebuilt exactly by joining rows and restoring those, so every source gives the same ids.
A split found nowhere is a UserError naming the split and every place tried.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from ..errors import UserError
from .cache import Cache
from .files import checksum, fetch_hint
from .files import data_dir as resolve_data_dir
from .hub import SourceUnavailable, load_hf_dataset
from .text import TextSource, corpus_tokens, file_source

VERSIONS = ("2", "103")
VARIANTS = ("raw", "tokens")
HF_SPLIT = {"train": "train", "valid": "validation", "test": "test"}
HF_REPO = "Salesforce/wikitext"


def hf_config(version: str, variant: str) -> str:
    return f"wikitext-{version}{'-raw' if variant == 'raw' else ''}-v1"


def _folders(version: str, variant: str) -> list[str]:
    zip_name = f"wikitext-{version}{'-raw' if variant == 'raw' else ''}"  # folder inside the official zip
    return [zip_name, f"wikitext{version}_{variant}", hf_config(version, variant), f"{HF_REPO}/{hf_config(version, variant)}"]


def _split_name(split: str) -> str:
    split = {"validation": "valid", "val": "valid"}.get(split, split)
    if split not in HF_SPLIT:
        raise UserError(f"unknown WikiText split {split!r}; choose train, valid or test")
    return split


def cache_name(version: str, variant: str, split: str, tokenizer) -> str:
    """The cache entry of one tokenised split: the same name wherever the split is read."""
    return f"wikitext{version}-{variant}-{_split_name(split)}-{tokenizer.name}"


def rows_to_text(rows: Iterable[str | None]) -> Iterator[str]:
    """Rebuild the WikiText file text from HF rows (blank lines are stored as "")."""
    for row in rows:
        yield row if row else " \n"


def parquet_source(files: list[Path], description: str) -> TextSource:
    """HF WikiText parquet shards (a `text` column) as one text, shards in name order."""
    import pyarrow.parquet as pq

    def pieces() -> Iterator[str]:
        for f in files:
            pf = pq.ParquetFile(f)
            if "text" not in pf.schema_arrow.names:
                raise UserError(f"{f} has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
            for batch in pf.iter_batches(batch_size=65536, columns=["text"]):
                yield "".join(rows_to_text(batch.column(0).to_pylist()))

    return TextSource(description, lambda: checksum(files), pieces)


def _hf_source(version: str, split: str, variant: str) -> TextSource:
    config = hf_config(version, variant)
    ds = load_hf_dataset(HF_REPO, config, HF_SPLIT[split])

    def pieces() -> Iterator[str]:
        for start in range(0, len(ds), 65536):
            yield "".join(rows_to_text(ds[start : start + 65536]["text"]))

    return TextSource(f"{HF_REPO} {config} {HF_SPLIT[split]}", lambda: f"hf-{ds._fingerprint}", pieces)


def wikitext_source(
    version: str,
    split: str,
    variant: str = "raw",
    data_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
) -> TextSource:
    """Where one WikiText split is read from (see the module docstring for the search)."""
    version = str(version)
    if version not in VERSIONS:
        raise UserError(f"unknown WikiText version {version!r}; choose 2 or 103")
    if variant not in VARIANTS:
        raise UserError(f"unknown WikiText variant {variant!r}; choose raw or tokens")
    split = _split_name(split)
    if path is not None:
        folders = [Path(path).expanduser()]
        if not folders[0].is_dir():
            raise UserError(f"WikiText folder not found: {folders[0]}")
    else:
        base = resolve_data_dir(data_dir)
        folders = [base / name for name in _folders(version, variant)]
    tried = []
    for folder in folders:
        official = folder / f"wiki.{split}.{variant}"
        if official.is_file():
            return file_source(official)
        tried.append(str(official))
    for folder in folders:
        for pattern in (f"{HF_SPLIT[split]}-*.parquet", f"{HF_SPLIT[split]}/*.parquet"):
            shards = sorted(folder.glob(pattern))
            if shards:
                return parquet_source(shards, f"{folder}/{pattern}")
        tried.append(f"{folder}/{HF_SPLIT[split]}-*.parquet")
    if path is None:
        try:
            return _hf_source(version, split, variant)
        except SourceUnavailable as e:
            tried.append(str(e))
    command = f"wikitext{version}" + (" --variant tokens" if variant == "tokens" else "")
    raise UserError(
        f"WikiText-{version} ({variant}) split '{split}' not found: {fetch_hint(command)}, or put the official "
        f"wiki.*.{variant} files there; tried: {', '.join(tried)}"
    )


def wikitext_tokens(
    version: str,
    split: str,
    tokenizer,
    variant: str = "raw",
    data_dir: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    cache: Cache | None = None,
) -> np.ndarray:
    """Cached uint16 ids of one WikiText split (the whole split text encoded at once)."""
    source = wikitext_source(version, split, variant, data_dir, path)
    return corpus_tokens(source, tokenizer, cache or Cache(), cache_name(version, variant, split, tokenizer))
