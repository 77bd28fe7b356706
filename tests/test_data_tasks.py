"""The task registry and the `text` task over users' own files."""

import numpy as np
import pytest

from chiarformer.data import TASKS, ListOpsTokenizer, TaskSpec, load_task, register_task, task_options, task_tokenizer
from chiarformer.data.tasks import KINDS
from chiarformer.errors import UserError
from chiarformer.train.run_config import DataConfig

TEXT = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(200))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIAR_CACHE_DIR", str(tmp_path / "cache"))


def test_registry_lists_every_task_and_its_options():
    assert set(TASKS) == {"wikitext2", "wikitext103", "wikitext2-proxy", "imdb-lm-proxy", "text", "imdb", "lra-text", "listops",
                          "listops-flat"}
    for name in TASKS:
        assert isinstance(task_options(name), dict)
    assert task_options("listops")["listops_max_depth"] == 10 and task_options("imdb")["val_fraction"] == 0.1
    with pytest.raises(UserError, match="unknown task 'wikitext3'.*wikitext103"):
        load_task("wikitext3")
    with pytest.raises(UserError, match="no option.*colour.*it takes"):
        load_task("listops-flat", colour="red")


def test_every_option_is_a_data_field_and_every_kind_is_one_word():
    """The engine passes a run's data fields to the loader by name: no option may go unreached."""
    fields = set(DataConfig.__dataclass_fields__)
    for name, spec in TASKS.items():
        assert spec.name == name and spec.kind in KINDS and spec.description and spec.source
        assert set(task_options(name)) <= fields, (name, set(task_options(name)) - fields)
    assert {s.kind for s in TASKS.values()} == {"lm", "cls"}
    with pytest.raises(ValueError, match="kind must be one of"):
        register_task(TaskSpec("bad", "classification", "-", "-", TASKS["text"].loader, TASKS["text"].tokenizer))
    assert "bad" not in TASKS


def test_each_task_names_its_tokenizer_without_loading_data():
    assert isinstance(task_tokenizer("listops-flat"), ListOpsTokenizer)
    assert task_tokenizer("listops", listops_tokens="brackets").style == "brackets"
    assert task_tokenizer("lra-text").name == "bytes"  # the task's own default, no data read
    assert task_tokenizer("text", tokenizer="bytes").name == "bytes"
    with pytest.raises(UserError, match="no option"):
        task_tokenizer("imdb", listops_tokens="lra")


def test_text_task_one_file_is_split_train_val_test(tmp_path):
    (tmp_path / "corpus.txt").write_text(TEXT)
    task = load_task("text", train_files=tmp_path / "corpus.txt", tokenizer="bytes", seq_len=64, eval_stride=32)
    total = len(TEXT.encode())
    assert len(task.train) + len(task.val) + len(task.test) == total
    assert len(task.test) == round(0.1 * total)
    assert bytes(np.concatenate([task.train, task.val, task.test]).astype(np.uint8)).decode() == TEXT
    assert task.protocol["stride"] == 32 and "last 10%" in task.protocol["splits"]["test"]


def test_text_task_separate_files(tmp_path):
    for name in ("a.txt", "b.txt", "val.txt", "test.txt"):
        (tmp_path / name).write_text(TEXT[:3000])
    task = load_task("text", train_files=[tmp_path / "a.txt", tmp_path / "b.txt"], val_files=tmp_path / "val.txt",
                     test_files=str(tmp_path / "test.txt"), tokenizer="bytes", seq_len=64)
    assert len(task.train) == 6001 and task.train[3000] == task.tokenizer.eot_id  # files joined by end-of-text
    assert len(task.val) == 3000 and len(task.test) == 3000


def test_text_task_bad_inputs(tmp_path):
    with pytest.raises(UserError, match="needs train_files="):
        load_task("text")
    with pytest.raises(UserError, match="not found"):
        load_task("text", train_files=tmp_path / "missing.txt", tokenizer="bytes")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        load_task("text", train_files=tmp_path / "empty.txt", tokenizer="bytes")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1") * 100)
    with pytest.raises(UserError, match="not UTF-8"):
        load_task("text", train_files=tmp_path / "latin1.txt", tokenizer="bytes")
    with pytest.raises(UserError, match="Hugging Face hub path"):
        load_task("text", train_files="hf://datasets/someone/corpus", tokenizer="bytes")
    (tmp_path / "tiny.txt").write_text("hi there\n")
    with pytest.raises(UserError, match="too few"):
        load_task("text", train_files=tmp_path / "tiny.txt", tokenizer="bytes", seq_len=64)
    (tmp_path / "ok.txt").write_text(TEXT)
    with pytest.raises(UserError, match="stride"):
        load_task("text", train_files=tmp_path / "ok.txt", tokenizer="bytes", seq_len=64, eval_stride=128)
    with pytest.raises(UserError, match="unknown tokenizer"):
        load_task("text", train_files=tmp_path / "ok.txt", tokenizer="words")
