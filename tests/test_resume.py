"""A run killed with SIGKILL in the middle of an epoch resumes to exactly what an uninterrupted run gives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_runner

from dfkd_bench.registry import SYNTHESIZERS
from dfkd_bench.rundir import CHECKPOINT, MACHINE_FIELDS, METRICS, STUDENT, SUMMARY, read_metrics

TESTS = Path(__file__).resolve().parent

# The child runs the tiny run and parks itself, never to return, right after the first student step
# that follows a checkpoint: the kill lands mid-epoch, with the pool and student ahead of the checkpoint.
CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)  # as the parent (helpers): bitwise-equal floats need the same thread count
    from helpers import tiny_runner
    from dfkd_bench.engine import Runner
    from dfkd_bench.rundir import CHECKPOINT

    run_dir, store, method, overrides = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    marker = run_dir.parent / "mid-epoch"
    step = Runner._distill_step

    def step_then_park(self, terms):
        step(self, terms)
        if (self.run_dir / CHECKPOINT).is_file() and not marker.exists():
            marker.write_text("killed here")
            time.sleep(3600)

    Runner._distill_step = step_then_park
    tiny_runner(method, run_dir, store, overrides).run()
""")


def _resumable_methods() -> list[str]:
    return [name for name, cls in SYNTHESIZERS.items() if not cls.student_is_teacher]


def _overrides(method: str) -> dict:
    values = {"epochs": 3}
    if "g_steps" in SYNTHESIZERS.get(method).Config.__dataclass_fields__:
        values["method.g_steps"] = 2
    return values


def _kill_mid_epoch(method: str, run_dir: Path, store: Path, overrides: dict) -> None:
    script = run_dir.parent / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    marker = run_dir.parent / "mid-epoch"
    child = subprocess.Popen([sys.executable, str(script), str(run_dir), str(store), method, json.dumps(overrides)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not marker.exists():
            if child.poll() is not None:
                pytest.fail(f"the child ended before the kill point: {child.stderr.read().decode()[-2000:]}")
            if time.time() > deadline:
                pytest.fail("the child never reached the kill point")
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("method", _resumable_methods())
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(method, tiny_store, tmp_path):
    overrides = _overrides(method)
    killed = tmp_path / "killed" / "run"
    killed.parent.mkdir()
    _kill_mid_epoch(method, killed, tiny_store, overrides)
    assert (killed / CHECKPOINT).is_file() and not (killed / SUMMARY).exists()
    epochs_before = len(read_metrics(killed / METRICS))
    assert 1 <= epochs_before < overrides["epochs"]

    resumed = tiny_runner(method, killed, tiny_store, overrides)
    summary = resumed.run()
    reference = tiny_runner(method, tmp_path / "reference", tiny_store, overrides).run()

    assert summary["status"] == reference["status"] == "complete"
    assert summary["final_acc"] == reference["final_acc"]
    timing = set(MACHINE_FIELDS)  # seconds and memory: the machine's, not the run's arithmetic
    got = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(killed / METRICS)]
    want = [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(tmp_path / "reference" / METRICS)]
    assert got == want
    for key in ("images", "teacher_passes", "kd_steps", "best_acc", "epochs_done"):
        assert summary[key] == reference[key], key
    a = torch.load(killed / STUDENT, weights_only=True)
    b = torch.load(tmp_path / "reference" / STUDENT, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (killed / CHECKPOINT).exists()
