"""A result is what it was made of, and no input reaches a traceback: the teacher's identity through
resume and compare, one writer per run folder, run-folder integrity, budgets that stop, checkpoints
in the layouts people save, and every file the tool reads checked where it is read."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from helpers import TINY, TINY_CLASSES, TINY_CLI, TINY_SPEC, assert_user_error, tiny_runner
from test_resume import CHILD, TESTS

from dfkd_bench import cli as cli_module
from dfkd_bench.cli import cli
from dfkd_bench.errors import DfkdError
from dfkd_bench.results import collect, failed_runs, summarize
from dfkd_bench.rundir import CHECKPOINT, CONFIG, METRICS, SUMMARY, read_metrics
from dfkd_bench.teachers import (
    TeacherTrainConfig,
    import_teacher,
    load_state_dict,
    teacher_paths,
    train_teacher,
)
from dfkd_bench.zoo import create_model

FAST_RUN = {"method.g_steps": 2, "epochs": 3}


def _store_copy(tiny_store: Path, tmp_path: Path) -> Path:
    """A private copy of the session's teacher store, so a test may replace its teacher."""
    return Path(shutil.copytree(tiny_store, tmp_path / "store"))


def _park_in_epoch_two(run_dir: Path, store: Path) -> subprocess.Popen:
    """A child process that runs the tiny run and parks (holding the folder) after its first checkpoint."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    script = run_dir.parent / "child.py"
    script.write_text(CHILD.format(tests=str(TESTS)))
    child = subprocess.Popen([sys.executable, str(script), str(run_dir), str(store), "deepinversion",
                              json.dumps(FAST_RUN)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not (run_dir.parent / "mid-epoch").exists():
        if child.poll() is not None:
            pytest.fail(f"the child ended early: {child.stderr.read().decode()[-2000:]}")
        if time.time() > deadline:
            child.kill()
            pytest.fail("the child never reached its first checkpoint")
        time.sleep(0.1)
    return child


def _kill(child: subprocess.Popen) -> None:
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=30)


# ---------------------------------------------------------------- one writer, teacher identity, integrity

def test_a_second_process_is_refused_while_the_first_holds_the_folder_and_sigkill_releases_it(tiny_store,
                                                                                               tmp_path):
    run_dir = tmp_path / "run"
    child = _park_in_epoch_two(run_dir, tiny_store)
    try:
        with pytest.raises(DfkdError, match="in use by another dfkd-bench process"):
            tiny_runner("deepinversion", run_dir, tiny_store, FAST_RUN).run()
        assert [r["epoch"] for r in read_metrics(run_dir / METRICS)] == [0]  # the refused process wrote nothing
    finally:
        _kill(child)
    summary = tiny_runner("deepinversion", run_dir, tiny_store, FAST_RUN).run()  # the kernel released the lock
    assert summary["status"] == "complete" and summary["epochs_done"] == 3
    assert [r["epoch"] for r in read_metrics(run_dir / METRICS)] == [0, 1, 2]
    assert not list(run_dir.glob(".*.tmp"))


def test_a_resume_on_a_swapped_teacher_is_refused_naming_both(tiny_store, tmp_path):
    store = _store_copy(tiny_store, tmp_path)
    run_dir = tmp_path / "run"
    _kill(_park_in_epoch_two(run_dir, store))
    before = json.loads(teacher_paths(store, TINY, "wrn16_1")[1].read_text())["sha256"]
    # replacing the stored teacher takes --force now ...
    with pytest.raises(DfkdError, match="already holds sha256"):
        train_teacher(TINY_SPEC, "wrn16_1", TeacherTrainConfig(epochs=1, batch_size=64, lr=0.05, seed=5), store)
    after = train_teacher(TINY_SPEC, "wrn16_1", TeacherTrainConfig(epochs=1, batch_size=64, lr=0.05, seed=5), store,
                          force=True)["sha256"]
    assert after != before
    # ... and a run that started on the old one will not finish on the new one
    with pytest.raises(DfkdError) as refused:
        tiny_runner("deepinversion", run_dir, store, FAST_RUN).run()
    assert before[:12] in str(refused.value) and after[:12] in str(refused.value)
    assert not (run_dir / SUMMARY).exists() and (run_dir / CHECKPOINT).is_file()


def test_teacher_import_refuses_to_replace_a_stored_teacher_without_force(tiny_store, tmp_path):
    store = _store_copy(tiny_store, tmp_path)
    ckpt = teacher_paths(store, TINY, "wrn16_1")[0]
    other = tmp_path / "other.pt"
    torch.save(create_model("wrn16_1", TINY_CLASSES, 3, 16).state_dict(), other)
    before = ckpt.read_bytes()
    args = ["teacher", "import", "--format", "native", str(other), "--arch", "wrn16_1", "--dataset", TINY,
            "--store", str(store)]
    result = CliRunner().invoke(cli, args)
    assert_user_error(result, "already holds sha256", "--force")
    assert ckpt.read_bytes() == before
    assert CliRunner().invoke(cli, args + ["--force"]).exit_code == 0
    assert ckpt.read_bytes() != before


@pytest.mark.parametrize("damage", ["deleted", "duplicated"])
def test_a_resume_checks_the_metrics_against_the_checkpoint(tiny_store, tmp_path, damage):
    run_dir = tmp_path / "run"
    _kill(_park_in_epoch_two(run_dir, tiny_store))
    metrics = run_dir / METRICS
    if damage == "deleted":
        metrics.unlink()
    else:
        metrics.write_text(metrics.read_text() * 2)
    with pytest.raises(DfkdError, match="checkpoint is after epoch 0"):
        tiny_runner("deepinversion", run_dir, tiny_store, FAST_RUN).run()
    assert not (run_dir / SUMMARY).exists()


def test_leftovers_of_a_kill_are_cleaned_when_the_run_starts_again(tiny_store, tmp_path):
    run_dir = tmp_path / "run"
    summary = tiny_runner("deepinversion", run_dir, tiny_store, {"method.g_steps": 2}).run()
    # a kill mid-write and a kill between summary.json and the checkpoint's removal
    (run_dir / f".{CHECKPOINT}.x1y2.tmp").write_bytes(b"partial")
    (run_dir / CHECKPOINT).write_bytes(b"stale")
    again = tiny_runner("deepinversion", run_dir, tiny_store, {"method.g_steps": 2}).run()
    assert again == summary
    assert not list(run_dir.glob(".*.tmp")) and not (run_dir / CHECKPOINT).exists()


# ---------------------------------------------------------------- compare and report

@pytest.fixture(scope="module")
def finished_run(tiny_store, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    tiny_runner("deepinversion", run_dir, tiny_store, {"method.g_steps": 2}).run()
    return run_dir


def _copy_run(src: Path, dest: Path, seed: int, **summary_changes) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / CONFIG).read_text())
    (dest / CONFIG).write_text(json.dumps({**config, "seed": seed}))
    summary = json.loads((dest / SUMMARY).read_text())
    (dest / SUMMARY).write_text(json.dumps({**summary, "seed": seed, **summary_changes}))
    return dest


def test_compare_never_pools_runs_of_two_teacher_checkpoints(finished_run, tmp_path):
    _copy_run(finished_run, tmp_path / "root" / "s0", 0)
    _copy_run(finished_run, tmp_path / "root" / "s1", 1)
    _copy_run(finished_run, tmp_path / "root" / "s2", 2, teacher_sha256="f" * 64, teacher_acc=0.3)
    table = summarize(collect(tmp_path / "root"))
    assert sorted(table["n seeds"]) == [1, 2]
    by_sha = dict(zip(table["teacher sha256"], table["teacher acc"]))
    assert by_sha["f" * 12] == "0.30" and len(by_sha) == 2
    # two checkpoints are two settings, each ranked alone: the two-seed row is the best of its own, the
    # one-seed row has nothing to be tested against (pooled, one of them would have been tested against the other)
    assert sorted(table["best group"]) == ["best", "n/a"]
    markdown = CliRunner().invoke(cli, ["compare", str(tmp_path / "root"), "--format", "markdown"]).stdout
    assert "teacher sha256" in markdown and "ffffffffffff" in markdown


@pytest.mark.parametrize("field, value", [("final_acc", float("inf")), ("final_acc", float("nan")),
                                          ("final_acc", "88.1"), ("teacher_acc", float("-inf"))])
def test_compare_lists_non_finite_or_non_numeric_summaries_apart(finished_run, tmp_path, field, value):
    good = _copy_run(finished_run, tmp_path / "root" / "s0", 0)
    bad = _copy_run(finished_run, tmp_path / "root" / "s1", 1, **{field: value})
    df = collect(tmp_path / "root")
    table = summarize(df)
    assert list(table["n seeds"]) == [1]
    assert table["acc_mean"].iloc[0] == json.loads((good / SUMMARY).read_text())["final_acc"]
    apart = failed_runs(df)
    assert list(apart["run"]) == [str(bad)] and field in apart["reason"].iloc[0]
    result = CliRunner().invoke(cli, ["compare", str(tmp_path / "root")])
    assert result.exit_code == 0 and "not averaged" in result.stderr and field in result.stderr


def test_compare_skips_a_binary_summary_with_a_warning_and_averages_the_rest(finished_run, tmp_path):
    _copy_run(finished_run, tmp_path / "root" / "s0", 0)
    bad = _copy_run(finished_run, tmp_path / "root" / "s1", 1)
    (bad / SUMMARY).write_bytes(b"\x80\x81\xff\x00")
    result = CliRunner().invoke(cli, ["compare", str(tmp_path / "root"), "--format", "csv"])
    assert result.exit_code == 0 and f"skipping {bad}: unreadable" in result.stderr
    assert "Traceback" not in result.output and result.stdout.count("\n") == 2  # header + the one good run


def test_a_resume_refuses_a_metrics_line_that_is_not_a_record(tiny_store, tmp_path):
    run_dir = tmp_path / "run"
    _kill(_park_in_epoch_two(run_dir, tiny_store))
    (run_dir / METRICS).write_text('"epoch 0"\n' + (run_dir / METRICS).read_text())
    with pytest.raises(DfkdError, match="line 1: not an epoch record"):
        tiny_runner("deepinversion", run_dir, tiny_store, FAST_RUN).run()


def test_a_malformed_metrics_file_is_listed_apart_by_compare_at_and_refused_by_report(finished_run, tmp_path):
    _copy_run(finished_run, tmp_path / "root" / "s0", 0)
    bad = _copy_run(finished_run, tmp_path / "root" / "s1", 1)
    (bad / METRICS).write_text('[1, 2]\n' + (bad / METRICS).read_text())
    result = CliRunner().invoke(cli, ["compare", str(tmp_path / "root"), "--at", "epochs=1"])
    assert result.exit_code == 0 and "line 1: not an epoch record" in result.stderr
    report = CliRunner().invoke(cli, ["report", str(tmp_path / "root"), "--output", str(tmp_path / "rep")])
    assert_user_error(report, str(bad / METRICS), "line 1")


def test_report_and_compare_outputs_that_cannot_be_written_are_one_line(finished_run, tmp_path):
    root = tmp_path / "root"
    _copy_run(finished_run, root / "s0", 0)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(CliRunner().invoke(cli, ["report", str(empty), "--output", str(tmp_path / "r")]),
                      "no finished runs")
    assert not (tmp_path / "r").exists()
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me")
    assert_user_error(CliRunner().invoke(cli, ["report", str(root), "--output", str(a_file)]), str(a_file))
    assert a_file.read_text() == "keep me"
    unwritable = "/proc/dfkd-bench/table.md"  # /proc takes no new files, not even as root
    assert_user_error(CliRunner().invoke(cli, ["compare", str(root), "--output", unwritable]), unwritable)


# ---------------------------------------------------------------- budgets

def test_an_epochs_budget_stops_the_schedule_it_does_not_shorten_it(tiny_store, tmp_path):
    overrides = {"method.g_steps": 2, "epochs": 3}
    full = tiny_runner("deepinversion", tmp_path / "full", tiny_store, overrides).run()
    stopped = tiny_runner("deepinversion", tmp_path / "budget", tiny_store, {**overrides, "max_epochs": 2}).run()
    assert full["status"] == "complete" and stopped["status"] == "budget"
    assert stopped["reason"] == "max_epochs=2" and stopped["epochs_done"] == 2
    # the same two epochs as the full run's, learning rate included: a stop, not a 2-epoch cosine
    def untimed(run: str) -> list[dict]:
        records = read_metrics(tmp_path / run / METRICS)
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]

    assert untimed("budget") == untimed("full")[:2]
    # and the CLI's --budget epochs=N is that field, with every preset
    dry = CliRunner().invoke(cli, ["run", "--method", "fast", "--preset", "cpu", "--budget", "epochs=2", "--dry-run"])
    config = json.loads(dry.stdout)
    assert config["max_epochs"] == 2 and config["epochs"] == 10


# ---------------------------------------------------------------- checkpoints people save

def _wrn_state() -> dict[str, torch.Tensor]:
    return create_model("wrn16_1", TINY_CLASSES, 3, 16).state_dict()


@pytest.mark.parametrize("layout", ["module.", "_orig_mod.", "module._orig_mod.", "model", "state_dict", "net",
                                    "model_state_dict"])
def test_checkpoints_in_common_layouts_load(tmp_path, layout):
    state = _wrn_state()
    if layout.endswith("."):
        obj = {layout + k: v for k, v in state.items()}
    else:
        obj = {layout: state, "epoch": 4, "best_acc": 91.5}
    torch.save(obj, tmp_path / "ckpt.pt")
    loaded = load_state_dict(tmp_path / "ckpt.pt")
    assert list(loaded) == list(state) and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_checkpoint_without_weights_names_its_top_level_keys(tmp_path):
    torch.save({"epoch": 4, "optimizer": {"lr": torch.tensor(0.1)}, "weights": [torch.zeros(1)]}, tmp_path / "c.pt")
    with pytest.raises(DfkdError, match="top-level keys are 'epoch', 'optimizer', 'weights'"):
        load_state_dict(tmp_path / "c.pt")


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("payload", [_Payload(), {"state_dict": nn.Linear(2, 2)}])
def test_a_pickle_that_needs_code_is_refused_in_our_words(tmp_path, payload):
    path = tmp_path / "evil.pt"
    if isinstance(payload, _Payload):
        path.write_bytes(pickle.dumps(payload, protocol=2))  # torch.load's own protocol
    else:
        torch.save(payload, path)
    with pytest.raises(DfkdError) as refused:
        load_state_dict(path)
    message = str(refused.value)
    # a bare pickle stops at an opcode the safe unpickler refuses; a torch file that names a class says so
    lead = f"refusing {path}" if isinstance(payload, dict) else f"{path} is not a readable checkpoint"
    assert message.startswith(lead) and "weights_only" not in message and "False" not in message


class _NoBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, TINY_CLASSES)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.mark.parametrize("method", ["deepinversion", "cmi", "fast", "fast_meta", "csd", "nayer", "dfq"])
def test_a_bn_statistics_method_refuses_a_teacher_without_batchnorm(method, tiny_store, tmp_path, monkeypatch):
    monkeypatch.setattr("dfkd_bench.build.load_teacher",
                        lambda *a, **k: (_NoBatchNorm().eval(), {"sha256": "0" * 64, "test_accuracy": 50.0}))
    with pytest.raises(DfkdError, match=f"method '{method}' matches the teacher's BatchNorm statistics.*_NoBatchNorm"):
        tiny_runner(method, tmp_path / "run", tiny_store)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the command line: options and files

@pytest.mark.parametrize("args, fragment", [
    (["--device", "foo"], "unknown device 'foo'"),
    (["--device", "cuda:7"], "cuda:7"),
    (["--set", "synth_batch_size=1000000000000"], "synth_batch_size must be at most"),
    (["--set", "method.lr_g=-1"], "method.lr_g must be a finite, non-negative number"),
    (["--set", "method.g_steps=-5"], "method.g_steps must be a finite number >= 1, got -5"),
    (["--set", "method=cmi"], "choose it with --method"),
    (["--set", "preset=cpu"], "choose it with --preset"),
    (["--dataset", "mnist"], "unknown dataset 'mnist'"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_bad_run_options_are_one_line_and_leave_no_folder(tiny_store, tmp_path, args, fragment, dry_run):
    if args[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    cmd = ["run", "--method", "deepinversion", *TINY_CLI, "--teacher-store", str(tiny_store),
           "--output", str(tmp_path / "out"), *args] + (["--dry-run"] if dry_run else [])
    if dry_run and args[0] == "--device" and args[1] == "cuda:7":
        return  # availability is checked where the run starts (a Ray worker may have the GPU the driver lacks)
    assert_user_error(CliRunner().invoke(cli, cmd), fragment)
    assert not (tmp_path / "out").exists()


def _run_cli(tiny_store, tmp_path, *extra):
    return CliRunner().invoke(cli, ["run", "--method", "deepinversion", *TINY_CLI, "--teacher-store", str(tiny_store),
                                    "--output", str(tmp_path / "out"), "--name", "r", *extra])


@pytest.mark.parametrize("damage", ["binary", "truncated", "a list"])
@pytest.mark.parametrize("target", [SUMMARY, CONFIG])
def test_a_damaged_summary_or_config_in_the_run_folder_is_one_line(tiny_store, tmp_path, target, damage):
    assert _run_cli(tiny_store, tmp_path).exit_code == 0
    path = tmp_path / "out" / "r" / target
    text = path.read_bytes()
    path.write_bytes({"binary": b"\x80\x81\xff\x00", "truncated": text[: len(text) // 2], "a list": b"[1, 2]"}[damage])
    before = {p.name: p.read_bytes() for p in path.parent.iterdir() if p.is_file()}
    assert_user_error(_run_cli(tiny_store, tmp_path), str(path))
    assert {p.name: p.read_bytes() for p in path.parent.iterdir() if p.is_file()} == before
    assert_user_error(_run_cli(tiny_store, tmp_path), str(path))  # the refusal left the folder unlocked


@pytest.mark.parametrize("content", [{}, "another architecture"])
def test_a_foreign_checkpoint_in_the_run_folder_is_one_line(tiny_store, tmp_path, content):
    run_dir = tmp_path / "out" / "r"
    _kill(_park_in_epoch_two(run_dir, tiny_store))
    if content == {}:
        torch.save({}, run_dir / CHECKPOINT)
    else:
        state = torch.load(run_dir / CHECKPOINT, weights_only=True)
        state["student"] = create_model("resnet18", TINY_CLASSES, 3, 16).state_dict()
        torch.save(state, run_dir / CHECKPOINT)
    with pytest.raises(DfkdError, match="cannot resume from .*checkpoint.pt"):
        tiny_runner("deepinversion", run_dir, tiny_store, FAST_RUN).run()


def test_files_the_run_reads_are_checked_where_they_are_read(tiny_store, tmp_path):
    store = _store_copy(tiny_store, tmp_path)
    side = teacher_paths(store, TINY, "wrn16_1")[1]
    side.write_text("{not json")
    assert_user_error(_run_cli(store, tmp_path), str(side), "not a JSON object")
    bank = tmp_path / "bank.pt"
    torch.save([torch.zeros(2, 3, 16, 16)], bank)
    assert_user_error(_run_cli(tiny_store, tmp_path, "--init-bank", str(bank)), str(bank), "not a pool")
    plugin = tmp_path / "broken_plugin.py"
    plugin.write_text("raise RuntimeError('boom at import')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        result = CliRunner().invoke(cli, ["--plugin", "broken_plugin", "methods"])
    finally:
        sys.path.remove(str(tmp_path))
    assert_user_error(result, "plugin 'broken_plugin' raised RuntimeError", "boom at import")


def test_a_failed_checkpoint_write_is_one_line_and_keeps_what_was_written(tiny_store, tmp_path, monkeypatch):
    import dfkd_bench.runtime as runtime

    save = torch.save

    def disk_full(obj, fh, *args, **kwargs):
        if isinstance(obj, dict) and "student" in obj and "epoch" in obj:  # the run's checkpoint
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 980480 vs 980368")
        return save(obj, fh, *args, **kwargs)

    monkeypatch.setattr(runtime.torch, "save", disk_full)
    result = _run_cli(tiny_store, tmp_path)
    assert_user_error(result, "checkpoint.pt", "disk full")
    run_dir = tmp_path / "out" / "r"
    assert (run_dir / CONFIG).is_file() and [r["epoch"] for r in read_metrics(run_dir / METRICS)] == [0]
    assert not list(run_dir.glob(".*.tmp"))


def test_sigterm_ends_the_command_as_ctrl_c_does():
    previous = signal.signal(signal.SIGTERM, cli_module._terminate)
    try:
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_import_teacher_refuses_before_reading_when_force_is_missing(tiny_store, tmp_path):
    store = _store_copy(tiny_store, tmp_path)
    with pytest.raises(DfkdError, match="--force"):
        import_teacher(tmp_path / "does-not-matter.pt", "native", TINY_SPEC, "wrn16_1", store)
