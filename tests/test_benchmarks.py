"""The benchmark scripts still run against the library (tiny sizes, one repeat; their numbers mean
nothing here). They are not imported by the package, so nothing else notices when a refactor
leaves one behind. (gpu_bench.py --device cpu --smoke also runs, but compiles for ~3 minutes.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

TINY = {
    "bench_routing.py": ["--d-model", "32", "--n-heads", "2", "--seq-len", "64", "--batch", "2",
                         "--whole-seq-len", "64", "--repeats", "1"],
    "bench_dct.py": ["--tokens", "64", "--repeats", "1"],
}


@pytest.mark.parametrize("script", sorted(TINY))
def test_benchmark_runs_at_tiny_sizes(script):
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *TINY[script]], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "|" in done.stdout  # it printed its table
