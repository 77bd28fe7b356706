"""`chiar download` against a local HTTP server on 127.0.0.1 (no network): files land where the loaders
look, sizes and checksums are checked (a corrupt file is rejected and deleted), an interrupted download
resumes with an HTTP Range request, and "not found" errors name the command that fixes them."""

from __future__ import annotations

import hashlib
import http.server
import threading
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
    """Serves path -> bytes (with Range) and the hub's tree API from `tree`; records each request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                hub.requests.append((self.path, self.headers.get("Range")))
                body = hub.files.get(self.path)
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
                self.end_headers()
                self.wfile.write(body[start:])

            def do_HEAD(self):  # noqa: N802 - http.server API
                body = hub.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add_dataset(self, spec: D.HubFiles, shards: dict[str, bytes], published: dict[str, bytes] | None = None):
        """Serve parquet shards (file name -> bytes); `published` overrides the bytes the tree API describes."""
        revision = D.REVISIONS[spec.repo]
        entries = []
        for name, body in shards.items():
            described = (published or {}).get(name, body)
            path = f"{spec.folder}/{name}"
            entries.append({"type": "file", "path": path, "size": len(described), "oid": "0" * 40,
                            "lfs": {"oid": hashlib.sha256(described).hexdigest(), "size": len(described)}})
            self.files[f"/datasets/{spec.repo}/resolve/{revision}/{path}"] = body
        entries.append({"type": "file", "path": f"{spec.folder}/README.md", "size": 3, "oid": "1" * 40})
        import json

        self.files[f"/api/datasets/{spec.repo}/tree/{revision}/{spec.folder}"] = json.dumps(entries).encode()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def hub(monkeypatch):
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
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


def test_wikitext2_lands_where_the_loader_looks_and_is_not_fetched_twice(tmp_path, hub, capsys):
    shards = wikitext2_shards(tmp_path)
    hub.add_dataset(D.hub_files("wikitext2"), shards)
    data = tmp_path / "data"
    assert main(["download", "wikitext2", "--to", str(data), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"checked files in {data / 'wikitext-2-raw-v1'}" in out
    assert "set CHIAR_DATA_DIR=" in out  # --to is not the folder chiar reads
    for name, body in shards.items():
        assert (data / "wikitext-2-raw-v1" / name).read_bytes() == body
    assert not list(data.rglob("*.part"))
    for split in ("train", "valid", "test"):
        source = wikitext_source("2", split, data_dir=data)
        assert "wikitext-2-raw-v1" in source.description
        assert f" {'validation' if split == 'valid' else split} line 2 of the article" in "".join(source.pieces())
    fetched = len(hub.requests)
    assert main(["download", "wikitext2", "--to", str(data), "--quiet"]) == 0
    assert len(hub.requests) == fetched + 1  # only the file list: every file was present and checked


def test_corrupt_file_is_rejected_and_deleted(tmp_path, hub):
    shards = wikitext2_shards(tmp_path)
    good = shards["test-00000-of-00001.parquet"]
    bad = good[:100] + bytes([good[100] ^ 0xFF]) + good[101:]  # same size, one byte flipped
    hub.add_dataset(D.hub_files("wikitext2"), {**shards, "test-00000-of-00001.parquet": bad},
                    published={"test-00000-of-00001.parquet": good})
    with pytest.raises(UserError, match="test-00000-of-00001.parquet .* failed its check"):
        D.download("wikitext2", to=tmp_path / "data", quiet=True)
    folder = tmp_path / "data" / "wikitext-2-raw-v1"
    assert not (folder / "test-00000-of-00001.parquet").exists()
    assert not (folder / "test-00000-of-00001.parquet.part").exists()


def test_wrong_row_count_is_rejected(tmp_path, hub):
    shards = wikitext2_shards(tmp_path)
    shards["validation-00000-of-00001.parquet"] = parquet_bytes(tmp_path, {"text": ["a\n"] * 10})
    hub.add_dataset(D.hub_files("wikitext2"), shards)  # published checksums match: only the rows are off
    with pytest.raises(UserError, match="validation: 10 rows, its dataset card says 3,760"):
        D.download("wikitext2", to=tmp_path / "data", quiet=True)
    assert not (tmp_path / "data" / "wikitext-2-raw-v1" / "validation-00000-of-00001.parquet").exists()


def test_partial_download_resumes_with_a_range_request(tmp_path, hub):
    shards = wikitext2_shards(tmp_path)
    hub.add_dataset(D.hub_files("wikitext2"), shards)
    folder = tmp_path / "data" / "wikitext-2-raw-v1"
    folder.mkdir(parents=True)
    body = shards["train-00000-of-00001.parquet"]
    half = len(body) // 2
    (folder / "train-00000-of-00001.parquet.part").write_bytes(body[:half])  # an interrupted earlier run
    D.download("wikitext2", to=tmp_path / "data", quiet=True)
    assert (folder / "train-00000-of-00001.parquet").read_bytes() == body
    ranges = [r for path, r in hub.requests if path.endswith("train-00000-of-00001.parquet")]
    assert ranges == [f"bytes={half}-"]


def test_imdb_lands_where_the_loader_looks(tmp_path, hub):
    spec = D.hub_files("imdb")
    shards = {f"{split}-00000-of-00001.parquet":
              parquet_bytes(tmp_path, {"text": [f"{split} review {i}" for i in range(n)], "label": [i % 2 for i in range(n)]})
              for split, n in spec.rows.items()}
    hub.add_dataset(spec, shards)
    D.download("imdb", to=tmp_path / "data", quiet=True)
    source = imdb_source("test", data_dir=tmp_path / "data")
    texts, labels = source.read()
    assert texts[3] == "test review 3" and len(labels) == 25000 and labels.sum() == 12500


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
    assert [r for p, r in hub.requests if p == "/aclImdb_v1.tar.gz"] == [f"bytes={half}-"]
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


def test_unreachable_host_is_one_clear_line(tmp_path, capsys, monkeypatch):
    server = FakeHub()
    url = server.url
    server.close()  # nothing listens there any more
    code = main(["download", "wikitext2", "--to", str(tmp_path), "--endpoint", url])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert "127.0.0.1" in err[0]


@pytest.mark.parametrize("load, command", [
    (lambda d: wikitext_source("2", "train", data_dir=d), "`chiar download wikitext2`"),
    (lambda d: wikitext_source("103", "test", "tokens", data_dir=d), "`chiar download wikitext103 --variant tokens`"),
    (lambda d: imdb_source("train", data_dir=d), "`chiar download imdb`"),
])
def test_not_found_errors_name_the_fix(tmp_path, monkeypatch, load, command):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # as if the hf extra were not installed
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
