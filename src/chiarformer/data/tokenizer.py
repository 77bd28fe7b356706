"""Tokenizers: GPT-2 BPE (tiktoken) and raw UTF-8 bytes, with one small shared interface.

    tok = gpt2_tokenizer()            # or gpt2_tokenizer("/folder"); honours CHIAR_GPT2_DIR
    tok.encode("Hello world")         # [15496, 995]; "<|endoftext|>" -> [50256] (tok.eot_id)
    tok.decode(ids); tok.encode_batch(texts)  # batch encoding runs on tiktoken's native threads
    tok.encode_corpus(pieces)         # one long text given in pieces -> uint16 numpy ids
    tok.token_byte_lengths()          # UTF-8 bytes per id, for bits per byte

Both tokenizers have: name, vocab_size, eot_id, pad_id, fingerprint (identifies the exact
vocabulary; part of every cache key), encode, encode_batch, decode, encode_corpus,
token_byte_lengths.

GPT-2 files are looked for, in order: the `path` argument; env CHIAR_GPT2_DIR; <data dir>/
gpt2_tokenizer; tiktoken's cache; the Hugging Face hub cache (gpt2 / openai-community/gpt2);
and last a tiktoken download when its host answers. A folder may hold encoder.json + vocab.bpe
(OpenAI names) or vocab.json + merges.txt (Hugging Face names).

tiktoken is used rather than HF `tokenizers`: on the same WikiText chunks it encoded about
10x faster on these machines (docs/data.md).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import UserError
from .files import data_dir, fetch_hint
from .hub import reachable

ENV_GPT2_DIR = "CHIAR_GPT2_DIR"
EOT = "<|endoftext|>"
_GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
_FILE_NAMES = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
# Corpus text is encoded in pieces of about this many characters, cut where the GPT-2
# pre-tokenizer is sure to split anyway, so the ids equal those of one whole-text encode.
CHUNK_CHARS = 1 << 20
_CUT_AFTER = re.compile(r"(?<=\S)[ \n]")  # Python's \s is str.isspace(), as in safe_cut


def safe_cut(text: str, target: int) -> int | None:
    """A cut position near `target` that the GPT-2 pre-tokenizer splits at, or None.

    A position p qualifies when text[p] is " " or "\\n" and text[p-1] is not whitespace: no
    pre-token spans it (a space only starts a pre-token; letters, digits and symbols never
    take whitespace after them), and the regex has no look-behind, so encoding the two halves
    apart gives the ids of the whole. Python's isspace() covers every character the regex
    calls whitespace, so the test errs on the safe side.
    """
    i = max(text.rfind(" ", 1, target + 1), text.rfind("\n", 1, target + 1))
    while i > 0:
        if not text[i - 1].isspace():
            return i
        i = max(text.rfind(" ", 1, i), text.rfind("\n", 1, i))
    m = _CUT_AFTER.search(text, target + 1)
    return m.start() if m else None


def _split_for_threads(pieces: Iterable[str], chunk_chars: int) -> Iterable[str]:
    """Re-cut a stream of text pieces into chunks of about chunk_chars at safe positions."""
    buf = ""
    for piece in pieces:
        buf += piece
        while len(buf) > chunk_chars:
            cut = safe_cut(buf, chunk_chars)
            if cut is None:
                break  # no safe position yet: keep reading (correct, just less parallel)
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


class GPT2Tokenizer:
    """GPT-2 byte-level BPE (vocab 50257) backed by a tiktoken Encoding."""

    name = "gpt2"

    def __init__(self, mergeable_ranks: dict[bytes, int], source: str, files: tuple[Path, Path] | None = None):
        import tiktoken
        from tiktoken_ext.openai_public import r50k_pat_str

        self._enc = tiktoken.Encoding(
            "gpt2", pat_str=r50k_pat_str, mergeable_ranks=mergeable_ranks, special_tokens={EOT: 50256}, explicit_n_vocab=50257
        )
        self.source = source  # where the files came from, for messages and protocols
        self.files = files  # (encoder json, merges) when read from disk; `chiar export` copies the vocabulary
        self.vocab_size = self._enc.n_vocab
        self.eot_id = self._enc.eot_token
        self.pad_id = self.eot_id  # padding is always masked, so any id works; GPT-2 has no pad
        self.threads = os.cpu_count() or 1
        self.fingerprint = _fingerprint(mergeable_ranks, r50k_pat_str)
        self._byte_lengths: np.ndarray | None = None

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; the literal "<|endoftext|>" becomes eot_id (as in GPT-2)."""
        return self._enc.encode(text, allowed_special={EOT})

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, on tiktoken's threads; "<|endoftext|>" in data stays plain text."""
        return self._enc.encode_ordinary_batch(texts, num_threads=self.threads)

    def decode(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids])

    def encode_corpus(self, pieces: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> np.ndarray:
        """Ids (uint16) of the text formed by concatenating `pieces`, equal to one whole encode."""
        out: list[np.ndarray] = []
        batch: list[str] = []
        group = 2 * self.threads  # a few chunks per thread; lists of ints are converted at once
        for chunk in _split_for_threads(pieces, chunk_chars):
            batch.append(chunk)
            if len(batch) == group:
                out.extend(np.asarray(ids, dtype=np.uint16) for ids in self.encode_batch(batch))
                batch = []
        out.extend(np.asarray(ids, dtype=np.uint16) for ids in self.encode_batch(batch))
        return np.concatenate(out) if out else np.zeros(0, np.uint16)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes each id stands for; 0 for <|endoftext|>, which is a marker, not text."""
        if self._byte_lengths is None:
            lengths = np.zeros(self.vocab_size, np.int64)
            for i in range(self.vocab_size):
                if i != self.eot_id:
                    lengths[i] = len(self._enc.decode_single_token_bytes(i))
            self._byte_lengths = lengths
        return self._byte_lengths


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, plus id 256 as end-of-text and padding (vocab 257)."""

    name = "bytes"
    vocab_size = 257
    eot_id = 256
    pad_id = 256
    fingerprint = "bytes-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def encode_corpus(self, pieces: Iterable[str], chunk_chars: int = CHUNK_CHARS) -> np.ndarray:
        parts = [np.frombuffer(p.encode("utf-8"), np.uint8) for p in pieces]
        return np.concatenate(parts).astype(np.uint16) if parts else np.zeros(0, np.uint16)

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, np.int64)
        lengths[self.eot_id] = 0
        return lengths


def get_tokenizer(name: str = "gpt2"):
    """A tokenizer by name: "gpt2" (GPT-2 BPE) or "bytes" (UTF-8 bytes)."""
    if name == "gpt2":
        return gpt2_tokenizer()
    if name == "bytes":
        return ByteTokenizer()
    raise UserError(f"unknown tokenizer {name!r}; choose 'gpt2' or 'bytes'")


def gpt2_tokenizer(path: str | os.PathLike | None = None) -> GPT2Tokenizer:
    """The GPT-2 tokenizer from `path` (a folder), or from the places listed in the module doc."""
    if path is not None:
        folder = Path(path).expanduser()
        files = _files_in(folder)
        if files is None:
            raise UserError(f"no GPT-2 tokenizer files in {folder}; it needs encoder.json + vocab.bpe or vocab.json + merges.txt")
        return _load_files(*files)
    tried = []
    for folder in _local_folders():
        files = _files_in(folder)
        if files is not None:
            return _load_files(*files)
        tried.append(str(folder))
    if reachable("openaipublic.blob.core.windows.net"):
        from tiktoken_ext.openai_public import gpt2  # downloads and checks the official hashes

        return GPT2Tokenizer(gpt2()["mergeable_ranks"], "tiktoken download")
    tried.append("tiktoken download (host unreachable)")
    raise UserError(
        f"GPT-2 tokenizer files not found: {fetch_hint('gpt2-tokenizer')}, or set {ENV_GPT2_DIR} to a folder "
        f"holding encoder.json + vocab.bpe (or vocab.json + merges.txt); tried: {', '.join(tried)}"
    )


def _local_folders() -> list[Path]:
    folders = []
    if os.environ.get(ENV_GPT2_DIR):
        folders.append(Path(os.environ[ENV_GPT2_DIR]).expanduser())
    folders.append(data_dir() / "gpt2_tokenizer")
    import tempfile

    tiktoken_cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
    folders.append(Path(tiktoken_cache) if tiktoken_cache else Path(tempfile.gettempdir()) / "data-gym-cache")
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    hub = Path(os.environ.get("HF_HUB_CACHE", hf_home / "hub"))
    for repo in ("models--gpt2", "models--openai-community--gpt2"):
        snapshots = sorted((hub / repo / "snapshots").glob("*"))
        folders.extend(snapshots or [hub / repo])
    return folders


def _files_in(folder: Path) -> tuple[Path, Path] | None:
    """(encoder json, merges file) in `folder`, including tiktoken's cache names, or None."""
    names = list(_FILE_NAMES)
    # tiktoken caches each download under sha1(url).
    names.append(tuple(hashlib.sha1((_GPT2_URL + n).encode()).hexdigest() for n in _FILE_NAMES[0]))
    for encoder, merges in names:
        if (folder / encoder).is_file() and (folder / merges).is_file():
            return folder / encoder, folder / merges
    return None


@functools.cache
def _load_files(encoder_json: Path, merges: Path) -> GPT2Tokenizer:
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    # tiktoken copies files into its cache keyed by path; passing the files' own hashes
    # makes it re-read them whenever their content changed.
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (merges, encoder_json)]
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(str(merges), str(encoder_json), *hashes)
    except (AssertionError, ValueError, KeyError) as e:
        raise UserError(f"{encoder_json} and {merges} are not a matching GPT-2 vocabulary ({type(e).__name__})") from None
    if len(ranks) != 50256:
        raise UserError(f"{encoder_json} holds {len(ranks)} merged tokens, GPT-2 has 50256")
    return GPT2Tokenizer(ranks, str(encoder_json.parent), (encoder_json, merges))


def _fingerprint(ranks: dict[bytes, int], pattern: str) -> str:
    """Hash of the vocabulary and split pattern: equal fingerprints give equal ids."""
    h = hashlib.sha256(pattern.encode())
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    return "gpt2-" + h.hexdigest()[:16]
