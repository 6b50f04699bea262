"""One run across 2 processes (gloo on CPU): the pool, the student, the BN statistics and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from click.testing import CliRunner
from helpers import TINY_CLI, assert_user_error, tiny_runner

from dfkd_bench.cli import cli
from dfkd_bench.distributed import DIST_TIMEOUT_ENV, ShardedPassSampler, dist_timeout, process_group_from_env, spawn
from dfkd_bench.errors import DfkdError
from dfkd_bench.losses import BNStatistics, sync_bn_statistics
from dfkd_bench.pool import SamplePool, quantize
from dfkd_bench.rundir import CHECKPOINT, MACHINE_FIELDS, METRICS, STUDENT, SUMMARY, read_metrics
from dfkd_bench.zoo import create_model

TESTS = Path(__file__).resolve().parent
WORLD = 2
RUN = {"method.g_steps": 2}


@pytest.fixture(scope="module", autouse=True)
def _collective_timeout():
    """A rank that misses a collective fails these tests in minutes, not after torch's 30-minute default
    (the spawned ranks and the torchrun children inherit the variable)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(DIST_TIMEOUT_ENV, os.environ.get(DIST_TIMEOUT_ENV, "240"))
        yield


def _ranks(out_dir: Path, store: Path) -> None:
    """Everything the default tests need from 2 processes, in one launch (starting processes is the slow part)."""
    with process_group_from_env("cpu"):
        _bn_rank(out_dir)
        _run_rank(out_dir / "run", store, out_dir, RUN)
        _odd_batch_rank(store, out_dir)
        _cli_rank(store, out_dir)


@pytest.fixture(scope="module")
def two_ranks(tiny_store, tmp_path_factory) -> Path:
    """The folder where each of 2 gloo processes left its results."""
    out_dir = tmp_path_factory.mktemp("ddp")
    spawn(WORLD, _ranks, out_dir, tiny_store)
    return out_dir


# ---------------------------------------------------------------- BN statistics over ranks

def _bn_problem() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A teacher with non-trivial running statistics and a global batch of 8 images."""
    torch.manual_seed(0)
    model = create_model("wrn16_1", 4, 3, 16).eval().requires_grad_(False)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 0.5
    return model, x, torch.arange(8) % 4


def _bn_losses_and_gradients(model, x, y) -> dict[str, torch.Tensor]:
    """The BN-statistics loss, its input gradient, and the input gradient of BN + (local) CE."""
    x = x.clone().requires_grad_(True)
    stats = BNStatistics(model)
    logits = model(x)
    bn = stats.loss()
    (g_bn,) = torch.autograd.grad(bn, x, retain_graph=True)
    (g_total,) = torch.autograd.grad(bn + F.cross_entropy(logits, y), x)
    stats.remove()
    return {"bn": bn.detach(), "g_bn": g_bn, "g_total": g_total}


def _bn_rank(out_dir: Path) -> None:
    rank = dist.get_rank()
    model, x, y = _bn_problem()
    share = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
    local = _bn_losses_and_gradients(model, x[share], y[share])
    sync_bn_statistics(model)
    synced = _bn_losses_and_gradients(model, x[share], y[share])
    torch.save({"local": local, "synced": synced}, out_dir / f"bn{rank}.pt")


def test_synchronized_bn_statistics_over_two_ranks_equal_one_process_on_the_global_batch(two_ranks):
    model, x, y = _bn_problem()
    whole = _bn_losses_and_gradients(model, x, y)
    for rank in range(WORLD):
        got = torch.load(two_ranks / f"bn{rank}.pt", weights_only=True)
        share = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
        # the default (every reference code base): each rank's own statistics, another loss
        assert not torch.allclose(got["local"]["bn"], whole["bn"], rtol=1e-3)
        synced = got["synced"]
        torch.testing.assert_close(synced["bn"], whole["bn"], rtol=1e-5, atol=1e-6)
        # As SyncBatchNorm, each rank's gradient is world_size times the single-process one, on the BN
        # term alone and with the rank's local mean terms alike (so Adam takes the same step).
        scale = float(WORLD)
        for key in ("g_bn", "g_total"):
            want = scale * whole[key][share]
            torch.testing.assert_close(synced[key], want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


# ---------------------------------------------------------------- a short data-parallel run

def _run_rank(run_dir: Path, store: Path, out_dir: Path, overrides: dict) -> None:
    """One rank of a tiny DeepInversion run; records its own share of every round and the student per epoch."""
    rank = dist.get_rank()
    runner = tiny_runner("deepinversion", run_dir, store, overrides)
    shares = []
    synthesize, evaluate = runner.method.synthesize, runner._evaluate

    def recording_synthesize():
        batch = synthesize()
        shares.append(quantize(batch.images))
        return batch

    def evaluate_and_keep(epoch):
        acc = evaluate(epoch)
        torch.save(runner.student.state_dict(), out_dir / f"student{rank}-epoch{epoch}.pt")
        return acc

    runner.method.synthesize, runner._evaluate = recording_synthesize, evaluate_and_keep
    summary = runner.run()
    torch.save({"summary": summary, "shares": shares, "pool": runner.pool.tensors()[0]}, out_dir / f"run{rank}.pt")


def test_a_two_process_run_shares_one_pool_and_one_student(two_ranks):
    tmp_path, run_dir = two_ranks, two_ranks / "run"
    ranks = [torch.load(tmp_path / f"run{r}.pt", weights_only=False) for r in range(WORLD)]
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert summary["status"] == "complete"
    assert summary["world_size"] == WORLD and summary["global_batch_size"] == 8
    assert ranks[0]["summary"]["final_acc"] == ranks[1]["summary"]["final_acc"] == summary["final_acc"]
    epochs = summary["epochs_done"]
    assert [r["epoch"] for r in read_metrics(run_dir / METRICS)] == list(range(epochs))  # one writer
    for epoch in range(epochs):
        a, b = (torch.load(tmp_path / f"student{r}-epoch{epoch}.pt", weights_only=True) for r in range(WORLD))
        assert all(torch.equal(a[k], b[k]) for k in a), f"the ranks' students differ after epoch {epoch}"
    assert all(torch.equal(v, torch.load(run_dir / STUDENT, weights_only=True)[k]) for k, v in a.items())

    # each rank synthesized its own half of every round; every pool holds both halves, in rank order
    shares = [r["shares"] for r in ranks]
    assert len(shares[0]) == len(shares[1]) == 4 and all(len(s) == 4 for s in shares[0])
    assert not torch.equal(shares[0][0], shares[1][0])
    expected = torch.cat([torch.cat([shares[0][i], shares[1][i]]) for i in range(4)])
    for r in ranks:
        assert torch.equal(r["pool"], expected)
    assert summary["images"] == len(expected) == 32


def test_the_ranks_shard_each_pass_over_the_pool_as_distributed_sampler_does():
    pool = SamplePool()
    pool.add(torch.arange(9, dtype=torch.uint8).view(9, 1, 1, 1))
    samplers = [ShardedPassSampler(torch.Generator().manual_seed(3), r, WORLD) for r in range(WORLD)]
    order = torch.randperm(9, generator=torch.Generator().manual_seed(3)).tolist()
    drawn = [[], []]
    for _ in range(3):  # 9 images padded to 10, 5 per rank: batches of 2, 2 and 1 on each rank
        for r, sampler in enumerate(samplers):
            drawn[r] += sampler.next_batch(pool, 2)[0].flatten().tolist()
    assert drawn[0] == order[0::2] and drawn[1] == order[1::2] + order[:1]  # the pad wraps around
    assert sorted(drawn[0] + drawn[1]) == sorted(list(range(9)) + order[:1])


def _odd_batch_rank(store: Path, out_dir: Path) -> None:
    from dfkd_bench.errors import DfkdError

    try:
        tiny_runner("kd-noise", out_dir / "odd", store, {"batch_size": 7})
    except DfkdError as exc:
        (out_dir / f"refused{dist.get_rank()}").write_text(str(exc))


def test_a_batch_size_the_ranks_cannot_split_is_a_user_error(two_ranks):
    for rank in range(WORLD):
        assert (two_ranks / f"refused{rank}").read_text().startswith("batch_size (7) must be a multiple of the "
                                                                     "number of processes (2)")
    assert not (two_ranks / "odd").exists()


def _cli_rank(store: Path, out_dir: Path) -> None:
    """`dfkd-bench run` in a rank of a process group, as under torchrun."""
    args = ["--plugin", "helpers", "run", "--method", "deepinversion", *TINY_CLI, "--teacher-store", str(store),
            "--output", str(out_dir / "cli"), "--name", "run"]
    result = CliRunner().invoke(cli, args)
    (out_dir / f"cli{dist.get_rank()}.json").write_text(json.dumps([result.exit_code, result.output]))


def test_the_run_command_in_two_ranks_prints_and_writes_once(two_ranks):
    (code0, out0), (code1, out1) = (json.loads((two_ranks / f"cli{r}.json").read_text()) for r in range(WORLD))
    assert code0 == code1 == 0, out0
    assert "final (last-epoch) student accuracy" in out0 and out1 == ""  # only rank 0 prints
    summary = json.loads((two_ranks / "cli" / "run" / SUMMARY).read_text())
    assert summary["world_size"] == WORLD and summary["status"] == "complete"
    assert len(read_metrics(two_ranks / "cli" / "run" / METRICS)) == summary["epochs_done"] == 2


def test_the_collective_timeout_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv(DIST_TIMEOUT_ENV, "90")
    assert dist_timeout().total_seconds() == 90
    monkeypatch.setenv(DIST_TIMEOUT_ENV, " ")
    assert dist_timeout() is None  # torch's own default
    for bad in ("0", "-5", "ten", "inf", "nan"):
        monkeypatch.setenv(DIST_TIMEOUT_ENV, bad)
        with pytest.raises(DfkdError, match=f"must be a positive number of seconds, not '{bad}'"):
            dist_timeout()


def _missing_rank(_out: Path) -> None:
    with process_group_from_env("cpu"):
        if dist.get_rank() == 0:
            dist.barrier()  # rank 1 does not arrive: it is alive, elsewhere
        else:
            time.sleep(300)


def test_a_rank_that_misses_a_collective_ends_the_run_after_the_timeout(monkeypatch, tmp_path):
    monkeypatch.setenv(DIST_TIMEOUT_ENV, "3")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="a data-parallel process failed"):
        spawn(WORLD, _missing_rank, tmp_path)
    assert time.monotonic() - start < 120  # rank 0 gave up after seconds (not 30 minutes), and the others stopped


def test_ddp_under_torchrun_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets
    result = CliRunner().invoke(cli, ["run", "--method", "kd-noise", "--ddp", "2", "--output", str(tmp_path)])
    assert_user_error(result, "--ddp starts its own processes; under torchrun, leave it out")


# ---------------------------------------------------------------- kill, restart, resume

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dfkd_bench", "--plugin", "helpers", "run", "--method", "deepinversion",
            *TINY_CLI, "--set", "epochs=3", *args]


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_under_torchrun_to_the_uninterrupted_result(tiny_store, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    common = ["--teacher-store", str(tiny_store), "--name", "run"]
    reference = subprocess.run(_cli("--ddp", "2", "--output", str(tmp_path / "ref"), *common), env=env,
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed = tmp_path / "killed" / "run"
    child = subprocess.Popen(_cli("--ddp", "2", "--output", str(killed.parent), *common), env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (killed / CHECKPOINT).is_file():
            assert child.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
            time.sleep(0.05)
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the launcher and both ranks at once
        child.wait(timeout=60)
    assert not (killed / SUMMARY).exists() and 1 <= len(read_metrics(killed / METRICS)) < 3

    # restart with torchrun itself: the same run, resumed by both ranks from rank 0's checkpoint
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    resumed = subprocess.run(torchrun + _cli("--output", str(killed.parent), *common)[1:], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stdout and resumed.stdout.count("final (last-epoch)") == 1  # rank 0 prints

    timing = set(MACHINE_FIELDS)  # seconds and memory: the machine's, not the run's arithmetic
    got, want = (
        [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(d / METRICS)]
        for d in (killed, tmp_path / "ref" / "run")
    )
    assert got == want
    a, b = (torch.load(d / STUDENT, weights_only=True) for d in (killed, tmp_path / "ref" / "run"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((killed / SUMMARY).read_text())["world_size"] == 2
