"""benchmarks/gpu_check.py, run on CPU at a tiny budget so that the prepared CUDA check cannot rot: the
same script, runs and table, with autocast (float16 through the GradScaler, and bfloat16) on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import TINY, TINY_RUN

from benchmarks import gpu_check

TESTS = Path(__file__).resolve().parent


def test_the_cuda_check_runs_on_cpu_and_reports_every_run(tiny_store, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))  # the runs' processes import the tiny dataset (helpers)
    sets = [f"{k}={TINY_RUN[k]}" for k in ("ep_steps", "kd_steps", "batch_size", "synth_batch_size")]
    code = gpu_check.main(["--device", "cpu", "--methods", "fast,kd-noise,no-such-method", "--plugin", "helpers",
                           "--dataset", TINY, "--teacher", "wrn16_1", "--student", "wrn16_1", "--teacher-store",
                           str(tiny_store), "--output", str(tmp_path), *[a for kv in sets for a in ("--set", kv)],
                           "--set", "epochs=2", "--set", "warmup_epochs=0", "--jobs", "2"])
    assert code == 1  # the unknown method's runs failed, and the exit status says so
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    order = [(r["method"], r["amp_dtype"]) for r in record["runs"]]
    # two runs at a time, and the rows still come in the order asked for
    assert record["jobs"] == 2 and order == [(m, d) for m in ("fast", "kd-noise", "no-such-method")
                                             for d in ("float16", "bfloat16")]
    rows = dict(zip(order, record["runs"]))
    for method in ("fast", "kd-noise"):
        for dtype in ("float16", "bfloat16"):
            row = rows[method, dtype]
            assert row["status"] == "complete", row
            assert row["amp"] is True and row["rounds"] == 2  # autocast ran; 1 epoch of 2 rounds
            assert row["synth_s_per_round"] >= 0 and row["student_s_per_round"] > 0
            if method == "fast":  # noise costs next to nothing to make
                assert row["synth_s_per_round"] > 0 and row["images_per_s"] > 0
            assert 0 <= row["accuracy"] <= 100 and row["peak_rss_mb"] > 0 and row["peak_cuda_mb"] is None
    bad = rows["no-such-method", "float16"]
    assert bad["status"] == "error" and "unknown method 'no-such-method'" in bad["error"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "with 2 runs sharing the device at a time" in table
    assert "| fast | float16 | complete |" in table and "| no-such-method | bfloat16 | error |" in table


def test_the_check_adds_a_methods_warm_up_epochs_so_that_its_student_steps_run():
    args = gpu_check.argparse.Namespace(set=[], plugin=[], preset="quick")
    assert gpu_check.warmup_epochs("fast", args) == 1  # Fast's quick preset only synthesizes in epoch 1
    assert gpu_check.warmup_epochs("csd", args) == 0
    assert gpu_check.warmup_epochs("no-such-method", args) == 0  # its run reports the error
    args.set = ["warmup_epochs=2", "warmup_epochs=0"]  # the last --set wins, as in a run
    assert gpu_check.warmup_epochs("fast", args) == 0
