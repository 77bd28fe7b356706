"""Where data and caches live, and reading users' files safely.

Data folder, in order: an explicit argument, env CHIAR_DATA_DIR, ~/.cache/chiarformer/data
(where `chiar download` writes by default). Cache folder: an explicit argument, env
CHIAR_CACHE_DIR, ~/.cache/chiarformer. Text files are read as strict UTF-8 in blocks, so a bad byte is
reported with its file offset instead of being replaced silently; line endings become "\n".
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import UserError

ENV_DATA_DIR = "CHIAR_DATA_DIR"
ENV_CACHE_DIR = "CHIAR_CACHE_DIR"
_BLOCK = 1 << 22


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder searched for datasets (see the module docstring for the order)."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "chiarformer" / "data"


def fetch_hint(command: str) -> str:
    """How to get missing data, for "not found" errors: the exact `chiar download` command."""
    return f"get it with `chiar download {command}` (writes into {data_dir()}; {ENV_DATA_DIR} chooses the folder)"


def cache_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The folder holding token caches and generated ListOps files."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "chiarformer"


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return `path` as a Path, or raise UserError when it is missing, a folder or empty."""
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{what} not found: {p}")
    if p.is_dir():
        raise UserError(f"{what} is a folder, expected a file: {p}")
    if p.stat().st_size == 0:
        raise UserError(f"{what} is empty: {p}")
    return p


def checksum(paths: Iterable[str | os.PathLike]) -> str:
    """SHA-256 over the bytes of the files, in order (names excluded, so copies match)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
        h.update(b"\0file-end\0")  # keeps ["ab", "c"] distinct from ["a", "bc"]
    return h.hexdigest()


def read_text_pieces(path: str | os.PathLike, what: str = "text file") -> Iterator[str]:
    """Yield the UTF-8 text of a file in blocks; UserError on a missing, empty or non-UTF-8 file.

    Line endings "\\r\\n" and "\\r" become "\\n", as in Python's text mode and Hugging Face
    datasets (the official WikiText files use "\\r\\n"; the published token counts assume "\\n").
    """
    p = require_file(path, what)
    decoder = io.IncrementalNewlineDecoder(codecs.getincrementaldecoder("utf-8")(), translate=True)
    offset = 0
    seen_text = False
    with open(p, "rb") as f:
        while True:
            block = f.read(_BLOCK)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                raise UserError(f"{p} is not UTF-8 text (invalid byte near offset {offset + e.start})") from None
            offset += len(block)
            if text:
                seen_text = seen_text or not text.isspace()
                yield text
            if not block:
                break
    if not seen_text:
        raise UserError(f"{what} holds only whitespace: {p}")
