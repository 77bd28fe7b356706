"""A small learnable corpus and tiny run settings for engine tests (imported by the test modules
beside it)."""

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


# `--set` overrides for a run that trains in seconds on a CPU.
TINY = ["model.d_model=32", "model.n_layers=3", "model.n_heads=2", "data.seq_len=32", "train.batch_size=8",
        "train.warmup_steps=2", "train.lr=3e-3", "train.log_every=2", "data.tokenizer=bytes", "train.device=cpu"]


def set_args(sets: list[str]) -> list[str]:
    """Overrides as `chiar` arguments: --set a --set b ..."""
    return [x for s in sets for x in ("--set", s)]


def train_tiny_lm(root: Path, *extra: str) -> Path:
    """A short real training run (byte-level dct_attn LM) on write_corpus text; returns the run folder."""
    from chiarformer.cli import main

    train = write_corpus(root / "train.txt", 6000, 0)
    val = write_corpus(root / "val.txt", 1500, 1)
    sets = TINY + [f"data.train_files=[{train}]", f"data.val_files=[{val}]", f"data.test_files=[{val}]",
                   f"data.cache_dir={root / 'cache'}", "train.max_steps=10", "train.eval_every=5", *extra]
    run = root / "run"
    assert main(["train", "--task", "text", "--model", "dct_attn", *set_args(sets), "--out", str(run), "--quiet"]) == 0
    return run
