"""Statistics over seeds in compare and report: mean ± std, t-interval, n, Welch best group, error bands.

The run folders here are written by hand in the runner's format (config.json, metrics.jsonl,
summary.json), so every accuracy is known and the expected numbers are computed independently.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

from dfkd_bench.cli import cli
from dfkd_bench.errors import DfkdError
from dfkd_bench.report import draw_curves, write_report
from dfkd_bench.results import across_teachers, collect, summarize, to_format
from dfkd_bench.rundir import CONFIG, METRICS, SUMMARY
from dfkd_bench.stats import best_group, estimate, welch_p

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import LineCollection, PathCollection, PolyCollection  # noqa: E402

SETTING = {"dataset": "fashion-mnist", "teacher": "wrn16_2", "student": "wrn16_1", "preset": "cpu"}
IMAGES_PER_EPOCH = 256


def write_run(root: Path, method: str, seed: int, curve: list[float], status: str = "complete",
              loss: str = "kl", reason: str | None = None) -> Path:
    """A run folder as the runner leaves it, whose per-epoch test accuracies are ``curve``."""
    run = root / f"{method}-{loss}-s{seed}-{status}"
    run.mkdir(parents=True)
    (run / CONFIG).write_text(json.dumps({"method": method, "loss": loss, "seed": seed, **SETTING}))
    records = [{"epoch": e, "test_acc": acc, "images": IMAGES_PER_EPOCH * (e + 1), "teacher_passes": 100 * (e + 1),
                "synth_seconds": 10.0 * (e + 1), "elapsed_seconds": 20.0 * (e + 1)} for e, acc in enumerate(curve)]
    (run / METRICS).write_text("".join(json.dumps(r) + "\n" for r in records))
    last = records[-1]
    (run / SUMMARY).write_text(json.dumps({
        "status": status, "reason": reason, "method": method, "loss": loss, "seed": seed, **SETTING,
        "epochs_done": len(curve), "final_acc": curve[-1], "best_acc": max(curve), "teacher_acc": 92.05,
        "images": last["images"], "teacher_passes": last["teacher_passes"], "synth_seconds": last["synth_seconds"],
        "total_seconds": last["elapsed_seconds"]}))
    return run


# Last-epoch accuracies per (method, loss). cmi is the best method; csd overlaps it widely (must be in
# the best group); fast is tight and 4 points lower (must not be); deepinversion has one seed.
FINALS = {
    ("cmi", "kl"): [87.9, 88.6, 88.2],
    ("csd", "csd"): [86.9, 88.7, 87.6],
    ("fast", "kl"): [84.1, 84.3, 83.9],
    ("deepinversion", "kl"): [85.5],
    ("teacher", "kl"): [92.05, 92.05, 92.05],  # a baseline above every method: shown, never the best
}


def _curve(final: float) -> list[float]:
    return [final - 20.0, final - 5.0, final]


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("three_seeds")
    for (method, loss), finals in FINALS.items():
        for seed, final in enumerate(finals):
            write_run(root, method, seed, _curve(final), loss=loss)
    # a failed fast run with a high accuracy: must be listed apart, never averaged
    write_run(root, "fast", 3, [70.0, 99.0], status="failed", reason="non-finite loss kd/kd at epoch 2")
    # an interrupted run: a config and metrics, no summary
    incomplete = write_run(root, "cmi", 4, [10.0])
    (incomplete / SUMMARY).unlink()
    return root


def _welch_by_hand(a: list[float], b: list[float]) -> float:
    """Welch's t and Welch-Satterthwaite degrees of freedom from their formulas; two-sided p."""
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return float(2 * stats.t.sf(abs(t), df))


def _csv(result) -> pd.DataFrame:
    assert result.exit_code == 0, (result.output, result.exception)
    # "n/a" is a value here, not pandas' missing marker
    return pd.read_csv(io.StringIO(result.stdout), keep_default_na=False, na_values=[""]).set_index("method")


# ---------------------------------------------------------------- the statistics themselves

def test_estimate_is_the_t_interval_of_the_mean():
    values = [87.9, 88.6, 88.2]
    est = estimate(values)
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    assert (est.n, est.mean, est.std) == (3, pytest.approx(mean), pytest.approx(std))
    # t(0.975, df=2) = 4.303 from a printed t-table
    assert est.ci_low == pytest.approx(mean - 4.303 * std / math.sqrt(3), abs=1e-3)
    assert est.ci_high == pytest.approx(mean + 4.303 * std / math.sqrt(3), abs=1e-3)


def test_one_value_has_no_spread_and_none_is_invented():
    est = estimate([85.5])
    assert est.n == 1 and est.mean == 85.5
    assert all(math.isnan(v) for v in (est.std, est.ci_low, est.ci_high))
    assert math.isnan(welch_p([85.5], [84.0, 84.2]))


def test_welch_p_matches_the_formula():
    a, b = FINALS[("fast", "kl")], FINALS[("cmi", "kl")]
    assert welch_p(a, b) == pytest.approx(_welch_by_hand(a, b), rel=1e-9)
    assert welch_p([80.0, 80.0], [80.0, 80.0]) == 1.0  # identical constants: no difference
    assert welch_p([80.0, 80.0], [81.0, 81.0]) == 0.0


def test_best_group_marks():
    marks = best_group({k: v for k, v in FINALS.items() if k[0] != "teacher"})
    assert marks[("cmi", "kl")].mark == "best"
    assert marks[("csd", "csd")].mark == "yes" and marks[("csd", "csd")].p >= 0.05
    assert marks[("fast", "kl")].mark == "no" and marks[("fast", "kl")].p < 0.05
    assert marks[("deepinversion", "kl")].mark == "n/a"
    # when the highest mean has one seed, nothing can be tested, not even the runner-up
    lonely = best_group({"a": [90.0], "b": [85.0, 86.0, 85.5], "c": [80.0, 81.0]})
    assert {k: m.mark for k, m in lonely.items()} == {"a": "n/a", "b": "n/a", "c": "n/a"}


# ---------------------------------------------------------------- compare

def test_compare_csv_has_mean_std_ci_n_and_marks(tree):
    result = CliRunner().invoke(cli, ["compare", str(tree), "--format", "csv"])
    table = _csv(result)
    for (method, _), finals in FINALS.items():
        row = table.loc[method]
        assert row["n seeds"] == len(finals)
        assert row["acc_mean"] == pytest.approx(np.mean(finals))
        if len(finals) > 1:
            std = np.std(finals, ddof=1)
            half = stats.t.ppf(0.975, len(finals) - 1) * std / np.sqrt(len(finals))
            assert row["acc (last epoch)"] == f"{np.mean(finals):.2f} ± {std:.2f}"
            assert row["95% CI"] == f"[{np.mean(finals) - half:.2f}, {np.mean(finals) + half:.2f}]"
            assert (row["ci95_low"], row["ci95_high"]) == (pytest.approx(np.mean(finals) - half),
                                                           pytest.approx(np.mean(finals) + half))
    di = table.loc["deepinversion"]
    assert di["acc (last epoch)"] == "85.50 ± n/a" and di["95% CI"] == "n/a"
    assert (di["best group"], di["p vs best"]) == ("n/a", "n/a") and math.isnan(di["acc_std"])
    assert table.loc["cmi", "best group"] == "best"
    assert table.loc["csd", "best group"] == "yes"
    assert table.loc["fast", "best group"] == "no"
    assert table.loc["teacher", "best group"] == "-"  # a reference row, although its mean is the highest
    expected = _welch_by_hand(FINALS[("csd", "csd")], FINALS[("cmi", "kl")])
    assert table.loc["csd", "p_vs_best"] == pytest.approx(expected, rel=1e-9)
    assert table.loc["csd", "p vs best"] == f"{expected:.3f}"


def test_failed_and_incomplete_runs_are_listed_not_averaged(tree):
    result = CliRunner().invoke(cli, ["compare", str(tree), "--format", "csv"])
    fast = _csv(result).loc["fast"]
    assert fast["n seeds"] == 3 and fast["acc_mean"] == pytest.approx(np.mean(FINALS[("fast", "kl")]))
    assert "fast-kl-s3-failed: failed (non-finite loss kd/kd at epoch 2)" in result.stderr
    assert "cmi-kl-s4-complete: incomplete" in result.stderr


def test_a_repeated_seed_is_named(tmp_path):
    write_run(tmp_path / "a", "cmi", 0, [88.0])
    write_run(tmp_path / "b", "cmi", 0, [88.0])
    result = CliRunner().invoke(cli, ["compare", str(tmp_path), "--format", "csv"])
    assert _csv(result).loc["cmi", "n seeds"] == 2
    assert "cpu: several runs share a seed ([0])" in result.stderr


def test_compare_at_a_budget_averages_that_epoch(tree):
    result = CliRunner().invoke(cli, ["compare", str(tree), "--format", "csv", "--at",
                                      f"images={2 * IMAGES_PER_EPOCH}"])
    table = _csv(result)
    second = [_curve(f)[1] for f in FINALS[("csd", "csd")]]
    assert table.loc["csd", "acc_mean"] == pytest.approx(np.mean(second))
    assert table.loc["csd", "acc (last epoch)"] == f"{np.mean(second):.2f} ± {np.std(second, ddof=1):.2f}"
    assert str(table.loc["csd", "epochs at budget"]) == "2" and table.loc["csd", "images"] == 2 * IMAGES_PER_EPOCH
    # below one epoch's images no run has a score: every one is listed apart, none is averaged
    none = CliRunner().invoke(cli, ["compare", str(tree), "--format", "csv", "--at", "images=10"])
    assert none.exit_code == 0
    assert none.stderr.count("no epoch within the --at budget") == sum(len(v) for v in FINALS.values())


def test_compare_table_and_markdown_state_the_test(tree):
    table = CliRunner().invoke(cli, ["compare", str(tree)])
    assert table.exit_code == 0
    assert "Welch's t-test" in table.stdout and "p < 0.05" in table.stdout
    markdown = CliRunner().invoke(cli, ["compare", str(tree), "--format", "markdown"]).stdout
    assert "| cmi | kl | cpu | preset | none | 88.23 ± 0.35 |" in markdown  # mean and std of 87.9, 88.6, 88.2
    assert "Welch's t-test" in markdown.strip().splitlines()[-1]
    assert "Welch's t-test" in CliRunner().invoke(cli, ["compare", str(tree), "--format", "latex"]).stdout


# ---------------------------------------------------------------- report and its error bands

def test_report_tables_carry_the_statistics(tree, tmp_path):
    with pytest.warns(UserWarning, match="incomplete"):
        write_report(tree, tmp_path)
    csv = pd.read_csv(tmp_path / "table.csv").set_index("method")
    assert csv.loc["fast", "best group"] == "no" and csv.loc["cmi", "best group"] == "best"
    assert csv.loc["fast", "kind"] == "method" and csv.loc["teacher", "kind"] == "baseline"
    assert "Welch's t-test" in (tmp_path / "table.md").read_text()
    assert "Welch&#x27;s t-test" in (tmp_path / "index.html").read_text()


def _bands(curves: pd.DataFrame) -> dict[str, np.ndarray]:
    fig, ax = plt.subplots()
    draw_curves(ax, curves, "epoch")
    colors = {line.get_label(): line.get_color() for line in ax.get_lines()}
    bands = {}
    for poly in ax.collections:
        assert isinstance(poly, PolyCollection)
        fill = poly.get_facecolor()[0][:3]
        label = next(k for k, c in colors.items() if np.allclose(matplotlib.colors.to_rgb(c), fill))
        bands[label] = poly.get_paths()[0].vertices
    plt.close(fig)
    return bands


def test_plot_gives_every_label_its_own_colour_beyond_ten_labels():
    labels = [f"method{i:02d}" for i in range(13)]  # ten methods and three baselines, as in the cpu benchmark
    rows = [{"label": label, "seed": 0, "epoch": e, "test_acc": 50.0 + i, "baseline": False}
            for i, label in enumerate(labels) for e in range(3)]
    fig, ax = plt.subplots()
    draw_curves(ax, pd.DataFrame(rows), "epoch")
    colors = {matplotlib.colors.to_hex(line.get_color()) for line in ax.get_lines()}
    plt.close(fig)
    assert len(ax.get_lines()) == 13 and len(colors) == 13


def test_plot_band_is_mean_plus_minus_std_and_one_seed_is_a_plain_line():
    rows = []
    for seed, final in enumerate(FINALS[("cmi", "kl")]):
        rows += [{"label": "cmi", "seed": seed, "epoch": e, "test_acc": a, "baseline": False}
                 for e, a in enumerate(_curve(final))]
    rows += [{"label": "deepinversion", "seed": 0, "epoch": e, "test_acc": a, "baseline": False}
             for e, a in enumerate(_curve(85.5))]
    bands = _bands(pd.DataFrame(rows))
    assert set(bands) == {"cmi (n=3)"}  # deepinversion has one seed: no band
    finals = FINALS[("cmi", "kl")]
    top = np.mean(finals) + np.std(finals, ddof=1)
    bottom = np.mean(finals) - np.std(finals, ddof=1)
    at_last_epoch = bands["cmi (n=3)"][np.isclose(bands["cmi (n=3)"][:, 0], 3.0), 1]
    assert sorted(at_last_epoch)[0] == pytest.approx(bottom) and sorted(at_last_epoch)[-1] == pytest.approx(top)


def test_runs_with_other_settings_are_a_row_of_their_own(tmp_path):
    write_run(tmp_path / "a", "cmi", 0, [88.0])
    write_run(tmp_path / "b", "cmi", 1, [87.0])
    config_path = write_run(tmp_path / "c", "cmi", 2, [60.0]) / CONFIG
    config = json.loads(config_path.read_text())
    config["method_cfg"] = {"g_steps": 3}  # the rest of the method config as the preset has it
    config["lr"] = 0.05
    config_path.write_text(json.dumps(config))
    table = summarize(collect(tmp_path)).set_index("settings")
    assert table.loc["preset", "n seeds"] == 2 and table.loc["preset", "acc_mean"] == 87.5
    assert table.loc["lr=0.05, method.g_steps=3", "n seeds"] == 1


def test_last_k_stability_averages_each_runs_last_epochs_then_the_seeds(tmp_path):
    # seed 0 ends 70, 80, 90 (mean 80, std 10); seed 1 ends 84, 84, 84 (mean 84, std 0)
    write_run(tmp_path, "fast", 0, [10.0, 70.0, 80.0, 90.0])
    write_run(tmp_path, "fast", 1, [20.0, 84.0, 84.0, 84.0])
    df = collect(tmp_path, last_k=3)
    assert sorted(zip(df["last_k_mean"], df["last_k_std"])) == [(80.0, 10.0), (84.0, 0.0)]
    row = summarize(df).iloc[0]
    assert row["last-3 epochs"] == "82.00 ± 5.00" and row["acc (last epoch)"].startswith("87.00")
    one = summarize(collect(tmp_path, last_k=1)).iloc[0]
    assert one["last-1 epochs"] == "87.00 ± 0.00"  # k = 1 is the last epoch, with no swing
    markdown = to_format(summarize(df), "markdown")
    assert "| last-3 epochs |" in markdown.splitlines()[0] and "82.00 ± 5.00" in markdown
    two = CliRunner().invoke(cli, ["compare", str(tmp_path), "--last-k", "2", "--format", "markdown"])
    assert "| last-2 epochs |" in two.stdout and "84.50 ± 3.54" in two.stdout  # (85, 84) ± (7.07, 0) over seeds
    shown = CliRunner().invoke(cli, ["compare", str(tmp_path), "--last-k", "2"])
    plain = CliRunner().invoke(cli, ["compare", str(tmp_path)])
    assert "last-2" in shown.stdout and "last-3" not in plain.stdout  # the terminal shows it on request
    with pytest.raises(DfkdError, match="--last-k must be at least 1"):
        collect(tmp_path, last_k=0)


def _run_on_teacher(root: Path, method: str, teacher: str, seed: int, acc: float) -> None:
    run = root / f"{method}-{teacher}-s{seed}"
    run.mkdir(parents=True)
    setting = {**SETTING, "teacher": teacher}
    (run / CONFIG).write_text(json.dumps({"method": method, "loss": "kl", "seed": seed, **setting}))
    (run / METRICS).write_text(json.dumps({"epoch": 0, "test_acc": acc, "synth_seconds": 1.0}) + "\n")
    (run / SUMMARY).write_text(json.dumps({
        "status": "complete", "method": method, "loss": "kl", "seed": seed, **setting, "epochs_done": 1,
        "final_acc": acc, "best_acc": acc, "teacher_acc": 92.0,
        "teacher_sha256": hashlib.sha256(teacher.encode()).hexdigest(),
        "images": 1, "teacher_passes": 1, "synth_seconds": 1.0, "total_seconds": 1.0}))


def _grid(root: Path, accs: dict[str, dict[str, tuple[float, ...]]]) -> None:
    """One run folder per (method, teacher, seed) with the given final accuracies (seed = position)."""
    for method, per_teacher in accs.items():
        for teacher, values in per_teacher.items():
            for seed, acc in enumerate(values):
                _run_on_teacher(root, method, teacher, seed, float(acc))


def test_across_teachers_averages_teacher_means_and_ranks_over_teachers(tmp_path):
    # per-teacher seed means: cmi 80, 82, 78; fast 79, 81, 70 (pairs differ by 1, 1, 8)
    accs = {"cmi": {"wrn16_2": (79, 81), "wrn16_2@s1": (82, 82), "wrn16_2@s2": (77, 79)},
            "fast": {"wrn16_2": (78, 80), "wrn16_2@s1": (80, 82), "wrn16_2@s2": (70, 70)},
            "teacher": {"wrn16_2": (92, 92)}}
    _grid(tmp_path, accs)
    table = across_teachers(collect(tmp_path)).set_index("method")
    cmi, fast = table.loc["cmi"], table.loc["fast"]
    assert (cmi["mean over teachers"], cmi["spread across teachers"], cmi["n teachers"]) == ("80.00", "2.00", 3)
    assert cmi["worst teacher"] == "78.00 (wrn16_2@s2)" and cmi["seeds per teacher"] == "2,2,2"
    assert (fast["mean over teachers"], fast["worst teacher"]) == ("76.67", "70.00 (wrn16_2@s2)")
    p = stats.ttest_rel([79, 81, 70], [80, 82, 78]).pvalue  # the unit is the teacher
    assert cmi["best group"] == "best" and fast["best group"] == ("no" if p < 0.05 else "yes")
    assert fast["p vs best (paired over teachers)"] == f"{p:.3f}"
    assert table.loc["teacher", "best group"] == "-" and table.loc["teacher", "spread across teachers"] == "n/a"
    assert set(table["teacher arch"]) == {"wrn16_2"}
    markdown = CliRunner().invoke(cli, ["compare", str(tmp_path), "--across", "teachers", "--format", "markdown"])
    assert markdown.exit_code == 0 and "| mean over teachers |" in markdown.stdout
    assert "paired t-test over the teachers" in markdown.stdout


def test_across_teachers_best_is_among_the_methods_with_the_most_teachers(tmp_path):
    # a partial grid: nayer on one teacher only, with the highest mean; cmi and fast on all three
    accs = {"nayer": {"wrn16_2": (95, 95)},
            "cmi": {"wrn16_2": (80, 80), "wrn16_2@s1": (82, 82), "wrn16_2@s2": (78, 78)},
            "fast": {"wrn16_2": (79, 79), "wrn16_2@s1": (81, 81), "wrn16_2@s2": (70, 70)}}
    _grid(tmp_path, accs)
    table = across_teachers(collect(tmp_path)).set_index("method")
    assert table.loc["nayer", "mean over teachers"] == "95.00" and table.loc["nayer", "n teachers"] == 1
    assert table.loc["cmi", "best group"] == "best"
    assert table.loc["nayer", "best group"] == "n/a"  # one shared teacher: nothing to test


def test_the_default_terminal_table_fits_100_columns_and_wide_shows_everything(tree, monkeypatch):
    from dfkd_bench import cli as cli_module

    monkeypatch.setattr(cli_module.console, "width", 100)
    compact = CliRunner().invoke(cli, ["compare", str(tree)])
    lines = compact.stdout.splitlines()
    assert compact.exit_code == 0 and max(len(line) for line in lines) <= 100
    rows = [line for line in lines if line.startswith("│")]
    for method in ("cmi", "csd", "fast", "deepinversion", "teacher"):  # every method whole on its own line
        assert sum(f"│ {method} " in line for line in rows) == 1, compact.stdout
    assert "dataset fashion-mnist" in compact.stdout and "student wrn16_1" in compact.stdout  # shared: the title
    assert "synthesis s" not in compact.stdout and "images" not in compact.stdout  # secondary: --wide only
    monkeypatch.setattr(cli_module.console, "width", 400)
    wide = CliRunner().invoke(cli, ["compare", str(tree), "--wide"])
    header = next(line for line in wide.stdout.splitlines() if line.startswith("┃") and "method" in line)
    assert "synthesis s" in header and "dataset" in header and "images" in header


def test_the_report_plots_each_methods_accuracy_per_teacher(tmp_path):
    from dfkd_bench.report import draw_per_teacher, per_teacher_means

    for method, values in {"cmi": (80.0, 82.0, 84.0), "fast": (70.0, 76.0, 78.0)}.items():
        for teacher, acc in zip(("wrn16_2", "wrn16_2@s1", "wrn16_2@s2"), values):
            for seed, shift in enumerate((-1.0, 1.0)):
                _run_on_teacher(tmp_path / "runs", method, teacher, seed, acc + shift)
    means = per_teacher_means(collect(tmp_path / "runs"))
    (key, per), = means.items()
    assert key == ("fashion-mnist", "wrn16_2", "wrn16_1", "cpu")
    assert sorted(per["fast"].values()) == [70.0, 76.0, 78.0] and len(per["cmi"]) == 3
    fig, ax = plt.subplots()
    draw_per_teacher(ax, per)
    dots = sorted(tuple(map(float, c.get_offsets()[0])) for c in ax.collections if isinstance(c, PathCollection))
    assert dots[:3] == [(0.0, 80.0), (0.0, 82.0), (0.0, 84.0)] and dots[3:] == [(1.0, 70.0), (1.0, 76.0), (1.0, 78.0)]
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]  # the mean over teachers, per method
    assert [round(float(seg[0][1]), 2) for bar in bars for seg in bar.get_segments()] == [82.0, 74.67]
    plt.close(fig)
    written = write_report(tmp_path / "runs", tmp_path / "report")
    assert (tmp_path / "report" / "acc_per_teacher-fashion-mnist-wrn16_2-wrn16_1-cpu.png") in written["plots"]
