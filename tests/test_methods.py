"""Checks every registered method passes, parametrized over the registry: a new method is covered
as soon as it registers."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch
from helpers import assert_effect, tiny_runner

from dfkd_bench.registry import SYNTHESIZERS
from dfkd_bench.rundir import CONFIG, METRICS, SAMPLES, STUDENT, SUMMARY, read_metrics

METHODS = [name for name, cls in SYNTHESIZERS.items() if not cls.is_baseline]
POOL_METHODS = [name for name in METHODS if SYNTHESIZERS.get(name).batch_source == "pool"]
FRESH_METHODS = [name for name in METHODS if SYNTHESIZERS.get(name).batch_source == "fresh"]


def test_the_five_methods_are_registered():
    assert {"deepinversion", "cmi", "fast", "fast_meta", "csd"} <= set(METHODS)


@pytest.mark.numeric
@pytest.mark.parametrize("method", METHODS)
def test_one_round_lowers_the_methods_own_synthesis_loss(method, tiny_store, tmp_path):
    # 100 steps, windows of 10: at 40 steps and windows of 5, the fall of Fast's and DFAD's loss moved by
    # a quarter of itself between CPU kernel paths (benchmarks/effect_margins.py)
    overrides = {"method.g_steps": 100}
    if method == "dafl":
        # DAFL's terms are statistics of the batch (the entropy of its mean prediction). On 8 images of the
        # near-uniform tiny teacher its loss starts at its floor (a fall of 0.003 in 2.9, within what kernels
        # move it); a confident teacher (logits x 10, same argmax) and 32 images leave it room to fall.
        overrides["synth_batch_size"] = 32
    runner = tiny_runner(method, tmp_path / "run", tiny_store, overrides)
    if method == "dafl":
        with torch.no_grad():
            runner.teacher.fc.weight.mul_(10)
            runner.teacher.fc.bias.mul_(10)
    runner.method.on_epoch_start(1, warmup=False)
    runner.student.eval().requires_grad_(False)
    batch = runner.method.synthesize()
    curve = batch.loss_curve
    assert len(curve) == 100
    assert_effect(sum(curve[:10]) / 10, sum(curve[-10:]) / 10, "synthesis loss: first 10 steps over last 10")


@pytest.mark.parametrize("method", POOL_METHODS)
def test_the_pool_grows_by_the_synthesis_batch(method, tiny_store, tmp_path):
    runner = tiny_runner(method, tmp_path / "run", tiny_store, {"method.g_steps": 2, "synth_batch_size": 6})
    start = len(runner.pool)
    for round_ in (1, 2):
        runner._synthesize(defaultdict(list))
        assert len(runner.pool) == start + 6 * round_
    assert runner.counters.images == 12 and runner.counters.teacher_passes >= 12 * 2


@pytest.mark.parametrize("method", FRESH_METHODS)
def test_fresh_methods_pool_nothing_and_count_the_batches_the_student_learns_from(method, tiny_store, tmp_path):
    runner = tiny_runner(method, tmp_path / "run", tiny_store,
                         {"method.g_steps": 2, "synth_batch_size": 6, "batch_size": 5, "kd_steps": 1})
    terms = defaultdict(list)
    for _ in (1, 2):
        runner._synthesize(terms)
        runner._distill_step(terms)
    assert len(runner.pool) == 0
    assert runner.counters.images == 2 * 5 and runner.counters.teacher_passes >= 2 * 6 * 2
    assert len(terms["synth/total"]) == 2 and any(k.startswith("kd/") for k in terms)


@pytest.mark.parametrize("method", METHODS)
def test_a_two_round_run_writes_a_complete_folder(method, tiny_store, tmp_path):
    run_dir = tmp_path / "run"
    summary = tiny_runner(method, run_dir, tiny_store,
                          {"method.g_steps": 2, "epochs": 2, "warmup_epochs": 0, "ep_steps": 1, "kd_steps": 1}).run()
    assert summary["status"] == "complete" and summary["images"] == 2 * 8
    for name in (CONFIG, METRICS, SUMMARY, STUDENT, SAMPLES):
        assert (run_dir / name).is_file(), name
    records = read_metrics(run_dir / METRICS)
    assert [r["epoch"] for r in records] == [0, 1]
    assert any(k.startswith("synth/") for k in records[-1]) and any(k.startswith("kd/") for k in records[-1])
