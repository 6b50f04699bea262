"""benchmarks/overhead.py runs on the tiny dataset: both sides of both comparisons are timed."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from helpers import TINY_RUN

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import overhead  # noqa: E402


def test_the_overhead_benchmark_times_the_runner_and_the_bare_passes(tiny_store, tmp_path):
    tiny = {k: v for k, v in TINY_RUN.items() if k not in ("epochs",)}
    result = overhead.measure("fast", 2, tmp_path, {**tiny, "kd_steps": 2, "method.g_steps": 1}, tiny_store)
    assert set(result) == {"synth runner", "synth bare", "step runner", "step bare"}
    assert all(v > 0 for v in result.values())


def test_a_fresh_methods_bare_step_draws_a_new_batch_from_its_generator(tiny_store, tmp_path):
    """DAFL trains on a new generator batch every step; the bare step must pay for that pass too."""
    tiny = {k: v for k, v in TINY_RUN.items() if k not in ("epochs",)}
    runner = overhead.build("dafl", tmp_path, {**tiny, "kd_steps": 1}, tiny_store)
    drawn = []
    sample = runner.method.sample
    runner.method.sample = lambda n: drawn.append(n) or sample(n)
    images, labels = runner.batches.next()
    before = [p.detach().clone() for p in runner.params]
    overhead.bare_step(runner, images, labels, torch.optim.SGD(runner.params, lr=0.1))
    assert drawn == [len(images), len(images)]  # the runner's draw, then the bare step's own
    assert any(not torch.equal(a, p) for a, p in zip(before, runner.params))
