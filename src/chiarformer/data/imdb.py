"""IMDB reviews (aclImdb, 25k train + 25k test, labels 0 = negative, 1 = positive).

    texts, labels, where = load_imdb("train", data_dir=None, path=None)
    data = imdb_examples("test", tokenizer, cache=cache)   # ClassificationData, full length

Sources, tried in order in the data folder (with `path`, only there):
1. the aclImdb folder layout: aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt;
2. JSON lines imdb_{train,test}.jsonl[.xz] with fields `text` and `label` (in imdb/ or the
   data folder itself);
3. Hugging Face parquet files plain_text/{train,test}-*.parquet (stanfordnlp/imdb layout,
   columns `text` and `label`);
4. `datasets.load_dataset("stanfordnlp/imdb")` when installed and the hub answers.
Reviews keep their exact text (`<br />` tags included), ordered by label then numeric id for the
folder layout and as stored otherwise. Tokenised reviews are cached at full length; callers
cut them (GPT-2 BPE to 256 as published, bytes to 1000 or 4000 as in LRA Text).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .cache import Cache
from .classification import ClassificationData
from .files import checksum, fetch_hint
from .files import data_dir as resolve_data_dir
from .hub import SourceUnavailable, load_hf_dataset

SPLITS = ("train", "test")
HF_REPO = "stanfordnlp/imdb"


@dataclass
class ReviewSource:
    description: str
    checksum: str  # identifies the exact source content (cache key)
    read: Callable[[], tuple[list[str], np.ndarray]]  # -> (texts, labels)


def _folder_source(split_dir: Path) -> ReviewSource:
    files = []
    for label, name in ((0, "neg"), (1, "pos")):
        found = list((split_dir / name).glob("*.txt"))
        files += sorted(((label, _review_id(p), p) for p in found), key=lambda t: t[:2])
    if not files:
        raise UserError(f"no reviews in {split_dir}/pos or {split_dir}/neg")
    # 25k small files: a manifest of names, sizes and times stands in for hashing their bytes.
    manifest = "\n".join(_stamp(p) for _, _, p in files)

    def read():
        texts = [_read_review(p) for _, _, p in files]
        return texts, np.array([label for label, _, _ in files], np.int64)

    return ReviewSource(str(split_dir), "folder-" + hashlib.sha256(manifest.encode()).hexdigest(), read)


def _stamp(p: Path) -> str:
    st = p.stat()
    return f"{p.parent.name}/{p.name} {st.st_size} {st.st_mtime_ns}"


def _review_id(p: Path) -> int:
    try:
        return int(p.stem.split("_")[0])
    except ValueError:
        raise UserError(f"review file name is not <id>_<rating>.txt: {p}") from None


def _read_review(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{p} is not UTF-8 text") from None


def _jsonl_source(path: Path) -> ReviewSource:
    def read():
        opener = lzma.open if path.suffix == ".xz" else open
        texts, labels = [], []
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                        texts.append(row["text"])
                        labels.append(row["label"])
                    except (ValueError, KeyError, TypeError):
                        raise UserError(f"{path} line {n} is not a JSON object with 'text' and 'label'") from None
        except (lzma.LZMAError, UnicodeDecodeError, EOFError) as e:
            raise UserError(f"{path} is not readable UTF-8 JSON lines ({type(e).__name__})") from None
        return texts, np.asarray(labels, np.int64)

    return ReviewSource(str(path), checksum([path]), read)


def _parquet_source(files: list[Path]) -> ReviewSource:
    def read():
        import pyarrow.parquet as pq

        texts, labels = [], []
        for f in files:
            table = pq.read_table(f)
            missing = {"text", "label"} - set(table.column_names)
            if missing:
                raise UserError(f"{f} lacks column(s) {', '.join(sorted(missing))}")
            texts += table.column("text").to_pylist()
            labels += table.column("label").to_pylist()
        return texts, np.asarray(labels, np.int64)

    return ReviewSource(f"{files[0].parent}/{files[0].name.split('-')[0]}-*.parquet", checksum(files), read)


def _hf_source(split: str) -> ReviewSource:
    ds = load_hf_dataset(HF_REPO, None, split)
    return ReviewSource(f"{HF_REPO} {split}", f"hf-{ds._fingerprint}",
                        lambda: (list(ds["text"]), np.asarray(ds["label"], np.int64)))


def imdb_source(split: str, data_dir: str | os.PathLike | None = None, path: str | os.PathLike | None = None) -> ReviewSource:
    """Where one IMDB split is read from (see the module docstring for the search)."""
    if split not in SPLITS:
        raise UserError(f"unknown IMDB split {split!r}; choose train or test")
    if path is not None:
        bases = [Path(path).expanduser()]
        if not bases[0].exists():
            raise UserError(f"IMDB folder not found: {bases[0]}")
    else:
        root = resolve_data_dir(data_dir)
        bases = [root, root / "imdb"]
    tried = []
    for base in bases:
        for split_dir in (base / "aclImdb" / split, base / split):
            if (split_dir / "pos").is_dir() or (split_dir / "neg").is_dir():
                return _folder_source(split_dir)
        tried.append(str(base / "aclImdb" / split))
    for base in bases:
        for name in (f"imdb_{split}.jsonl.xz", f"imdb_{split}.jsonl"):
            if (base / name).is_file():
                return _jsonl_source(base / name)
        tried.append(str(base / f"imdb_{split}.jsonl[.xz]"))
    for base in bases:
        for folder in (base / "plain_text", base / HF_REPO / "plain_text", base):
            shards = sorted(folder.glob(f"{split}-*.parquet"))
            if shards:
                return _parquet_source(shards)
        tried.append(str(base / "plain_text" / f"{split}-*.parquet"))
    if path is None:
        try:
            return _hf_source(split)
        except SourceUnavailable as e:
            tried.append(str(e))
    raise UserError(f"IMDB split '{split}' not found: {fetch_hint('imdb')}; tried: {', '.join(tried)}")


def load_imdb(split: str, data_dir=None, path=None) -> tuple[list[str], np.ndarray, str]:
    """(review texts, labels 0/1, source description) of one split."""
    source = imdb_source(split, data_dir, path)
    return *_read_checked(source), source.description


def _read_checked(source: ReviewSource) -> tuple[list[str], np.ndarray]:
    texts, labels = source.read()
    if not texts:
        raise UserError(f"{source.description} holds no reviews")
    if not np.isin(labels, (0, 1)).all():
        raise UserError(f"{source.description} has labels other than 0 and 1")
    return texts, labels


def imdb_examples(split: str, tokenizer, data_dir=None, path=None, cache: Cache | None = None) -> tuple[ClassificationData, str]:
    """(all reviews of a split tokenised at full length, source description); cached."""
    source = imdb_source(split, data_dir, path)
    key = {"what": "imdb-reviews", "source": source.checksum, "tokenizer": tokenizer.fingerprint}

    def build():
        data = _encode_reviews(*_read_checked(source), tokenizer)
        return {"tokens": data.tokens, "offsets": data.offsets, "labels": data.labels}

    arrays = (cache or Cache()).arrays(f"imdb-{split}-{tokenizer.name}", key, build)
    return ClassificationData(arrays["tokens"], arrays["offsets"], arrays["labels"], tokenizer.pad_id), source.description


def _encode_reviews(texts: list[str], labels: np.ndarray, tokenizer) -> ClassificationData:
    lengths, parts = [], []
    for start in range(0, len(texts), 4096):
        for ids in tokenizer.encode_batch(texts[start : start + 4096]):
            parts.append(np.asarray(ids, np.uint16))
            lengths.append(len(ids))
    if min(lengths) == 0:
        raise UserError(f"review {lengths.index(0)} is empty")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return ClassificationData(np.concatenate(parts), offsets, labels, tokenizer.pad_id)
