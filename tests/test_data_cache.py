"""The verified disk cache: reuse, and rebuilds on key change, corruption or truncation."""

import json

import numpy as np
import pytest

from chiarformer.data import Cache


class Builder:
    def __init__(self, value=7):
        self.calls = 0
        self.value = value

    def __call__(self):
        self.calls += 1
        return {"tokens": np.full(1000, self.value, np.uint16), "offsets": np.arange(3, dtype=np.int64)}


KEY = {"source": "abc", "tokenizer": "gpt2-1234"}


def test_reuse(tmp_path):
    build = Builder()
    first = Cache(tmp_path).arrays("demo", KEY, build)
    second = Cache(tmp_path).arrays("demo", KEY, build)
    assert build.calls == 1
    assert isinstance(second["tokens"], np.memmap) and second["tokens"].dtype == np.uint16
    assert np.array_equal(first["tokens"], second["tokens"]) and second["offsets"].tolist() == [0, 1, 2]


def test_key_change_builds_a_new_entry(tmp_path):
    cache = Cache(tmp_path)
    cache.arrays("demo", KEY, Builder(1))
    other = cache.arrays("demo", {**KEY, "tokenizer": "bytes-v1"}, Builder(2))
    assert other["tokens"][0] == 2
    assert cache.arrays("demo", KEY, Builder(3))["tokens"][0] == 1  # the first entry is intact


def _entry(tmp_path):
    (entry,) = [p for p in (tmp_path / "demo").iterdir() if not p.name.startswith(".")]
    return entry


@pytest.mark.parametrize("damage", ["truncate", "corrupt", "meta", "other-tokenizer", "missing-file"])
def test_damaged_entry_is_rebuilt_never_used(tmp_path, damage):
    Cache(tmp_path).arrays("demo", KEY, Builder(5))
    entry = _entry(tmp_path)
    tokens = entry / "tokens.npy"
    if damage == "truncate":
        tokens.write_bytes(tokens.read_bytes()[:-100])
    elif damage == "corrupt":
        data = bytearray(tokens.read_bytes())
        data[-1] ^= 0xFF
        tokens.write_bytes(bytes(data))
    elif damage == "meta":
        (entry / "meta.json").write_text("{not json")
    elif damage == "other-tokenizer":
        # An entry written for another tokenizer sitting where this key's entry belongs.
        meta = json.loads((entry / "meta.json").read_text())
        meta["key"]["tokenizer"] = "bytes-v1"
        (entry / "meta.json").write_text(json.dumps(meta))
    else:
        tokens.unlink()
    build = Builder(9)
    with pytest.warns(UserWarning, match="rebuilding cache"):
        arrays = Cache(tmp_path).arrays("demo", KEY, build)
    assert build.calls == 1 and arrays["tokens"][0] == 9 and len(arrays["tokens"]) == 1000


def test_failed_build_leaves_no_entry(tmp_path):
    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        Cache(tmp_path).arrays("demo", KEY, broken)
    assert list((tmp_path / "demo").iterdir()) == []
    assert Cache(tmp_path).arrays("demo", KEY, Builder(4))["tokens"][0] == 4


def test_default_location_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIAR_CACHE_DIR", str(tmp_path / "c"))
    assert Cache().root == tmp_path / "c"
