"""Data throughput: GPT-2 tokenise-and-cache, and LRA ListOps generation.

    python benchmarks/bench_data.py [--data-dir ../shared/data] [--repeat 8] [--listops 2048]

1. Tokenise-and-cache (read, checksum, encode, write and verify the uint16 cache) of the shared
   WikiText-2 valid and test files, into a fresh temporary cache; then the same for one file
   holding both texts `--repeat` times (a larger corpus, as WikiText-103's train file is),
   with 1 thread and with all threads. Prints GPT-2 tokens/s, MB/s of UTF-8 text, and the
   projected time for WikiText-103 raw train (about 540 MB).
2. ListOps at LRA lengths (500-2000, depth 10, up to 10 arguments): examples/s with one
   worker and with one per CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from chiarformer.data import Cache, generate_listops, gpt2_tokenizer
from chiarformer.data.files import data_dir as resolve_data_dir
from chiarformer.data.text import corpus_tokens, file_source
from chiarformer.data.wikitext import wikitext_source

WT103_TRAIN_BYTES = 540e6


def tokenise_and_cache(sources, tok, cache_root: Path) -> tuple[int, int, float]:
    """(tokens, UTF-8 bytes, seconds) of building fresh caches for the sources."""
    n_bytes = sum(len("".join(s.pieces()).encode()) for s in sources)  # counted outside the timing
    cache = Cache(cache_root)
    start = time.perf_counter()
    n_tokens = sum(len(corpus_tokens(s, tok, cache, f"bench-{i}")) for i, s in enumerate(sources))
    return n_tokens, n_bytes, time.perf_counter() - start


def report(label: str, n_tokens: int, n_bytes: int, seconds: float) -> None:
    per_byte = seconds / n_bytes
    print(
        f"{label}: {n_tokens:,} tokens, {n_bytes / 1e6:.1f} MB in {seconds:.2f} s = {n_tokens / seconds / 1e6:.2f} M tokens/s, "
        f"{n_bytes / seconds / 1e6:.1f} MB/s; WikiText-103 train (540 MB) projected {WT103_TRAIN_BYTES * per_byte / 60:.1f} min"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="folder holding wikitext2_raw/ and gpt2_tokenizer/")
    ap.add_argument("--repeat", type=int, default=8, help="copies of valid+test in the larger corpus")
    ap.add_argument("--listops", type=int, default=2048, help="ListOps examples to generate")
    args = ap.parse_args()

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tok = gpt2_tokenizer()
    print(f"python {sys.version.split()[0]}, {cpus} CPUs, tokenizer files {tok.source}")
    root = resolve_data_dir(args.data_dir)
    sources = [wikitext_source("2", split, data_dir=root) for split in ("valid", "test")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        report("WikiText-2 valid+test files", *tokenise_and_cache(sources, tok, tmp / "c1"))
        big = tmp / "big.raw"
        big.write_text("".join("".join(s.pieces()) for s in sources) * args.repeat, encoding="utf-8")
        for threads in (1, cpus):
            tok.threads = threads
            report(f"{args.repeat}x valid+test in one file, {threads} thread(s)",
                   *tokenise_and_cache([file_source(big)], tok, tmp / f"c{threads}x"))

    rules = {"min_length": 500, "max_length": 2000, "max_depth": 10, "max_args": 10}
    for workers in sorted({1, cpus}):
        start = time.perf_counter()
        rows = generate_listops(args.listops, seed=0, workers=workers, **rules)
        seconds = time.perf_counter() - start
        print(f"ListOps LRA lengths, {workers} worker(s): {len(rows)} examples in {seconds:.2f} s"
              f" = {len(rows) / seconds:.0f} examples/s"
              f" (100k examples projected {100_000 / len(rows) * seconds / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
