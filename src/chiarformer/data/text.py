"""Text corpora for language modelling: sources, cached tokenisation, held-out tails.

A TextSource is one corpus text given as a stream of pieces plus a checksum of where it came
from; `corpus_tokens` encodes it once (equal to encoding the whole text in one call) and caches
the uint16 ids keyed by that checksum and the tokenizer's fingerprint. `documents_tokens`
encodes separate documents (reviews, files) and joins them with end-of-text after each.
`carve_tail` takes the last fraction of a token array as a held-out split, so a split that a
dataset lacks is cut from the training text and never from the test text.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .cache import Cache
from .files import checksum, read_text_pieces, require_file


@dataclass
class TextSource:
    description: str  # where the text comes from, e.g. a path; shown in protocols and errors
    checksum: Callable[[], str]  # identifies the exact source content (cache key)
    pieces: Callable[[], Iterator[str]]  # the text, in pieces whose concatenation is the corpus


def file_source(path: str | os.PathLike) -> TextSource:
    """A UTF-8 text file as a TextSource (errors for missing, empty or non-UTF-8 files)."""
    if str(path).startswith("hf://"):
        raise UserError(f"{path} is a Hugging Face hub path; text corpora are read from local files: "
                        "download them and pass their paths")
    p = require_file(path, "text file")
    return TextSource(str(p), lambda: checksum([p]), lambda: read_text_pieces(p))


def corpus_tokens(source: TextSource, tokenizer, cache: Cache, name: str) -> np.ndarray:
    """uint16 ids of the source text (cached); UserError when it holds no tokens."""
    key = {"what": "corpus-tokens", "source": source.checksum(), "tokenizer": tokenizer.fingerprint}
    tokens = cache.arrays(name, key, lambda: {"tokens": tokenizer.encode_corpus(source.pieces())})["tokens"]
    if len(tokens) < 2:
        raise UserError(f"{source.description} gives {len(tokens)} tokens; a language-model split needs at least 2")
    return tokens


def documents_tokens(documents: Sequence[str], tokenizer, batch: int = 4096) -> np.ndarray:
    """uint16 ids of each document followed by end-of-text, all joined."""
    out = []
    eot = np.array([tokenizer.eot_id], np.uint16)
    for start in range(0, len(documents), batch):
        for ids in tokenizer.encode_batch(list(documents[start : start + batch])):
            out += [np.asarray(ids, np.uint16), eot]
    return np.concatenate(out) if out else np.zeros(0, np.uint16)


def join_with_eot(arrays: Sequence[np.ndarray], eot_id: int) -> np.ndarray:
    """Token arrays of separate files joined with one end-of-text between them."""
    if len(arrays) == 1:
        return arrays[0]
    parts = []
    for i, a in enumerate(arrays):
        parts += [np.asarray(a)] if i == 0 else [np.array([eot_id], np.uint16), np.asarray(a)]
    return np.concatenate(parts)


def carve_tail(tokens: np.ndarray, fraction: float, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(head, tail) with the tail the last `fraction` of the tokens; both at least 2 tokens long."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"held-out fraction must be between 0 and 1, got {fraction}")
    cut = len(tokens) - int(round(len(tokens) * fraction))
    if cut < 2 or len(tokens) - cut < 2:
        raise UserError(f"{what} has {len(tokens)} tokens, too few to hold out {fraction:.0%}")
    return tokens[:cut], tokens[cut:]
