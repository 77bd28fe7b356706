"""Disk cache for derived data (token arrays, generated ListOps files), verified on every load.

    cache = Cache()                                   # root: CHIAR_CACHE_DIR or ~/.cache/chiarformer
    arrays = cache.arrays("wikitext2-raw-valid", key, build)   # build() -> {"tokens": uint16 array}
    arrays["tokens"]                                  # a read-only numpy memmap

An entry is the folder <root>/<name>/<sha256(key)[:16]>/ holding the files plus meta.json
with the full key and each file's size and SHA-256. The key is a JSON-able dict naming
everything the content depends on (source checksum, tokenizer fingerprint, options). An entry
is rebuilt, with a warning, when its meta.json is missing or unreadable, was written for
another key, or a file is missing, truncated or corrupt (size or SHA-256 mismatch); data that
fails a check is never returned. Entries are built in a temporary folder and renamed into
place, so an interrupted build leaves nothing that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .files import cache_dir, checksum

_META = "meta.json"
FORMAT = 1  # bump when the entry layout changes


class Cache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = cache_dir(root)

    def folder(self, name: str, key: dict, build: Callable[[Path], None]) -> Path:
        """A verified folder for (name, key); build(tmp_folder) writes its files when needed."""
        key_json = json.dumps({"format": FORMAT, **key}, sort_keys=True)
        key = json.loads(key_json)  # as meta.json will hold it (tuples become lists)
        target = self.root / name / hashlib.sha256(key_json.encode()).hexdigest()[:16]
        if target.exists():
            problem = _problem(target, key)
            if problem is None:
                return target
            warnings.warn(f"rebuilding cache {target}: {problem}", stacklevel=2)
        tmp = target.parent / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            files = {p.name: {"bytes": p.stat().st_size, "sha256": checksum([p])} for p in sorted(tmp.iterdir())}
            (tmp / _META).write_text(json.dumps({"key": key, "files": files}, indent=1, sort_keys=True))
            if target.exists():
                shutil.rmtree(target)
            try:
                os.rename(tmp, target)
            except OSError:
                # Another process finished the same entry first; use it if it is sound.
                if _problem(target, key) is not None:
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def arrays(self, name: str, key: dict, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Named numpy arrays for (name, key), built by build() when needed, loaded as memmaps."""

        def write(folder: Path) -> None:
            for array_name, array in build().items():
                np.save(folder / f"{array_name}.npy", np.ascontiguousarray(array))

        folder = self.folder(name, key, write)
        return {p.stem: np.load(p, mmap_mode="r") for p in sorted(folder.glob("*.npy"))}


def _problem(folder: Path, key: dict) -> str | None:
    """Why the entry in `folder` cannot be used for `key`, or None when it is sound."""
    try:
        meta = json.loads((folder / _META).read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "missing or unreadable meta.json"
    if meta.get("key") != key:
        return "it was written for another key (another source, tokenizer or option)"
    for name, info in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != info["bytes"]:
            return f"{name} is truncated or extended ({path.stat().st_size} bytes, expected {info['bytes']})"
        if checksum([path]) != info["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    return None
