"""Checks every registered method passes, parametrized over the registry: a new method is covered
as soon as it registers."""

from __future__ import annotations

from collections import defaultdict

import pytest
from conftest import tiny_runner

from dfkd_bench.registry import SYNTHESIZERS
from dfkd_bench.rundir import CONFIG, METRICS, SAMPLES, STUDENT, SUMMARY, read_metrics

METHODS = [name for name, cls in SYNTHESIZERS.items() if not cls.is_baseline]


def test_the_five_methods_are_registered():
    assert {"deepinversion", "cmi", "fast", "fast_meta", "csd"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_one_round_lowers_the_methods_own_synthesis_loss(method, tiny_store, tmp_path):
    runner = tiny_runner(method, tmp_path / "run", tiny_store, {"method.g_steps": 40})
    runner.method.on_epoch_start(1, warmup=False)
    runner.student.eval().requires_grad_(False)
    batch = runner.method.synthesize()
    curve = batch.loss_curve
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5, curve


@pytest.mark.parametrize("method", METHODS)
def test_the_pool_grows_by_the_synthesis_batch(method, tiny_store, tmp_path):
    runner = tiny_runner(method, tmp_path / "run", tiny_store, {"method.g_steps": 2, "synth_batch_size": 6})
    start = len(runner.pool)
    for round_ in (1, 2):
        runner._synthesize(defaultdict(list))
        assert len(runner.pool) == start + 6 * round_
    assert runner.counters.images == 12 and runner.counters.teacher_passes >= 12 * 2


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
