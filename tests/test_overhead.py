"""benchmarks/overhead.py runs on the tiny dataset: both sides of both comparisons are timed."""

from __future__ import annotations

import sys
from pathlib import Path

from helpers import TINY_RUN

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import overhead  # noqa: E402


def test_the_overhead_benchmark_times_the_runner_and_the_bare_passes(tiny_store, tmp_path):
    tiny = {k: v for k, v in TINY_RUN.items() if k not in ("epochs",)}
    result = overhead.measure("fast", 2, tmp_path, {**tiny, "kd_steps": 2, "method.g_steps": 1}, tiny_store)
    assert set(result) == {"synth runner", "synth bare", "step runner", "step bare"}
    assert all(v > 0 for v in result.values())
