"""The command line: methods, run, compare and teacher commands; user errors are one line and exit code 2."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import TINY, TINY_CLI, assert_user_error

from dfkd_bench.cli import cli
from dfkd_bench.registry import SYNTHESIZERS
from dfkd_bench.rundir import read_metrics

BIN = Path(sys.executable).parent / "dfkd-bench"



def invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _table_rows(text: str) -> dict[str, list[str]]:
    """The cells of a rich table, per row, keyed by the first column (wrapped cells joined)."""
    rows: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if not line.startswith("│"):
            current = None if not line.strip() else current
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        if cells[0]:
            current = cells[0]
            rows[current] = cells
        elif current is not None:
            rows[current] = [f"{a} {b}".strip() for a, b in zip(rows[current], cells)]
    return rows


# ---------------------------------------------------------------- methods

def test_methods_lists_every_method_with_its_summary():
    result = invoke("methods")
    assert result.exit_code == 0, result.output
    methods_part, _, losses_part = result.stdout.partition("distillation losses")
    rows = _table_rows(methods_part)
    assert set(rows) == set(SYNTHESIZERS.names())
    for name, cls in SYNTHESIZERS.items():
        assert rows[name][1] == cls.summary
    assert rows["deepinversion"][1] == SYNTHESIZERS.get("deepinversion").summary
    assert rows["deepinversion"][2] == "none"  # what it uses besides the teacher
    assert rows["deepinversion"][3] == "kl"
    assert "quick" in rows["deepinversion"][4] and "paper" in rows["deepinversion"][4]
    assert "g_steps=1000" in rows["deepinversion"][5]  # the published default, not a preset's
    assert "kl" in _table_rows(losses_part)


# ---------------------------------------------------------------- user errors

def test_unknown_method_suggests_the_close_name():
    line = assert_user_error(invoke("run", "--method", "deepinversio"), "unknown method 'deepinversio'")
    assert "did you mean 'deepinversion'?" in line


def test_unknown_dataset(tmp_path):
    assert_user_error(invoke("run", "--method", "deepinversion", "--dataset", "no_such_data",
                             "--output", tmp_path), "unknown dataset 'no_such_data'")


def test_unknown_preset(tmp_path):
    assert_user_error(invoke("run", "--method", "deepinversion", "--preset", "nope", "--output", tmp_path),
                      "unknown preset for deepinversion 'nope'")


@pytest.mark.parametrize("option", ["--teacher", "--student"])
def test_unknown_model(option, tiny_store, tmp_path):
    args = ["run", "--method", "deepinversion", *TINY_CLI, "--teacher-store", tiny_store, "--output", tmp_path]
    args[args.index(option) + 1] = "wrnn16_1"
    line = assert_user_error(invoke(*args), "unknown model 'wrnn16_1'")
    assert "did you mean" in line and "'wrn16_1'" in line


@pytest.mark.parametrize("assignment,fragment", [
    ("no_such_key=1", "unknown setting 'no_such_key'"),
    ("method.no_such=1", "unknown setting of method deepinversion"),
    ("epochs=abc", "--set epochs=abc: expected a value of type int"),
    ("epochs=0", "epochs must be positive"),
    ("epochs", "--set takes key=value"),
])
def test_bad_set_values(assignment, fragment, tmp_path):
    assert_user_error(invoke("run", "--method", "deepinversion", "--set", assignment, "--output", tmp_path),
                      fragment)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_dry_run_prints_the_resolved_config_and_writes_nothing(tmp_path):
    result = invoke("run", "--method", "zskt", "--preset", "paper", "--seed", "3", "--set", "epochs=7", "--dry-run",
                    "--teacher-store", tmp_path / "no_store", "--output", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    cfg = json.loads(result.stdout)
    assert (cfg["method"], cfg["preset"], cfg["seed"], cfg["epochs"]) == ("zskt", "paper", 3, 7)
    assert (cfg["optimizer"], cfg["grad_clip"], cfg["loss"]) == ("adam", 5.0, "zskt")  # the preset, resolved
    assert cfg["method_cfg"]["nz"] == 100 and cfg["loss_cfg"]["beta"] == 250.0
    assert cfg["run_dir"] == str(tmp_path / "runs" / "fashion-mnist-wrn16_2-wrn16_1-zskt-paper-s3")
    assert not any(tmp_path.iterdir())  # no teacher trained, no folder made


def test_dry_run_refuses_a_bad_setting_like_a_run(tmp_path):
    assert_user_error(invoke("run", "--method", "dafl", "--set", "lr_schedule=step", "--dry-run",
                             "--output", tmp_path), "lr_schedule=step needs lr_milestones")


def test_missing_teacher_with_no_train_teacher_says_how_to_train_it(tmp_path):
    store = tmp_path / "empty_store"
    store.mkdir()
    line = assert_user_error(invoke("run", "--method", "deepinversion", "--dataset", TINY, "--teacher", "wrn16_2",
                                    "--teacher-store", store, "--output", tmp_path / "out", "--no-train-teacher"))
    assert "dfkd-bench teacher train --dataset tiny --arch wrn16_2" in line
    assert not any(store.iterdir()) and not (tmp_path / "out").exists()


def test_compare_on_an_empty_or_missing_folder(tmp_path):
    assert_user_error(invoke("compare", tmp_path), "no finished runs")
    assert_user_error(invoke("compare", tmp_path / "absent"), "does not exist")


@pytest.mark.slow  # a fresh interpreter imports torch and timm: several seconds each
@pytest.mark.parametrize("args,fragment", [
    (["run", "--method", "deepinversio"], "did you mean 'deepinversion'?"),
    (["run", "--method", "deepinversion", "--set", "epochs=abc"], "expected a value of type int"),
])
def test_installed_command_prints_one_line_without_traceback(args, fragment, tmp_path):
    if not BIN.is_file():
        pytest.skip(f"{BIN} is not installed")
    proc = subprocess.run([str(BIN), *args, "--output", str(tmp_path)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


# ---------------------------------------------------------------- a full run, then compare

@pytest.fixture(scope="module")
def cli_run(tiny_store, tmp_path_factory) -> tuple[Path, Path, dict]:
    output = tmp_path_factory.mktemp("cli_runs")
    result = CliRunner().invoke(cli, ["run", "--method", "deepinversion", *TINY_CLI,
                                      "--teacher-store", str(tiny_store), "--output", str(output)])
    assert result.exit_code == 0, (result.output, result.exception)
    run_dir = output / f"{TINY}-wrn16_1-wrn16_1-deepinversion-quick-s0"
    summary = json.loads((run_dir / "summary.json").read_text())
    return output, run_dir, summary


def test_run_writes_a_complete_run_folder(cli_run):
    _, run_dir, summary = cli_run
    assert summary["status"] == "complete" and summary["epochs_done"] == 2
    config = json.loads((run_dir / "config.json").read_text())
    assert config["method_cfg"]["g_steps"] == 2 and config["synth_batch_size"] == 8
    assert (run_dir / "student.pt").is_file() and (run_dir / "samples.png").is_file()


def test_compare_markdown_has_the_run_row(cli_run):
    output, _, summary = cli_run
    result = invoke("compare", output, "--format", "markdown")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("| dataset | teacher | student | method |")
    # one seed: the score has no spread, no interval and no significance mark
    # the tiny run's --set values differ from the quick preset: they are named, so variants never pool
    settings = "batch_size=8, ep_steps=2, epochs=2, kd_steps=1, synth_batch_size=8, method.g_steps=2"
    row = (f"| {TINY} | wrn16_1 | wrn16_1 | deepinversion | kl | quick | {settings} | none | "
           f"{summary['final_acc']:.2f} ± n/a | n/a | 1 | n/a |")
    assert sum(line.startswith(row) for line in lines) == 1
    assert len(lines) == 5  # header, separator, one row, a blank line, the note on the statistics
    assert "Welch's t-test" in lines[-1]


def test_compare_csv_to_a_file(cli_run, tmp_path):
    output, _, summary = cli_run
    target = tmp_path / "table.csv"
    result = invoke("compare", output, "--format", "csv", "--output", target)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(target.read_text().splitlines()))
    assert len(rows) == 1
    row = rows[0]
    assert row["method"] == "deepinversion" and row["dataset"] == TINY
    assert row["acc (last epoch)"] == f"{summary['final_acc']:.2f} ± n/a" and row["95% CI"] == "n/a"
    assert float(row["acc_mean"]) == summary["final_acc"]
    assert row["teacher acc"] == f"{summary['teacher_acc']:.2f}"
    assert int(row["images"]) == summary["images"]


def test_compare_latex_has_the_run_row(cli_run):
    output, _, summary = cli_run
    result = invoke("compare", output, "--format", "latex")
    assert result.exit_code == 0, result.output
    assert r"\begin{tabular}" in result.stdout and r"\end{tabular}" in result.stdout
    row = [line for line in result.stdout.splitlines() if "deepinversion" in line]
    assert len(row) == 1
    assert f"{summary['final_acc']:.2f}" in row[0] and row[0].rstrip().endswith(r"\\")


def test_compare_latex_escapes_underscores(cli_run):
    output, _, _ = cli_run
    result = invoke("compare", output, "--format", "latex")
    row = next(line for line in result.stdout.splitlines() if "deepinversion" in line)
    assert "wrn16\\_1" in row


def test_compare_table_lists_the_run(cli_run):
    output, _, summary = cli_run
    result = invoke("compare", output, "--wide")  # every column, the dataset first
    assert result.exit_code == 0, result.output
    rows = _table_rows(result.stdout)
    assert rows[TINY][3] == "deepinversion"
    assert rows[TINY][7] == f"{summary['final_acc']:.2f} ± n/a"


def test_every_epoch_and_the_summary_record_peak_memory(cli_run):
    output, run_dir, summary = cli_run
    records = read_metrics(run_dir / "metrics.jsonl")
    assert all(r["peak_rss_mb"] > 10 for r in records) and all("peak_cuda_mb" not in r for r in records)
    assert summary["peak_rss_mb"] == max(r["peak_rss_mb"] for r in records) and summary["peak_cuda_mb"] is None
    plain, shown = invoke("compare", output, "--wide"), invoke("compare", output, "--memory", "--wide")
    assert "peak RSS" not in plain.stdout and "peak RSS" in shown.stdout  # (the header may wrap)
    assert "peak CUDA" not in shown.stdout  # no run measured one
    assert _table_rows(shown.stdout)[TINY][-1] == f"{summary['peak_rss_mb']:.0f}"
    markdown = invoke("compare", output, "--format", "markdown").stdout
    assert "peak RSS MiB" in markdown.splitlines()[0] and "side information" in markdown.splitlines()[0]


def test_peak_memory_reads_and_resets_the_cuda_peak_per_call(monkeypatch):
    from dfkd_bench import runtime

    peaks, resets = iter([3 * 2**20, 2**21]), []
    monkeypatch.setattr(runtime.torch.cuda, "max_memory_allocated", lambda device: next(peaks))
    monkeypatch.setattr(runtime.torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device))
    gpu = torch.device("cuda", 0)
    first, second = runtime.peak_memory(gpu), runtime.peak_memory(gpu)
    assert (first["peak_cuda_mb"], second["peak_cuda_mb"]) == (3.0, 2.0) and resets == [gpu, gpu]
    assert first["peak_rss_mb"] <= second["peak_rss_mb"]  # a high-water mark never goes down
    assert "peak_cuda_mb" not in runtime.peak_memory(torch.device("cpu"))


# ---------------------------------------------------------------- teachers

def test_teacher_list_shows_the_stored_teacher(tiny_store):
    sidecar = json.loads((tiny_store / TINY / "wrn16_1.json").read_text())
    result = invoke("teacher", "list", "--store", tiny_store)
    assert result.exit_code == 0, result.output
    rows = _table_rows(result.stdout)
    assert rows[TINY][1] == "wrn16_1" and rows[TINY][2] == "-"  # no variant
    assert rows[TINY][3] == f"{sidecar['test_accuracy']:.2f}"
    assert rows[TINY][5] == sidecar["sha256"][:12]


def test_teacher_list_on_an_empty_store(tmp_path):
    result = invoke("teacher", "list", "--store", tmp_path)
    assert result.exit_code == 0
    assert "no teachers" in result.stdout
