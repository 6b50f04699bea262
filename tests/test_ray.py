"""Sweeps on Ray: a 2x2 grid through a local Ray instance gives the local backend's results, resumes an
interrupted run and skips finished ones; the local backend never imports Ray; a missing Ray is one line."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import TINY_RUN, assert_user_error, tiny_runner

from dfkd_bench.cli import cli
from dfkd_bench.rundir import CHECKPOINT, MACHINE_FIELDS, METRICS, STUDENT, SUMMARY, read_metrics

TESTS = Path(__file__).resolve().parent


def _sweep_args(store: Path, output: Path, methods: str = "kd-noise,kd-real", seeds: str = "0,1") -> list[str]:
    args = ["--plugin", "helpers", "sweep", "--methods", methods, "--seeds", seeds, "--dataset", "tiny",
            "--teacher", "wrn16_1", "--student", "wrn16_1", "--teacher-store", str(store), "--output", str(output)]
    for key in ("epochs", "ep_steps", "kd_steps", "batch_size", "synth_batch_size"):
        args += ["--set", f"{key}={TINY_RUN[key]}"]
    return args


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray instance of 2 CPUs whose workers can import the tests' tiny dataset (helpers)."""
    ray = pytest.importorskip("ray", reason="Ray is the optional extra: pip install 'dfkd-bench[ray]'")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), saved]))  # inherited by the workers
    try:
        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    except Exception as exc:  # a sandbox without the sockets or shared memory Ray needs
        pytest.skip(f"a local Ray instance cannot start here: {type(exc).__name__}: {exc}")
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = saved
    yield ray
    ray.shutdown()


def _without_timing(run_dir: Path) -> list[dict]:
    timing = set(MACHINE_FIELDS)  # seconds and memory: the machine's, not the run's arithmetic
    return [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(run_dir / METRICS)]


def _interrupt_after_the_first_epoch(run_dir: Path, store: Path) -> None:
    """Leave ``run_dir`` as a killed sweep run would: a checkpoint after epoch 0, no summary. Epoch 0's
    record gets a marker a resumed run keeps and a restarted one overwrites."""
    runner = tiny_runner("kd-noise", run_dir, store)
    end_epoch = runner._end_epoch

    def end_then_stop(epoch, *args, **kwargs):
        end_epoch(epoch, *args, **kwargs)
        raise KeyboardInterrupt

    runner._end_epoch = end_then_stop
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    (record,) = read_metrics(run_dir / METRICS)
    (run_dir / METRICS).write_text(json.dumps({**record, "synth_seconds": MARK}) + "\n")
    assert (run_dir / CHECKPOINT).is_file() and not (run_dir / SUMMARY).exists()


MARK = 12345.0


def test_a_grid_on_ray_gives_the_local_results_and_a_rerun_skips_it(local_ray, tiny_store, tmp_path):
    interrupted = tmp_path / "ray" / "tiny-wrn16_1-wrn16_1-kd-noise-quick-s0"
    _interrupt_after_the_first_epoch(interrupted, tiny_store)
    # baselines: the cheapest runs (Ray's start-up is what costs here), still trained from seeded batches
    on_ray = CliRunner().invoke(cli, _sweep_args(tiny_store, tmp_path / "ray") + ["--backend", "ray",
                                                                                 "--cpus-per-run", "1"])
    assert on_ray.exit_code == 0, on_ray.output
    progress = re.findall(r"^\[(\d)/4\] (\S+): ([\d.]+)% \(complete, \d+ s\)$", on_ray.stdout, re.M)
    assert sorted(int(i) for i, _, _ in progress) == [1, 2, 3, 4]  # one line per finished run
    assert "runs below" in on_ray.stdout  # the compare table

    local = CliRunner().invoke(cli, _sweep_args(tiny_store, tmp_path / "local"))
    assert local.exit_code == 0, local.output
    names = sorted(p.parent.name for p in (tmp_path / "ray").rglob(SUMMARY))
    assert names == sorted(p.parent.name for p in (tmp_path / "local").rglob(SUMMARY))
    assert names == sorted(name for _, name, _ in progress)
    for name in names:
        a, b = tmp_path / "ray" / name, tmp_path / "local" / name
        assert json.loads((a / SUMMARY).read_text())["status"] == "complete"
        assert _without_timing(a) == _without_timing(b), name
        sa, sb = (torch.load(d / STUDENT, weights_only=True) for d in (a, b))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name

    assert read_metrics(interrupted / METRICS)[0]["synth_seconds"] == MARK  # resumed, not restarted

    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*") if p.is_file()}
    again = CliRunner().invoke(cli, _sweep_args(tiny_store, tmp_path / "ray") + ["--backend", "ray"])
    assert again.exit_code == 0, again.output
    assert again.stdout.count("already complete") == 4
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").rglob("*") if p.is_file()} == stamps


# The local backend in a fresh interpreter: Ray is never imported; then --backend ray without Ray.
CHILD = textwrap.dedent("""
    import json, sys
    from click.testing import CliRunner
    from dfkd_bench.cli import cli
    args = json.loads(sys.argv[1])
    local = CliRunner().invoke(cli, args)
    imported = "ray" in sys.modules
    sys.modules["ray"] = None  # what an installation without the extra sees: import ray fails
    missing = CliRunner().invoke(cli, args + ["--backend", "ray"])
    print(json.dumps({"local": [local.exit_code, local.output], "imported": imported,
                      "missing": [missing.exit_code, missing.stderr]}))
""")


def test_the_local_backend_never_imports_ray_and_a_missing_ray_names_the_extra(tiny_store, tmp_path):
    args = _sweep_args(tiny_store, tmp_path / "runs", methods="kd-noise", seeds="0")
    child = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(TESTS)}, timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["local"][0] == 0, result["local"][1]
    assert not result["imported"]
    code, stderr = result["missing"]
    assert code == 2 and stderr.strip() == "error: --backend ray needs Ray: pip install 'dfkd-bench[ray]'"


def test_ray_options_without_the_ray_backend_are_refused(tiny_store, tmp_path):
    result = CliRunner().invoke(cli, _sweep_args(tiny_store, tmp_path, methods="kd-noise") + ["--gpus-per-run", "1"])
    assert_user_error(result, "--address, --cpus-per-run and --gpus-per-run need --backend ray")
