"""GPT-2 BPE and byte tokenizers: known ids, file discovery, chunked corpus encoding."""

import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from chiarformer.data import ByteTokenizer, gpt2_tokenizer
from chiarformer.data.files import read_text_pieces
from chiarformer.errors import UserError

SHARED = Path(os.environ.get("CHIAR_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data")
GPT2_DIR = SHARED / "gpt2_tokenizer"
WIKI = SHARED / "wikitext2_raw"
needs_gpt2 = pytest.mark.skipif(not (GPT2_DIR / "encoder.json").is_file(), reason="GPT-2 tokenizer files absent")
needs_wiki = pytest.mark.skipif(not (WIKI / "wiki.valid.raw").is_file(), reason="WikiText-2 files absent")


@pytest.fixture(scope="module")
def tok():
    if not (GPT2_DIR / "encoder.json").is_file():
        pytest.skip("GPT-2 tokenizer files absent")
    return gpt2_tokenizer(GPT2_DIR)


def test_known_ids(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.eot_id == 50256 and tok.vocab_size == 50257
    assert tok.decode([15496, 995]) == "Hello world"
    # Data never produces the control token: batch encoding keeps the literal as text.
    assert 50256 not in tok.encode_batch(["<|endoftext|>"])[0]


@needs_gpt2
def test_found_through_env_and_hf_names(tmp_path, monkeypatch):
    # Hugging Face file names (vocab.json + merges.txt) in the folder named by CHIAR_GPT2_DIR.
    shutil.copy(GPT2_DIR / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(GPT2_DIR / "vocab.bpe", tmp_path / "merges.txt")
    monkeypatch.setenv("CHIAR_GPT2_DIR", str(tmp_path))
    tok = gpt2_tokenizer()
    assert tok.source == str(tmp_path)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.fingerprint == gpt2_tokenizer(GPT2_DIR).fingerprint


def test_missing_files_name_the_places_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("CHIAR_GPT2_DIR", str(tmp_path / "nowhere"))
    monkeypatch.setenv("CHIAR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tk"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setattr("chiarformer.data.tokenizer.reachable", lambda host: False)
    with pytest.raises(UserError) as e:
        gpt2_tokenizer()
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg and "CHIAR_GPT2_DIR" in msg and "tiktoken download" in msg
    with pytest.raises(UserError, match="no GPT-2 tokenizer files"):
        gpt2_tokenizer(tmp_path)


@needs_gpt2
def test_mismatched_files_are_refused(tmp_path):
    shutil.copy(GPT2_DIR / "encoder.json", tmp_path / "encoder.json")
    merges = (GPT2_DIR / "vocab.bpe").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "vocab.bpe").write_text("".join(merges[:1000]), encoding="utf-8")
    with pytest.raises(UserError, match="not a matching GPT-2 vocabulary"):
        gpt2_tokenizer(tmp_path)


@needs_wiki
@pytest.mark.parametrize(("split", "count"), [("valid", 249_887), ("test", 286_221)])
def test_whole_file_token_counts(tok, split, count):
    path = WIKI / f"wiki.{split}.raw"
    whole = tok.encode(path.read_text(encoding="utf-8"))
    assert len(whole) == count
    # Chunked, threaded corpus encoding gives exactly the ids of one whole-text encode.
    chunked = tok.encode_corpus(read_text_pieces(path), chunk_chars=5000)
    assert chunked.dtype == np.uint16 and np.array_equal(chunked, whole)


def test_chunk_cuts_never_change_ids(tok):
    # Adversarial mixes of whitespace kinds, contractions, digits, symbols and non-ASCII.
    rng = random.Random(0)
    alphabet = [" ", "  ", "\n", "\n\n", " \n", "\t", "\u00a0", "\x1c", "'s", "'", "ab", "Z", "7", "42", "!", "?!", "é", "日本",
                "\r\n"]
    for _ in range(30):
        text = "".join(rng.choice(alphabet) for _ in range(400))
        assert tok.encode_corpus([text[:150], text[150:]], chunk_chars=rng.randint(5, 60)).tolist() == tok.encode_batch([text])[0]


def test_byte_lengths_count_utf8_bytes(tok):
    text = "Naïve café — 日本語 text"
    ids = tok.encode(text)
    assert tok.token_byte_lengths()[ids].sum() == len(text.encode("utf-8"))
    assert tok.token_byte_lengths()[tok.eot_id] == 0


def test_byte_tokenizer():
    tok = ByteTokenizer()
    ids = tok.encode("héllo")
    assert ids == list("héllo".encode()) and tok.decode(ids + [tok.pad_id]) == "héllo"
    assert tok.encode_corpus(["hé", "llo"]).tolist() == ids
    assert tok.token_byte_lengths()[ids].sum() == 6 and tok.vocab_size == 257
