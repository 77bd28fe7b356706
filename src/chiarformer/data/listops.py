"""ListOps as generated for the Long Range Arena (SPEC §6), and the paper's flat toy variant.

    rows = generate_listops(n=100, seed=0, min_length=500, max_length=2000, max_depth=10, max_args=10)
    rows[0]   # ("( ( ( [MAX 2 ) 9 ) ] )"-style source, target 0-9)
    write_listops_tsv(path, rows); read_listops_tsv(path)      # LRA TSV: header "Source\\tTarget"
    ListOpsTokenizer("lra").encode(source)                     # or "brackets"
    generate_listops_flat(n=1000, seed=0)                      # "[MAX 3 1 4 ]"-style, 4-8 digits

Generation follows LRA: a node at depth < max_depth (the root has depth 1) is an operator with
probability 0.25, otherwise a uniform digit 0-9; at max_depth it is always a digit. An operator
(MIN, MAX, MED, SM, uniform) takes uniform 2..max_args arguments, one level deeper. Length =
digits + 2 per operator (opening token and "]"); parentheses are not counted. Trees with
min_length < length < max_length are kept, duplicates dropped, until n distinct trees exist.
Values: MIN, MAX, SM = sum mod 10, MED = int(median) with the mean of the two middle values for
an even count. A tree growing past max_length is abandoned early: a rejected tree only consumes
random numbers, so the kept trees have the distribution of the full procedure.

Determinism: trees come from fixed-size chunks, chunk c drawing from random.Random(f"{seed}:{c}");
chunks run in worker processes and are merged in chunk order, so the output depends on the seed
and not on the number of workers.

Tokenisations (one shared vocabulary, id 0 = padding):
- "lra": the LRA input pipeline's, alphanumeric tokens only: "[MAX" -> "MAX"; "(", ")", "]" dropped.
- "brackets": keeps "[MAX" and "]" so the tree structure stays explicit; drops the parentheses,
  which repeat it (the length then equals the LRA length above).

Flat variant (the paper's "ListOps"): one operator of MAX, MIN, MEAN (int(mean) % 10), MED
(int(median) % 10) over 4..8 uniform digits, written "[OP d ... ]"; sets are drawn distinct, so
no expression is in two splits.
"""

from __future__ import annotations

import csv
import math
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from ..errors import UserError
from .files import require_file

OPERATORS = ("MIN", "MAX", "MED", "SM")
FLAT_OPERATORS = ("MAX", "MIN", "MEAN", "MED")
OPERATOR_PROB = 0.25
DIGITS = tuple(map(str, range(10)))
CHUNK = 256  # trees per chunk; fixed, so results do not depend on the worker count
MAX_TRIES = 1_000_000  # per chunk; beyond it the length window is practically unreachable
TOKEN_STYLES = ("lra", "brackets")
LRA_SIZES = {"n_train": 96_000, "n_val": 2_000, "n_test": 2_000,
             "min_length": 500, "max_length": 2000, "max_depth": 10, "max_args": 10}


class _TooLong(Exception):
    pass


def _median_int(values: list[int]) -> int:
    s = sorted(values)
    k = len(s)
    # int() of the mean of two middle digits (non-negative) is floor division.
    return s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) // 2


def apply_operator(op: str, values: list[int]) -> int:
    """Value of a ListOps operator applied to digit values."""
    if op == "MIN":
        return min(values)
    if op == "MAX":
        return max(values)
    if op == "SM":
        return sum(values) % 10
    # MED and MEAN of digits are digits already: the flat variant's "% 10" changes nothing.
    if op == "MED":
        return _median_int(values)
    if op == "MEAN":
        return sum(values) // len(values)
    raise ValueError(op)


def _chunk(args: tuple) -> list[tuple[str, int]]:
    """CHUNK trees accepted by the length rule, from the chunk's own random stream."""
    seed, index, min_length, max_length, max_depth, max_args = args
    rng = random.Random(f"listops:{seed}:{index}")
    uniform = rng.random  # digits as int(10 * U): several times faster than randrange(10)
    out: list[str] = []
    length = 0

    def grow(depth: int) -> int:
        """Append one subtree's tokens to `out` and return its value."""
        nonlocal length
        if depth < max_depth and uniform() < OPERATOR_PROB:
            op = OPERATORS[int(4 * uniform())]
            n_args = rng.randint(2, max_args)
            length += 2
            if length >= max_length:
                raise _TooLong
            # LRA writes (op, a1), then ((...), a_i) for each further argument, then ((...), "]"):
            # n_args + 1 opening parentheses, one ")" after each argument and one after "]".
            out.extend(["("] * (n_args + 1))
            out.append("[" + op)
            values = []
            for _ in range(n_args):
                values.append(grow(depth + 1))
                out.append(")")
            out.extend(("]", ")"))
            return apply_operator(op, values)
        length += 1
        if length >= max_length:
            raise _TooLong
        digit = int(10 * uniform())
        out.append(DIGITS[digit])
        return digit

    rows = []
    for _ in range(MAX_TRIES):
        out.clear()
        length = 0
        try:
            value = grow(1)
        except _TooLong:
            continue
        if length > min_length:
            rows.append((" ".join(out), value))
            if len(rows) == CHUNK:
                return rows
    raise UserError(f"ListOps lengths {min_length}-{max_length} at depth {max_depth} are too rarely drawn; widen the range")


def _check(n: int, min_length: int, max_length: int, max_depth: int, max_args: int) -> None:
    if n < 1:
        raise UserError(f"number of ListOps examples must be positive, got {n}")
    if max_args < 2 or max_depth < 2:
        raise UserError(f"ListOps needs max_args >= 2 and max_depth >= 2, got {max_args} and {max_depth}")
    if not 0 <= min_length < max_length - 1:
        raise UserError(f"ListOps length window ({min_length}, {max_length}) holds no length")
    longest = 1
    for _ in range(max_depth - 1):  # the longest tree: every node an operator with max_args arguments
        longest = 2 + max_args * longest
    if longest <= min_length:
        raise UserError(f"no ListOps tree of depth {max_depth} with {max_args} arguments is longer than {min_length}")


def generate_listops(
    n: int,
    seed: int = 0,
    min_length: int = 500,
    max_length: int = 2000,
    max_depth: int = 10,
    max_args: int = 10,
    workers: int | None = None,
) -> list[tuple[str, int]]:
    """n distinct LRA ListOps (source, target) rows; workers=None uses every CPU."""
    _check(n, min_length, max_length, max_depth, max_args)
    n_chunks = math.ceil(n / CHUNK)
    workers = min(workers or _cpu_count(), n_chunks)
    rows: list[tuple[str, int]] = []
    seen: set[str] = set()
    next_chunk = 0
    pool = ProcessPoolExecutor(workers, mp_context=_process_context()) if workers > 1 else None
    try:
        while len(rows) < n:
            # Duplicates are rare, so one round usually suffices; later rounds top up.
            count = max(math.ceil((n - len(rows)) / CHUNK), workers)
            jobs = [(seed, next_chunk + i, min_length, max_length, max_depth, max_args) for i in range(count)]
            next_chunk += count
            for chunk_rows in pool.map(_chunk, jobs) if pool else map(_chunk, jobs):
                for row in chunk_rows:
                    if row[0] not in seen and len(rows) < n:
                        seen.add(row[0])
                        rows.append(row)
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return rows


def _process_context():
    # fork on Linux: workers run pure Python, and spawn would re-run the caller's main script
    # (breaking scripts without a __main__ guard, stdin and notebooks).
    return get_context("fork" if sys.platform == "linux" else "spawn")


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def generate_listops_flat(n: int, seed: int = 0, min_args: int = 4, max_args: int = 8) -> list[tuple[str, int]]:
    """n distinct flat expressions "[OP d ... ]" with their values (split them for disjoint sets)."""
    if not 1 <= min_args <= max_args:
        raise UserError(f"flat ListOps needs 1 <= min_args <= max_args, got {min_args} and {max_args}")
    rng = random.Random(f"listops-flat:{seed}")
    seen = set()
    rows = []
    for _ in range(100 * n + 1000):
        op = rng.choice(FLAT_OPERATORS)
        digits = [rng.randrange(10) for _ in range(rng.randint(min_args, max_args))]
        source = " ".join(["[" + op, *map(str, digits), "]"])
        if source not in seen:
            seen.add(source)
            rows.append((source, apply_operator(op, digits)))
            if len(rows) == n:
                return rows
    raise UserError(f"cannot draw {n} distinct flat ListOps expressions with {min_args}-{max_args} digits")


def write_listops_tsv(path: str | Path, rows: list[tuple[str, int]]) -> None:
    """Write rows in the LRA TSV format (header "Source\\tTarget")."""
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["Source", "Target"])
        w.writerows(rows)


def read_listops_tsv(path: str | Path) -> list[tuple[str, int]]:
    """Rows of an LRA ListOps TSV file; UserError on a bad header or row."""
    p = require_file(path, "ListOps TSV file")
    try:
        with open(p, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None)
            if header != ["Source", "Target"]:
                raise UserError(f"{p} does not start with the header Source<TAB>Target")
            rows = []
            for n, row in enumerate(reader, 2):
                if len(row) != 2 or not row[1].strip().isdigit() or not 0 <= int(row[1]) <= 9:
                    raise UserError(f"{p} line {n} is not <source><TAB><digit>")
                rows.append((row[0], int(row[1])))
    except UnicodeDecodeError:
        raise UserError(f"{p} is not UTF-8 text") from None
    if not rows:
        raise UserError(f"{p} holds no examples")
    return rows


class ListOpsTokenizer:
    """ListOps sources to ids in one vocabulary shared by both styles (id 0 = padding)."""

    pad_id = 0

    def __init__(self, style: str = "lra"):
        if style not in TOKEN_STYLES:
            raise UserError(f"unknown ListOps tokenisation {style!r}; choose {' or '.join(TOKEN_STYLES)}")
        self.style = style
        self.name = f"listops-{style}"
        ops = sorted(set(OPERATORS) | set(FLAT_OPERATORS))
        self.vocab = ["<pad>", *map(str, range(10)), *ops, *("[" + op for op in ops), "]"]
        self.vocab_size = len(self.vocab)
        self.fingerprint = f"{self.name}:" + ",".join(self.vocab)
        self._ids = {t: i for i, t in enumerate(self.vocab) if i != self.pad_id}

    def encode(self, source: str) -> list[int]:
        # Dropping characters with str.replace first keeps the per-token Python work small.
        text = source.replace("(", " ").replace(")", " ")
        if self.style == "lra":
            text = text.replace("[", "").replace("]", " ")
        try:
            return [self._ids[t] for t in text.split()]
        except KeyError as e:
            raise UserError(f"unknown ListOps token {e.args[0]!r} in {source[:60]!r}") from None

    def decode(self, ids) -> str:
        return " ".join(self.vocab[int(i)] for i in ids if int(i) != self.pad_id)
