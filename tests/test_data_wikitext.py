"""WikiText loaders: official layout, HF parquet, missing splits, proxies and bad files."""

import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chiarformer.data import ByteTokenizer, gpt2_tokenizer, load_task, wikitext_source, wikitext_tokens
from chiarformer.data.cache import Cache
from chiarformer.data.hub import reachable as real_reachable  # before the fixture stubs it
from chiarformer.errors import UserError

SHARED = Path(os.environ.get("CHIAR_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
WIKI = SHARED / "wikitext2_raw"
needs_shared = pytest.mark.skipif(
    not ((WIKI / "wiki.valid.raw").is_file() and (SHARED / "gpt2_tokenizer" / "encoder.json").is_file()),
    reason="shared WikiText-2 / GPT-2 files absent",
)

LINES = {
    "train": [" \n", " = Alpha = \n", " \n", " The alpha article 's text , with 1 @,@ 000 words . \n", " \n", " = = Part = = \n",
              " More text here . \n"] * 30,
    "valid": [" \n", " = Beta = \n", " \n", " Beta text for validation . \n"] * 10,
    "test": [" \n", " = Gamma = \n", " \n", " Gamma text for the test . \n"] * 10,
}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("chiarformer.data.hub.reachable", lambda host, **kw: False)  # never go online in tests


def write_official(folder: Path, splits=("train", "valid", "test"), crlf=False):
    folder.mkdir(parents=True, exist_ok=True)
    for split in splits:
        text = "".join(LINES[split])
        (folder / f"wiki.{split}.raw").write_bytes((text.replace("\n", "\r\n") if crlf else text).encode())


def hf_rows(lines):
    return [line if line.strip() else "" for line in lines]  # how HF stores WikiText lines


def write_parquet(folder: Path, split: str, lines, shards=1):
    folder.mkdir(parents=True, exist_ok=True)
    rows = hf_rows(lines)
    step = -(-len(rows) // shards)
    for i in range(shards):
        table = pa.table({"text": rows[i * step : (i + 1) * step]})
        pq.write_table(table, folder / f"{split}-{i:05d}-of-{shards:05d}.parquet")


def test_official_layout_and_parquet_give_the_same_tokens(tmp_path):
    tok = ByteTokenizer()
    write_official(tmp_path / "official" / "wikitext-103-raw", crlf=True)
    parquet_dir = tmp_path / "hf" / "wikitext-103-raw-v1"
    write_parquet(parquet_dir, "train", LINES["train"], shards=2)
    write_parquet(parquet_dir, "validation", LINES["valid"])
    write_parquet(parquet_dir, "test", LINES["test"])
    for split in ("train", "valid", "test"):
        official = wikitext_tokens("103", split, tok, data_dir=tmp_path / "official")
        parquet = wikitext_tokens("103", split, tok, data_dir=tmp_path / "hf")
        assert np.array_equal(official, parquet)
        assert bytes(official.astype(np.uint8)).decode() == "".join(LINES[split])  # CRLF read as LF
    assert "train-*.parquet" in wikitext_source("103", "train", data_dir=tmp_path / "hf").description


def test_task_from_official_folder(tmp_path):
    write_official(tmp_path / "wikitext-103-raw")
    task = load_task("wikitext103", data_dir=tmp_path, tokenizer="bytes", seq_len=32, eval_stride=16)
    assert task.kind == "lm" and task.protocol["proxy"] is False
    assert task.protocol["context"] == 32 and task.protocol["stride"] == 16
    assert len(task.train) == len("".join(LINES["train"]).encode())
    assert task.protocol["splits"]["test"].endswith("wiki.test.raw")


def test_missing_split_names_split_and_sources(tmp_path):
    write_official(tmp_path / "wikitext-2-raw", splits=("valid", "test"))
    with pytest.raises(UserError) as e:
        load_task("wikitext2", data_dir=tmp_path, tokenizer="bytes")
    msg = str(e.value)
    assert "\n" not in msg and "split 'train'" in msg
    assert str(tmp_path / "wikitext-2-raw" / "wiki.train.raw") in msg
    assert "train-*.parquet" in msg and "Hugging Face" in msg
    # An explicit folder is searched alone.
    with pytest.raises(UserError, match="WikiText folder not found"):
        wikitext_source("2", "train", path=tmp_path / "nope")


@needs_shared
def test_parquet_rebuilds_the_official_text_exactly(tmp_path):
    lines = (WIKI / "wiki.valid.raw").read_text(encoding="utf-8").splitlines(keepends=True)
    write_parquet(tmp_path / "wikitext-2-raw-v1", "validation", lines, shards=3)
    tok = gpt2_tokenizer(SHARED / "gpt2_tokenizer")
    tokens = wikitext_tokens("2", "valid", tok, data_dir=tmp_path, cache=Cache(tmp_path / "c"))
    assert len(tokens) == 249_887


@needs_shared
def test_wikitext2_proxy(tmp_path):
    task = load_task("wikitext2-proxy", data_dir=SHARED)
    full_valid = wikitext_tokens("2", "valid", task.tokenizer, data_dir=SHARED)
    assert task.protocol["proxy"] is True and "proxy" in task.name
    assert len(task.test) == 286_221
    # Validation is the tail of the training text; the test text is never used for selection.
    assert np.array_equal(np.concatenate([task.train, task.val]), full_valid)
    assert len(task.val) == round(0.1 * len(full_valid))
    assert task.protocol["splits"]["test"].endswith("wiki.test.raw")
    assert task.protocol["tokens"]["test"] == 286_221 and task.protocol["context"] == 256


def test_bad_files(tmp_path):
    folder = tmp_path / "wikitext-103-raw"
    write_official(folder)
    (folder / "wiki.train.raw").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        load_task("wikitext103", data_dir=tmp_path, tokenizer="bytes")
    (folder / "wiki.train.raw").write_bytes(b" = A = \n caf\xe9 au lait \n")
    with pytest.raises(UserError, match="not UTF-8.*offset 12"):
        load_task("wikitext103", data_dir=tmp_path, tokenizer="bytes")
    (folder / "wiki.train.raw").write_bytes(b" \n \n\n")
    with pytest.raises(UserError, match="whitespace"):
        load_task("wikitext103", data_dir=tmp_path, tokenizer="bytes")


def test_parquet_without_text_column(tmp_path):
    folder = tmp_path / "wikitext-103-raw-v1"
    folder.mkdir()
    pq.write_table(pa.table({"content": ["a"]}), folder / "test-00000-of-00001.parquet")
    with pytest.raises(UserError, match="no 'text' column"):
        wikitext_tokens("103", "test", ByteTokenizer(), data_dir=tmp_path)


def test_hub_source_fails_fast_and_clearly(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):  # the suite also runs with them set
        monkeypatch.delenv(var, raising=False)
    calls = []

    def load_dataset(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(UserError, match="huggingface.co unreachable"):
        wikitext_source("103", "train", data_dir=tmp_path)
    assert calls == []  # an unreachable hub is never asked
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline mode asks the local datasets cache only
    with pytest.raises(UserError, match="Couldn't reach") as e:
        wikitext_source("103", "train", data_dir=tmp_path)
    assert calls and "\n" not in str(e.value)


def test_reachability_probe_is_bounded(monkeypatch):
    # A lookup or connect that hangs (socket timeouts do not cover DNS) costs the timeout only.
    def hang(*args, **kwargs):
        time.sleep(5)
        raise OSError("stub: no answer")

    monkeypatch.setattr("socket.create_connection", hang)
    start = time.monotonic()
    assert real_reachable("huggingface.co", timeout=0.3) is False
    assert time.monotonic() - start < 2
    assert real_reachable("name.invalid", timeout=0.3) is False
