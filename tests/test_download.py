"""`chiar download` against a local HTTP server on 127.0.0.1 (no network) that answers what huggingface_hub
asks: files land where the loaders look, sizes and checksums are checked (a corrupt file is rejected and
deleted), a broken or interrupted download resumes with an HTTP Range request, and "not found" errors name
the command that fixes them."""

from __future__ import annotations

import hashlib
import http.server
import json
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chiarformer.cli import main
from chiarformer.data import download as D
from chiarformer.data import load_imdb, wikitext_source
from chiarformer.data.imdb import imdb_source
from chiarformer.data.tokenizer import gpt2_tokenizer
from chiarformer.errors import UserError

SHARED_GPT2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2_tokenizer"


class FakeHub:
    """Serves path -> bytes (GET with Range, HEAD), the hub's tree API and the headers hf_hub_download reads
    (X-Repo-Commit, X-Linked-Etag, X-Linked-Size; no X-Xet-Hash, so it downloads over plain HTTP).
    Records (method, path, Range) of each request; `cut` maps a path to the byte count after which its
    first GET breaks off, as a dropped connection would."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.heads: dict[str, dict[str, str]] = {}  # path -> hub headers of its HEAD answer
        self.cut: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self, head: bool):
                path = self.path.split("?", 1)[0]
                hub.requests.append((self.command, path, self.headers.get("Range")))
                body = hub.files.get(path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                for key, value in hub.heads.get(path, {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if not head:
                    self.wfile.write(body[start:start + hub.cut.pop(path, len(body))])

            def do_GET(self):  # noqa: N802 - http.server API
                self.answer(head=False)

            def do_HEAD(self):  # noqa: N802 - http.server API
                self.answer(head=True)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_dataset(self, spec: D.HubFiles, shards: dict[str, bytes], published: dict[str, bytes] | None = None):
        """Serve parquet shards (file name -> bytes); `published` overrides the bytes the hub describes."""
        revision = D.REVISIONS[spec.repo]
        entries = [{"type": "directory", "path": f"{spec.folder}/train", "oid": "2" * 40, "size": 0}]
        for name, body in shards.items():
            described = (published or {}).get(name, body)
            sha = hashlib.sha256(described).hexdigest()
            path = f"{spec.folder}/{name}"
            entries.append({"type": "file", "path": path, "size": len(described), "oid": "0" * 40,
                            "lfs": {"oid": sha, "size": len(described), "pointerSize": 134}})
            url = f"/datasets/{spec.repo}/resolve/{revision}/{path}"
            self.files[url] = body
            self.heads[url] = {"X-Repo-Commit": revision, "ETag": '"0000"', "X-Linked-Etag": f'"{sha}"',
                               "X-Linked-Size": str(len(described))}
        entries.append({"type": "file", "path": f"{spec.folder}/README.md", "size": 3, "oid": "1" * 40})
        self.files[f"/api/datasets/{spec.repo}/tree/{revision}/{spec.folder}"] = json.dumps(entries).encode()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def hub_constants(tmp_path, monkeypatch):
    """huggingface_hub online, with no cache, token or endpoint but the test's (the suite runs with HF_HUB_OFFLINE=1,
    and the library reads its variables once, at import)."""
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    return constants


@pytest.fixture()
def hub():
    server = FakeHub()
    yield server
    server.close()


def parquet_bytes(tmp_path: Path, columns: dict) -> bytes:
    path = tmp_path / "shard.parquet"
    pq.write_table(pa.table(columns), path)
    return path.read_bytes()


def wikitext2_shards(tmp_path: Path) -> dict[str, bytes]:
    rows = D.hub_files("wikitext2").rows
    shards = {}
    for split, n in rows.items():
        # the HF layout: one row per line, blank lines stored as ""
        text = [" = Title = \n" if i == 1 else "" if i % 3 == 0 else f" {split} line {i} of the article .\n"
                for i in range(n)]
        shards[f"{split}-00000-of-00001.parquet"] = parquet_bytes(tmp_path, {"text": text})
    return shards


def test_wikitext2_lands_where_the_loader_looks_and_is_not_fetched_twice(tmp_path, hub_constants, hub, capsys):
    shards = wikitext2_shards(tmp_path)
    hub.add_dataset(D.hub_files("wikitext2"), shards)
    data = tmp_path / "data"
    assert main(["download", "wikitext2", "--to", str(data), "--endpoint", hub.url, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"checked files in {data / 'wikitext-2-raw-v1'}" in out
    assert "set CHIAR_DATA_DIR=" in out  # --to is not the folder chiar reads
    for name, body in shards.items():
        assert (data / "wikitext-2-raw-v1" / name).read_bytes() == body
    assert [m for m, p, _ in hub.requests if p.endswith("train-00000-of-00001.parquet")] == ["GET"]
    for split in ("train", "valid", "test"):
        source = wikitext_source("2", split, data_dir=data)
        assert "wikitext-2-raw-v1" in source.description
        assert f" {'validation' if split == 'valid' else split} line 2 of the article" in "".join(source.pieces())
    fetched = len(hub.requests)
    assert main(["download", "wikitext2", "--to", str(data), "--endpoint", hub.url, "--quiet"]) == 0
    assert len(hub.requests) == fetched + 1  # only the file list: every file was present (and checked again)


def test_corrupt_file_is_rejected_and_deleted(tmp_path, hub_constants, hub):
    shards = wikitext2_shards(tmp_path)
    good = shards["test-00000-of-00001.parquet"]
    bad = good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]  # same size, one byte flipped
    hub.add_dataset(D.hub_files("wikitext2"), {**shards, "test-00000-of-00001.parquet": bad},
                    published={"test-00000-of-00001.parquet": good})
    with pytest.raises(UserError, match="test-00000-of-00001.parquet .* failed its check"):
        D.download("wikitext2", to=tmp_path / "data", endpoint=hub.url, quiet=True)
    folder = tmp_path / "data" / "wikitext-2-raw-v1"
    assert not (folder / "test-00000-of-00001.parquet").exists()
    assert not [p for p in (tmp_path / "data").rglob("*") if p.is_file() and p.stat().st_size == len(bad)
                and p.read_bytes() == bad]  # no copy kept anywhere (huggingface_hub's bookkeeping included)
    assert (folder / "train-00000-of-00001.parquet").is_file()  # the good files before it stay


def test_wrong_row_count_is_rejected(tmp_path, hub_constants, hub):
    shards = wikitext2_shards(tmp_path)
    shards["validation-00000-of-00001.parquet"] = parquet_bytes(tmp_path, {"text": ["a\n"] * 10})
    hub.add_dataset(D.hub_files("wikitext2"), shards)  # published checksums match: only the rows are off
    with pytest.raises(UserError, match="validation: 10 rows, its dataset card says 3,760"):
        D.download("wikitext2", to=tmp_path / "data", endpoint=hub.url, quiet=True)
    assert not (tmp_path / "data" / "wikitext-2-raw-v1" / "validation-00000-of-00001.parquet").exists()


def test_broken_transfer_resumes_in_the_next_run_with_a_range_request(tmp_path, hub_constants, hub):
    shards = wikitext2_shards(tmp_path)
    hub.add_dataset(D.hub_files("wikitext2"), shards)
    body = shards["train-00000-of-00001.parquet"]
    half = len(body) // 2
    revision = D.REVISIONS["Salesforce/wikitext"]
    path = f"/datasets/Salesforce/wikitext/resolve/{revision}/wikitext-2-raw-v1/train-00000-of-00001.parquet"
    hub.cut[path] = half  # the first GET stops after `half` bytes and the connection closes
    folder = tmp_path / "data" / "wikitext-2-raw-v1"
    with pytest.raises(UserError, match="broke off .* run the same command again to resume"):
        D.download("wikitext2", to=tmp_path / "data", endpoint=hub.url, quiet=True)
    assert (folder / "train-00000-of-00001.parquet.part").stat().st_size == half
    D.download("wikitext2", to=tmp_path / "data", endpoint=hub.url, quiet=True)  # a new run, as after a kill
    assert (folder / "train-00000-of-00001.parquet").read_bytes() == body
    assert not (folder / "train-00000-of-00001.parquet.part").exists()
    assert [(m, r) for m, p, r in hub.requests if p == path] == [("GET", None), ("GET", f"bytes={half}-")]


def test_imdb_lands_where_the_loader_looks(tmp_path, hub_constants, hub):
    spec = D.hub_files("imdb")
    shards = {f"{split}-00000-of-00001.parquet":
              parquet_bytes(tmp_path, {"text": [f"{split} review {i}" for i in range(n)], "label": [i % 2 for i in range(n)]})
              for split, n in spec.rows.items()}
    hub.add_dataset(spec, shards)
    assert D.download("imdb", to=tmp_path / "data", endpoint=hub.url, quiet=True) == tmp_path / "data" / "imdb" / "plain_text"
    source = imdb_source("test", data_dir=tmp_path / "data")
    texts, labels = source.read()
    assert texts[3] == "test review 3" and len(labels) == 25000 and labels.sum() == 12500


def test_hub_download_without_huggingface_hub_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if the hf extra were not installed
    assert main(["download", "wikitext2", "--to", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'pip install -e ".[hf]"' in err[0]


def test_hub_download_in_offline_mode_says_so(tmp_path, hub_constants, monkeypatch):
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set"):
        D.download("wikitext2", to=tmp_path)


def imdb_archive(per_class: dict) -> bytes:
    """A tar.gz in the aclImdb layout, n reviews per split/class, plus members the loader must not get."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name, data=b"", kind=tarfile.REGTYPE):
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        for (split, label), n in per_class.items():
            for i in range(n):
                add(f"aclImdb/{split}/{label}/{i}_{8 if label == 'pos' else 2}.txt", f"{split} {label} {i}".encode())
        add("aclImdb/train/unsup/0_0.txt", b"unlabelled")
        add("aclImdb/README", b"readme")
        add("aclImdb/train/pos/../../../escape.txt", b"outside")
        add("aclImdb/test/neg/link.txt", kind=tarfile.SYMTYPE)
    return buf.getvalue()


def test_imdb_archive_is_checked_resumed_and_extracted(tmp_path, hub, monkeypatch):
    monkeypatch.setattr(D, "IMDB_REVIEWS", 3)
    classes = [(s, lab) for s in ("train", "test") for lab in ("pos", "neg")]
    body = imdb_archive({c: 3 for c in classes})
    hub.files["/aclImdb_v1.tar.gz"] = body
    folder = tmp_path / "data" / "imdb"
    folder.mkdir(parents=True)
    half = len(body) // 2
    (folder / "aclImdb_v1.tar.gz.part").write_bytes(body[:half])
    D.download("imdb", to=tmp_path / "data", source="archive", endpoint=hub.url + "/aclImdb_v1.tar.gz", quiet=True)
    assert [r for m, p, r in hub.requests if m == "GET" and p == "/aclImdb_v1.tar.gz"] == [f"bytes={half}-"]
    texts, labels, where = load_imdb("test", data_dir=tmp_path / "data")
    assert where.endswith("aclImdb/test") and texts[0] == "test neg 0" and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert not (folder / "aclImdb" / "train" / "unsup").exists() and not list(tmp_path.rglob("escape.txt"))
    # an archive with a review missing is not extracted
    hub.files["/short.tar.gz"] = imdb_archive({**{c: 3 for c in classes}, ("test", "pos"): 2})
    with pytest.raises(UserError, match="'test/pos': 2"):
        D.download("imdb", to=tmp_path / "other", source="archive", endpoint=hub.url + "/short.tar.gz", quiet=True)
    assert not (tmp_path / "other" / "imdb" / "aclImdb").exists()


def test_gpt2_tokenizer_checks_the_pinned_hashes(tmp_path, hub):
    hub.files["/gpt2/encoder.json"] = b"{}" * 10
    hub.files["/gpt2/vocab.bpe"] = b"#version: 0.2\n"
    with pytest.raises(UserError, match="encoder.json .* failed its check"):
        D.download("gpt2-tokenizer", to=tmp_path / "bad", endpoint=hub.url + "/gpt2", quiet=True)
    assert not (tmp_path / "bad" / "gpt2_tokenizer" / "encoder.json").exists()
    if not SHARED_GPT2.is_dir():
        pytest.skip("the real GPT-2 files are not on this machine")
    for name in D.GPT2_FILES:
        hub.files[f"/gpt2/{name}"] = (SHARED_GPT2 / name).read_bytes()
    folder = D.download("gpt2-tokenizer", to=tmp_path / "good", endpoint=hub.url + "/gpt2", quiet=True)
    assert gpt2_tokenizer(folder).encode("Hello world") == [15496, 995]


def test_unreachable_host_is_one_clear_line(tmp_path, capsys, hub_constants, monkeypatch):
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub retries a refused connection 5 times
    server = FakeHub()
    url = server.url
    server.close()  # nothing listens there any more
    code = main(["download", "wikitext2", "--to", str(tmp_path), "--endpoint", url])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "127.0.0.1" in err[0]


def test_unreachable_host_is_one_clear_line_over_plain_http(tmp_path, capsys):
    server = FakeHub()
    url = server.url
    server.close()
    code = main(["download", "gpt2-tokenizer", "--to", str(tmp_path), "--endpoint", url, "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "127.0.0.1" in err[0]


@pytest.mark.parametrize("load, command", [
    (lambda d: wikitext_source("2", "train", data_dir=d), "`chiar download wikitext2`"),
    (lambda d: wikitext_source("103", "test", "tokens", data_dir=d), "`chiar download wikitext103 --variant tokens`"),
    (lambda d: imdb_source("train", data_dir=d), "`chiar download imdb`"),
])
def test_not_found_errors_name_the_fix(tmp_path, monkeypatch, load, command):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the hf extra were not installed
    with pytest.raises(UserError) as e:
        load(tmp_path)
    assert command in str(e.value) and 'pip install -e ".[hf]"' in str(e.value)


def test_missing_tokenizer_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIAR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("CHIAR_GPT2_DIR", raising=False)
    monkeypatch.setattr("chiarformer.data.tokenizer.reachable", lambda *a, **k: False)
    with pytest.raises(UserError, match="`chiar download gpt2-tokenizer`"):
        gpt2_tokenizer()
