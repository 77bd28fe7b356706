"""A small learnable corpus for engine tests (imported by the test modules beside it)."""

import random
from pathlib import Path

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "red", "ball", "."]


def write_corpus(path: Path, n_words: int, seed: int) -> Path:
    """Words from a small vocabulary with a Markov structure, so a model can learn something."""
    rng = random.Random(seed)
    out, w = [], 0
    for _ in range(n_words):
        w = (w * 3 + rng.choice([1, 2, 5])) % len(WORDS)
        out.append(WORDS[w])
    path.write_text(" ".join(out) + "\n")
    return path
