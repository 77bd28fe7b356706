"""IMDB: aclImdb folders, JSON lines (.xz), HF parquet, stratified validation, padding masks."""

import json
import lzma
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from chiarformer.data import ClassificationData, load_imdb, load_task, stratified_split
from chiarformer.errors import UserError

SHARED = Path(os.environ.get("CHIAR_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
HAS_GPT2 = (SHARED / "gpt2_tokenizer" / "encoder.json").is_file()


def reviews(split, n=20):
    # Deterministic reviews of varied length; label = i % 2 (1 = positive).
    return [(f"{'Great' if i % 2 else 'Awful'} film number {i} of {split}. " + "Plot <br /><br />and more. " * (i % 7), i % 2)
            for i in range(n)]


def write_acl(root: Path):
    for split in ("train", "test"):
        for i, (text, label) in enumerate(reviews(split)):
            folder = root / "aclImdb" / split / ("pos" if label else "neg")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}_{8 if label else 2}.txt").write_text(text, encoding="utf-8")


def write_jsonl_xz(root: Path):
    (root / "imdb").mkdir(parents=True)
    for split in ("train", "test"):
        rows = [{"id": f"x/{i}", "label": label, "text": text} for i, (text, label) in enumerate(reviews(split))]
        with lzma.open(root / "imdb" / f"imdb_{split}.jsonl.xz", "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def write_parquet(root: Path):
    (root / "plain_text").mkdir(parents=True)
    for split in ("train", "test"):
        rows = reviews(split)
        table = pa.table({"text": [t for t, _ in rows], "label": [label for _, label in rows]})
        pq.write_table(table, root / "plain_text" / f"{split}-00000-of-00001.parquet")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIAR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("chiarformer.data.hub.reachable", lambda host, **kw: False)


@pytest.mark.parametrize("writer", [write_acl, write_jsonl_xz, write_parquet])
def test_every_layout_reads_the_same_reviews(tmp_path, writer):
    writer(tmp_path / "d")
    texts, labels, where = load_imdb("train", data_dir=tmp_path / "d")
    expected = reviews("train")
    if writer is write_acl:  # folders are read by label, then numeric id
        expected = [r for lab in (0, 1) for r in expected if r[1] == lab]
    assert texts == [t for t, _ in expected] and labels.tolist() == [label for _, label in expected]
    assert Path(where).exists() or "parquet" in where


@pytest.mark.skipif(not (SHARED / "imdb" / "imdb_test.jsonl.xz").is_file(), reason="shared IMDB absent")
def test_shared_imdb():
    texts, labels, where = load_imdb("test", data_dir=SHARED)
    assert len(texts) == 25_000 and labels.sum() == 12_500 and where.endswith("imdb_test.jsonl.xz")
    assert "<br />" in "".join(texts[:100])


def test_stratified_split_is_seeded_and_balanced():
    labels = np.array([0] * 700 + [1] * 300)
    kept, held = stratified_split(labels, 0.1, seed=3)
    assert len(held) == 100 and (labels[held] == 1).sum() == 30
    assert not set(kept) & set(held) and len(kept) + len(held) == 1000
    again = stratified_split(labels, 0.1, seed=3)[1]
    other = stratified_split(labels, 0.1, seed=4)[1]
    assert np.array_equal(held, again) and not np.array_equal(held, other)
    with pytest.raises(UserError):
        stratified_split(labels, 1.5, seed=0)


def test_padding_masks_and_truncation():
    data = ClassificationData.from_sequences([[5, 6, 7, 8], [9], [1, 2]], [1, 0, 1], pad_id=0)
    b = data.batch([0, 1, 2])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [9, 0, 0, 0], [1, 2, 0, 0]]
    assert b["attention_mask"].sum(1).tolist() == [4, 1, 2] and b["labels"].tolist() == [1, 0, 1]
    cut = data.select([2, 0], max_len=3)
    assert cut.batch([0, 1], pad_to=5)["input_ids"].tolist() == [[1, 2, 0, 0, 0], [5, 6, 7, 0, 0]]
    with pytest.raises(UserError, match="empty"):
        ClassificationData.from_sequences([[1], []], [0, 1], pad_id=0)


def test_lra_text_task_bytes(tmp_path):
    write_jsonl_xz(tmp_path)
    task = load_task("lra-text", data_dir=tmp_path, seq_len=64, val_fraction=0.2, data_seed=1)
    assert task.kind == "cls" and task.n_classes == 2 and task.vocab_size == 257
    assert len(task.train) == 16 and len(task.val) == 4 and len(task.test) == 20
    assert task.train.lengths().max() == 64 and sorted(task.val.labels.tolist()) == [0, 0, 1, 1]
    first = task.test.example(0)
    assert bytes(first.astype(np.uint8)).decode() == reviews("test")[0][0][:64]
    assert task.protocol["seq_len"] == 64 and "test evaluated once" in task.protocol["selection"]


@pytest.mark.skipif(not HAS_GPT2, reason="GPT-2 tokenizer files absent")
def test_imdb_task_gpt2_truncated(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIAR_GPT2_DIR", str(SHARED / "gpt2_tokenizer"))
    write_acl(tmp_path)
    task = load_task("imdb", data_dir=tmp_path, seq_len=16)
    assert task.seq_len == 16 and task.protocol["tokenizer"] == "gpt2" and task.pad_id == 50256
    b = task.test.batch(np.arange(4))
    assert b["input_ids"].shape[1] <= 16 and b["attention_mask"].dtype == torch.bool
    assert task.tokenizer.decode(task.test.example(0)) == task.tokenizer.decode(task.tokenizer.encode(reviews("test")[0][0])[:16])


def test_imdb_lm_proxy(tmp_path):
    write_parquet(tmp_path)
    task = load_task("imdb-lm-proxy", data_dir=tmp_path, tokenizer="bytes", seq_len=32, val_fraction=0.2)
    eot = task.tokenizer.eot_id
    assert task.protocol["proxy"] is True and (task.train == eot).sum() == 16 and (task.val == eot).sum() == 4
    assert (task.test == eot).sum() == 20
    test_text = bytes(task.test[task.test != eot].astype(np.uint8)).decode()
    assert test_text == "".join(t for t, _ in reviews("test"))


def test_bad_imdb_inputs(tmp_path):
    with pytest.raises(UserError, match="IMDB split 'train' not found.*Hugging Face"):
        load_imdb("train", data_dir=tmp_path)
    with pytest.raises(UserError, match="IMDB folder not found"):
        load_imdb("train", path=tmp_path / "missing")
    (tmp_path / "imdb_train.jsonl").write_text('{"text": "ok", "label": 1}\n{"label": 0}\n')
    with pytest.raises(UserError, match="line 2"):
        load_imdb("train", data_dir=tmp_path)
    (tmp_path / "imdb_train.jsonl").write_text('{"text": "ok", "label": 3}\n')
    with pytest.raises(UserError, match="labels other than 0 and 1"):
        load_imdb("train", data_dir=tmp_path)
    (tmp_path / "imdb_train.jsonl").unlink()
    folder = tmp_path / "aclImdb" / "train" / "pos"
    folder.mkdir(parents=True)
    (folder / "0_9.txt").write_bytes(b"bad \xff byte")
    with pytest.raises(UserError, match="not UTF-8"):
        load_imdb("train", data_dir=tmp_path)
