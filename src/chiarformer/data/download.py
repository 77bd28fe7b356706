"""`chiar download`: fetch a dataset or the GPT-2 tokenizer into the data folder, checked.

    chiar download wikitext2 | wikitext103 | imdb | gpt2-tokenizer [--to DIR]
    download("wikitext2", to=None)        # the same from Python; returns the folder written

- wikitext2, wikitext103: the Hugging Face dataset Salesforce/wikitext, config
  wikitext-{2,103}-raw-v1 (`--variant tokens`: wikitext-{2,103}-v1), its parquet files -> DIR/<config>/
- imdb: the Hugging Face dataset stanfordnlp/imdb, plain_text/{train,test}-*.parquet -> DIR/imdb/plain_text/;
  `--source archive`: Stanford's aclImdb_v1.tar.gz, labelled reviews extracted -> DIR/imdb/aclImdb/
- gpt2-tokenizer: OpenAI's encoder.json and vocab.bpe (the files tiktoken downloads) -> DIR/gpt2_tokenizer/
(DIR = --to, else the data folder.)
These are the folders the loaders search (wikitext.py, imdb.py, tokenizer.py). The Hugging Face
files come from a pinned commit of each repository (REVISIONS), so every user gets the same bytes.

huggingface_hub (the `hf` extra) lists a repository's files with their published sizes and
SHA-256 values and gives each file's URL at the pinned commit. Every file, the hub's included, then
comes over plain HTTPS (urllib) the same way: its bytes arrive in NAME.part, a download that was
interrupted or killed resumes from there (HTTP Range) when the same command runs again, and a
verified file already in place is not fetched again. (huggingface_hub's own hf_hub_download does
not resume across runs: since 2.x each attempt writes a fresh temporary file.)

Checks (a file that fails is deleted and the command fails):
- Hugging Face files: the size and SHA-256 the hub's tree API publishes for the file (its LFS
  object); then pyarrow must read the parquet footer, which must list the expected columns and,
  summed over a split's shards, the split's row count on the dataset card (ROWS).
- GPT-2 files: the sizes and SHA-256 values tiktoken pins for them (GPT2_FILES).
- The IMDB archive: no checksum is published; the size the server gives (Content-Length), then
  12,500 reviews in each of train/pos, train/neg, test/pos, test/neg (extracted apart first).

Hosts: the hub from --endpoint, else HF_ENDPOINT (read by huggingface_hub; a mirror), else
https://huggingface.co; the GPT-2 files from --endpoint, else OpenAI's public blob store.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import imdb, wikitext
from .files import data_dir
from .wikitext import hf_config

NAMES = ("wikitext2", "wikitext103", "imdb", "gpt2-tokenizer")
GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
# (bytes, sha256) of OpenAI's GPT-2 files, as pinned by tiktoken (tiktoken_ext/openai_public.py, gpt2).
GPT2_FILES = {
    "encoder.json": (1042301, "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": (456318, "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
# The commit each repository is read at: the one `datasets` resolves these configs to.
REVISIONS = {wikitext.HF_REPO: "b08601e04326c79dfdd32d625aee71d232d685c3",
             imdb.HF_REPO: "e6281661ce1c48d982bc483cf8a173c1bbeb5d31"}
# Rows per split on the dataset cards (WikiText: one row per line of the official files).
_WIKITEXT_ROWS = {"2": {"train": 36718, "validation": 3760, "test": 4358},
                  "103": {"train": 1801350, "validation": 3760, "test": 4358}}
ROWS = {"imdb": {"train": 25000, "test": 25000}}  # the 50k unlabelled reviews are not used
# The official IMDB archive (Maas et al. 2011); no checksum is published: its size comes from the
# server and its content is checked by the number of reviews per split and class.
IMDB_ARCHIVE = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_REVIEWS = 12500  # per split and class in aclImdb v1
TIMEOUT_S = 30.0
_BLOCK = 1 << 20


@dataclass(frozen=True)
class HubFiles:
    """The parquet files of one dataset config on the hub and what they must hold."""

    repo: str
    folder: str  # folder inside the repository
    local_dir: str  # folder under DIR that mirrors the repository ("" = DIR itself)
    columns: tuple[str, ...]
    rows: dict[str, int]  # split -> rows; only these splits are fetched


@dataclass(frozen=True)
class RemoteFile:
    url: str
    dest: Path
    size: int
    sha256: str | None = None  # None: the size only (the IMDB archive; its content is checked after)


def hub_files(name: str, variant: str = "raw") -> HubFiles:
    if name in ("wikitext2", "wikitext103"):
        version = name.removeprefix("wikitext")
        config = hf_config(version, variant)
        return HubFiles(wikitext.HF_REPO, config, "", ("text",), _WIKITEXT_ROWS[version])
    if name == "imdb":
        return HubFiles(imdb.HF_REPO, "plain_text", "imdb", ("text", "label"), ROWS["imdb"])
    raise UserError(f"unknown download {name!r}; choose one of: {', '.join(NAMES)}")


def download(name: str, to: str | os.PathLike | None = None, variant: str = "raw", endpoint: str | None = None,
             quiet: bool = False, source: str = "hub") -> Path:
    """Fetch `name` (see NAMES) into `to` (default: the data folder); returns the folder written.

    source="archive" (IMDB only): Stanford's aclImdb_v1.tar.gz instead of the hub's parquet files;
    `endpoint` is then the archive's URL."""
    if name not in NAMES:
        raise UserError(f"unknown download {name!r}; choose one of: {', '.join(NAMES)}")
    if source not in ("hub", "archive"):
        raise UserError(f"unknown source {source!r}; choose hub or archive")
    if source == "archive" and name != "imdb":
        raise UserError(f"--source archive is for imdb only; {name} comes from the hub or its own host")
    if variant not in ("raw", "tokens"):
        raise UserError(f"unknown variant {variant!r}; choose raw or tokens")
    if variant != "raw" and not name.startswith("wikitext"):
        raise UserError(f"--variant applies to WikiText only, not {name}")
    root = Path(to).expanduser() if to is not None else data_dir()
    if source == "archive":
        return _imdb_archive(root, endpoint or IMDB_ARCHIVE, quiet)
    if name == "gpt2-tokenizer":
        base = (endpoint or GPT2_URL).rstrip("/")
        folder = root / "gpt2_tokenizer"
        for fname, (size, sha) in GPT2_FILES.items():
            fetch(RemoteFile(f"{base}/{fname}", folder / fname, size, sha256=sha), quiet)
        return folder
    return _hub_download(hub_files(name, variant), root, endpoint, quiet)


def _hub_download(spec: HubFiles, root: Path, endpoint: str | None, quiet: bool) -> Path:
    """The split files of `spec` at its pinned commit into root/spec.local_dir, each one checked."""
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise UserError('downloading from the Hugging Face hub needs huggingface_hub: pip install -e ".[hf]"') from None
    if constants.HF_HUB_OFFLINE:
        raise UserError("HF_HUB_OFFLINE is set, so huggingface_hub will not download: unset it for this command")
    api = huggingface_hub.HfApi(endpoint=endpoint)  # None: HF_ENDPOINT, else huggingface.co
    revision = REVISIONS[spec.repo]
    local_dir = root / spec.local_dir
    with _hub_errors(api.endpoint):
        by_split = _list_hub_files(api, spec, revision, huggingface_hub.RepoFile)
        for split, entries in by_split.items():
            paths = []
            for entry in entries:
                url = huggingface_hub.hf_hub_url(spec.repo, entry.path, repo_type="dataset", revision=revision,
                                                 endpoint=api.endpoint)
                path = local_dir / entry.path
                fetch(RemoteFile(url, path, entry.size, sha256=entry.lfs.sha256), quiet)
                paths.append(path)
            _check_parquet_split(spec, split, paths)
    return local_dir / spec.folder


def _list_hub_files(api, spec: HubFiles, revision: str, repo_file: type) -> dict[str, list]:
    """The split's parquet files (RepoFile entries, with the size and LFS SHA-256 the hub publishes)."""
    by_split: dict[str, list] = {split: [] for split in spec.rows}
    for entry in api.list_repo_tree(spec.repo, spec.folder, repo_type="dataset", revision=revision):
        fname = entry.path.rsplit("/", 1)[-1]
        split = fname.split("-", 1)[0]
        if split not in by_split or not fname.endswith(".parquet") or not isinstance(entry, repo_file):
            continue  # a folder, another split, the README
        if entry.lfs is None:
            raise UserError(f"{spec.repo}@{revision[:8]}/{entry.path} is not an LFS file: the hub publishes no SHA-256 for it")
        by_split[split].append(entry)
    missing = [split for split, files in by_split.items() if not files]
    if missing:
        raise UserError(f"{spec.repo}@{revision[:8]}/{spec.folder} lists no parquet file for split(s) {', '.join(missing)}")
    return {split: sorted(files, key=lambda e: e.path) for split, files in by_split.items()}


@contextmanager
def _hub_errors(host: str):
    """huggingface_hub's network and HTTP failures as one line, its retry warnings kept off the terminal
    meanwhile (the line replaces them). Its own errors are OSErrors; the HTTP client's are not (httpx in
    huggingface_hub 1.x, httpx2 since 2.x; requests, before, raises OSErrors)."""
    import logging

    client_errors = tuple(module.HTTPError for module in map(sys.modules.get, ("httpx", "httpx2")) if module)
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    except (OSError, *client_errors) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot fetch from {host} ({reason}); check the connection (a mirror: --endpoint URL or "
                        "HF_ENDPOINT)") from None
    finally:
        hub_logger.setLevel(level)


def _imdb_archive(root: Path, url: str, quiet: bool) -> Path:
    """aclImdb_v1.tar.gz into root/imdb/, its labelled reviews extracted to root/imdb/aclImdb/."""
    with _open(url, method="HEAD") as response:
        size = response.headers.get("Content-Length")
    if not size:
        raise UserError(f"{url} does not say its size (no Content-Length): cannot check the download")
    archive = RemoteFile(url, root / "imdb" / "aclImdb_v1.tar.gz", int(size))
    fetch(archive, quiet)
    return _extract_reviews(archive.dest)


def _extract_reviews(path: Path) -> Path:
    """The {train,test}/{pos,neg}/*.txt members of the archive (nothing else) into aclImdb/ beside it."""
    import shutil
    import tarfile
    from collections import Counter

    partial, final = path.parent / "aclImdb.partial", path.parent / "aclImdb"
    shutil.rmtree(partial, ignore_errors=True)
    counts: Counter = Counter()
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                parts = member.name.split("/")
                # only aclImdb/<split>/<pos|neg>/<name>.txt: no links, no paths outside the folder
                if not (member.isfile() and len(parts) == 4 and parts[0] == "aclImdb" and parts[1] in ("train", "test")
                        and parts[2] in ("pos", "neg") and parts[3].endswith(".txt") and not parts[3].startswith(".")):
                    continue
                target = partial.joinpath(*parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                counts[parts[1], parts[2]] += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"{path} is not a readable .tar.gz archive ({type(e).__name__}); delete it and run again") from None
    wrong = {f"{split}/{label}": counts[split, label] for split in ("train", "test") for label in ("pos", "neg")
             if counts[split, label] != IMDB_REVIEWS}
    if wrong:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(f"{path} holds {wrong} reviews, aclImdb v1 has {IMDB_REVIEWS} in each: not extracted")
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def _open(url: str, start: int = 0, method: str = "GET"):
    """An HTTP response for url (from byte `start`), or UserError with a one-line reason."""
    request = urllib.request.Request(url, headers={"User-Agent": "chiarformer"}, method=method)
    if start:
        request.add_header("Range", f"bytes={start}-")
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # nothing after `start`: the file is complete (the check decides)
            return None
        raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UserError(f"cannot reach {urllib.parse.urlsplit(url).netloc} ({reason}); check the connection "
                        "(a mirror: --endpoint URL)") from None


def fetch(f: RemoteFile, quiet: bool = False) -> bool:
    """Download f.url to f.dest through f.dest.part (resuming it) and check it; True when bytes came."""
    if f.dest.is_file() and _matches(f.dest, f.size, f.sha256):
        if not quiet:
            print(f"{f.dest}: present, checked", file=sys.stderr)
        return False
    f.dest.parent.mkdir(parents=True, exist_ok=True)
    part = f.dest.with_name(f.dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if have > f.size:  # not a prefix of this file
        part.unlink()
        have = 0
    if have < f.size:
        if not quiet:
            resumed = f", resuming at {have:,} bytes" if have else ""
            print(f"fetching {f.url} ({f.size:,} bytes{resumed})", file=sys.stderr, flush=True)
        _receive(f, part, have, quiet)
    if not _matches(part, f.size, f.sha256):
        got = part.stat().st_size
        part.unlink()
        raise UserError(f"{f.dest.name} from {f.url} failed its check ({got:,} bytes, expected {f.size:,}; "
                        f"{'SHA-256' if f.sha256 else 'size'} differs from the published one): deleted, nothing kept; "
                        "run the command again")
    os.replace(part, f.dest)
    return True


def _receive(f: RemoteFile, part: Path, have: int, quiet: bool) -> None:
    response = _open(f.url, have)
    if response is None:
        return
    from tqdm import tqdm

    with response:
        if have and response.status != 206:  # the server ignored the range: start again
            have = 0
        mode = "ab" if have else "wb"
        bar = tqdm(total=f.size, initial=have, unit="B", unit_scale=True, desc=f.dest.name,
                   disable=quiet or not sys.stderr.isatty())
        promised = int(response.headers.get("Content-Length") or -1)
        received = 0
        try:
            with open(part, mode) as out, bar:
                while block := response.read(_BLOCK):
                    out.write(block)
                    bar.update(len(block))
                    received += len(block)
        except (OSError, http.client.HTTPException) as e:
            raise _broke_off(f, part, type(e).__name__) from None
    if received < promised:  # the connection closed early, without an error from urllib
        raise _broke_off(f, part, f"{received:,} of the {promised:,} bytes the server announced")


def _broke_off(f: RemoteFile, part: Path, why: str) -> UserError:
    return UserError(f"download of {f.url} broke off ({why}); {part} is kept: run the same command again to resume")


def _matches(path: Path, size: int, sha256: str | None) -> bool:
    if path.stat().st_size != size:
        return False
    if sha256 is None:
        return True  # no published checksum (the IMDB archive): the size only; its content is checked after
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest() == sha256


def _check_parquet_split(spec: HubFiles, split: str, files: list[Path]) -> None:
    """Each file opens as parquet with the expected columns; the split has the card's row count."""
    import pyarrow.parquet as pq

    rows = 0
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except (OSError, ValueError) as e:  # ArrowInvalid is a ValueError
            path.unlink()
            raise UserError(f"{path} is not a readable parquet file ({type(e).__name__}): deleted") from None
        missing = sorted(set(spec.columns) - set(pf.schema_arrow.names))
        if missing:
            raise UserError(f"{path} lacks column(s) {', '.join(missing)} (has {', '.join(pf.schema_arrow.names)})")
        rows += pf.metadata.num_rows
    if rows != spec.rows[split]:
        for path in files:
            path.unlink()
        raise UserError(f"{spec.repo} {spec.folder} {split}: {rows:,} rows, its dataset card says {spec.rows[split]:,}; "
                        "the files were deleted")


# --------------------------------------------------------------------------- command line
def register(subparsers) -> None:
    p = subparsers.add_parser(
        "download", help="fetch WikiText-2/103, IMDB or the GPT-2 tokenizer into the data folder (checked)",
        description="Fetch a dataset (Hugging Face parquet files, through huggingface_hub: the hf extra) or the "
                    "GPT-2 tokenizer files into the data folder ($CHIAR_DATA_DIR, or --to DIR), checking sizes "
                    "and SHA-256 values against the published ones and parquet row counts against the dataset "
                    "cards. Resumes a broken transfer; files already present and correct are not fetched again.")
    p.add_argument("name", choices=NAMES)
    p.add_argument("--to", default=None, metavar="DIR", help="data folder to write into (default: the data folder chiar reads)")
    p.add_argument("--variant", default="raw", choices=("raw", "tokens"),
                   help="WikiText: raw text (default, the published setup) or the tokenised files with <unk>")
    p.add_argument("--endpoint", default=None, metavar="URL",
                   help="base URL of a mirror: the hub for datasets (default $HF_ENDPOINT or https://huggingface.co), "
                        "the folder holding encoder.json and vocab.bpe for gpt2-tokenizer")
    p.add_argument("--source", default="hub", choices=("hub", "archive"),
                   help="imdb: hub = stanfordnlp/imdb parquet (default), archive = Stanford's aclImdb_v1.tar.gz "
                        "(84 MB, size and review counts checked; --endpoint = its URL)")
    p.add_argument("--quiet", action="store_true", help="print only the result")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    folder = download(args.name, to=args.to, variant=args.variant, endpoint=args.endpoint, quiet=args.quiet,
                      source=args.source)
    print(f"{args.name}: checked files in {folder}")
    root = Path(args.to).expanduser() if args.to is not None else data_dir()
    if root.resolve() != data_dir().resolve():
        print(f"chiar reads data from {data_dir()}: set CHIAR_DATA_DIR={root} (or --set data.data_dir={root}) to use it")
    return 0
