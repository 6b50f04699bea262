"""``dfkd-bench report``: the comparison a paper can use, from a folder of run folders.

Writes ``table.md``, ``table.csv``, ``table.tex`` (mean ± std, 95% CI, n and the best-group mark, see
:mod:`dfkd_bench.results`); per (dataset, teacher, student) the plots ``acc_vs_epoch-*.png`` and
``acc_vs_synthesis_time-*.png`` (mean over seeds with a ± std band); one sample grid per method under
``samples/``; and ``index.html``, a self-contained page that shows all of it.
"""

from __future__ import annotations

import base64
import html
import shutil
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from .errors import DfkdError  # noqa: E402
from .registry import SYNTHESIZERS  # noqa: E402
from .results import (  # noqa: E402
    FINISHED,
    collect,
    display_columns,
    is_baseline,
    note_for,
    scored_by_teacher,
    summarize,
    to_format,
)
from .rundir import METRICS, SAMPLES, read_metrics  # noqa: E402
from .runtime import atomic_write_bytes  # noqa: E402

PLOT_SIZE = (6.4, 4.8)  # inches; at PLOT_DPI this is 640 x 480 pixels
PLOT_DPI = 100
REFERENCE = "deepinversion"
BASELINE_ORDER = ["teacher", "student-real", "kd-real", "kd-noise"]
EXTRA_COLUMNS = ["kind", "speed-up vs DI"]


def report_table(df: pd.DataFrame) -> pd.DataFrame:
    """The summary table with baselines first and the synthesis speed-up relative to DeepInversion."""
    table = summarize(df)
    if table.empty:
        return table
    setting = ["dataset", "teacher", "teacher sha256", "student", "preset"]
    reference = table[table["method"] == REFERENCE].groupby(setting)["synthesis s"].mean()
    speedups = []
    for _, row in table.iterrows():
        ref = reference.get(tuple(row[k] for k in setting))
        own = row["synthesis s"]
        speedups.append(f"{ref / own:.1f}x" if ref and own and not is_baseline(row["method"]) else "-")
    table["speed-up vs DI"] = speedups
    table["kind"] = ["baseline" if is_baseline(m) else "method" for m in table["method"]]
    order = {m: i for i, m in enumerate(BASELINE_ORDER)}
    table["_order"] = [order.get(m, len(order)) for m in table["method"]]
    table = table.sort_values(setting + ["_order", "method", "loss"]).drop(columns="_order")
    return table.reset_index(drop=True)


def _curves(df: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """Per (dataset, teacher, teacher sha256, student): every finished run's per-epoch records, tagged
    with its label, seed and whether it is a baseline."""
    out: dict[tuple, list[pd.DataFrame]] = {}
    if df.empty:
        return {}
    multi_preset = df["preset"].nunique() > 1
    for _, run in df[df["status"].isin(FINISHED)].iterrows():
        records = pd.DataFrame(read_metrics(Path(run["run"]) / METRICS))
        if records.empty:
            continue
        label = run["method"] if run["loss"] == _default_loss(run["method"]) else f"{run['method']} + {run['loss']}"
        if multi_preset:
            label += f" ({run['preset']})"
        records["label"], records["seed"], records["baseline"] = label, run["seed"], is_baseline(run["method"])
        out.setdefault((run["dataset"], run["teacher"], run["teacher sha256"], run["student"]), []).append(records)
    return {k: pd.concat(v, ignore_index=True) for k, v in out.items()}


def _default_loss(method: str) -> str:
    return SYNTHESIZERS.get(method).default_loss if method in SYNTHESIZERS else "kl"


def draw_curves(ax: plt.Axes, curves: pd.DataFrame, x: str) -> None:
    """Per label, test accuracy against ``x``: the mean over seeds per epoch, with a ± std band (ddof=1)
    where at least two seeds reached that epoch; a single seed is a plain line. Baselines synthesize
    nothing, so off the epoch axis they are a horizontal line at their final accuracy."""
    groups = list(curves.groupby("label", sort=True))
    # by label order, so a method has one colour in every plot of a report; past the default cycle's
    # 10 colours (the cpu benchmark draws 10 methods and 3 baselines), tab20's 20 keep them apart
    palette = [f"C{i}" for i in range(10)] if len(groups) <= 10 else list(plt.get_cmap("tab20").colors)
    for i, (label, g) in enumerate(groups):
        color = palette[i % len(palette)]
        per_epoch = g.groupby("epoch").agg(acc=("test_acc", "mean"), std=("test_acc", "std"),
                                           seeds=("test_acc", "size"), x=(x, "mean"))
        banded = per_epoch[per_epoch["seeds"] > 1]
        name = f"{label} (n={g['seed'].nunique()})"
        if len(per_epoch) == 1 or (x != "epoch" and g["baseline"].any()):
            last = per_epoch.iloc[-1]
            ax.axhline(last["acc"], linestyle="--", linewidth=1, label=name, color=color)
            if last["seeds"] > 1:
                ax.axhspan(last["acc"] - last["std"], last["acc"] + last["std"], alpha=0.15, color=color)
            continue
        offset = 1 if x == "epoch" else 0  # epochs are 0-based in the records, plotted 1-based
        ax.plot(per_epoch["x"] + offset, per_epoch["acc"], marker="o", markersize=3, label=name, color=color)
        if not banded.empty:
            ax.fill_between(banded["x"] + offset, banded["acc"] - banded["std"], banded["acc"] + banded["std"],
                            alpha=0.2, color=color)


def _plot(curves: pd.DataFrame, x: str, xlabel: str, title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=PLOT_SIZE, dpi=PLOT_DPI)
    draw_curves(ax, curves, x)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title} (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=PLOT_DPI)
    plt.close(fig)


def per_teacher_means(df: pd.DataFrame) -> dict[tuple, dict[str, dict[str, float]]]:
    """For each (dataset, teacher architecture, student, preset) run on more than one teacher: method ->
    {teacher (name and sha256's first 12 hex digits): mean final accuracy over its seeds}."""
    ok = scored_by_teacher(df)
    out = {}
    for key, g in ok.groupby(["dataset", "teacher arch", "student", "preset"], sort=True):
        if g["teacher id"].nunique() < 2:
            continue
        out[key] = {m: mg.groupby("teacher id")["final_acc"].mean().to_dict() for m, mg in g.groupby("method")}
    return out


def draw_per_teacher(ax: plt.Axes, means: dict[str, dict[str, float]]) -> None:
    """One column per method: a dot per teacher (a color per teacher, the same in every column) and a bar
    at the mean over teachers."""
    teachers = sorted({t for per in means.values() for t in per})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, per) in enumerate(sorted(means.items())):
        for j, teacher in enumerate(teachers):
            if teacher in per:
                ax.scatter([i], [per[teacher]], color=colors[j % len(colors)], s=18, zorder=3,
                           label=teacher.split(" ")[0] if i == 0 else None)
        ax.hlines(sum(per.values()) / len(per), i - 0.3, i + 0.3, color="black", linewidth=1.5)
    ax.set_xticks(range(len(means)), sorted(means), rotation=30, ha="right", fontsize=8)


def write_report(root: Path, out_dir: Path) -> dict[str, list[Path]]:
    """Write every report file for the runs below ``root``; returns the files by kind."""
    out_dir = Path(out_dir)
    df = collect(root)
    if df.empty:
        raise DfkdError(f"no finished runs below {root}: nothing to report, nothing written")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DfkdError(f"cannot write the report to {out_dir}: {exc.strerror or exc}") from None
    table = report_table(df)
    written: dict[str, list[Path]] = {"tables": [], "plots": [], "samples": []}
    for fmt, name in (("markdown", "table.md"), ("csv", "table.csv"), ("latex", "table.tex")):
        text = to_format(table, fmt, extra=EXTRA_COLUMNS)
        atomic_write_bytes(out_dir / name, text.encode())
        written["tables"].append(out_dir / name)
    all_curves = _curves(df)
    checkpoints = Counter(key[:2] + key[3:] for key in all_curves)  # teacher checkpoints per setting
    for (dataset, teacher, sha, student), curves in all_curves.items():
        tag = f"{dataset}-{teacher}-{student}"
        title = f"{dataset}: {teacher} -> {student}"
        if checkpoints[(dataset, teacher, student)] > 1:  # one plot per teacher checkpoint
            tag, title = f"{tag}-{sha}", f"{title} (teacher {sha})"
        for x, xlabel, stem in (("epoch", "epoch", "acc_vs_epoch"),
                                ("synth_seconds", "cumulative synthesis time (s)", "acc_vs_synthesis_time")):
            path = out_dir / f"{stem}-{tag}.png"
            _plot(curves, x, xlabel, title, path)
            written["plots"].append(path)
    for (dataset, arch, student, preset), means in per_teacher_means(df).items():
        fig, ax = plt.subplots(figsize=PLOT_SIZE, dpi=PLOT_DPI)
        draw_per_teacher(ax, means)
        ax.set_ylabel("test accuracy (%), mean over seeds")
        ax.set_title(f"{dataset}: {arch} teachers -> {student}, {preset} (dots: teachers; bar: their mean)",
                     fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out_dir / f"acc_per_teacher-{dataset}-{arch}-{student}-{preset}.png"
        fig.savefig(path, dpi=PLOT_DPI)
        plt.close(fig)
        written["plots"].append(path)
    finished = df[df["status"].isin(FINISHED)].sort_values("seed") if not df.empty else df
    for method, g in finished.groupby("method") if not finished.empty else []:
        grid = next((Path(r) / SAMPLES for r in g["run"] if (Path(r) / SAMPLES).is_file()), None)
        if grid is not None:
            dest = out_dir / "samples" / f"{method}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, dest)
            written["samples"].append(dest)
    _write_html(out_dir, table, written)
    return written


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(path.stem)}">'


def _write_html(out_dir: Path, table: pd.DataFrame, written: dict[str, list[Path]]) -> None:
    shown = table[display_columns(table, EXTRA_COLUMNS)] if not table.empty else table
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>dfkd-bench report</title><style>",
        "body{font-family:sans-serif;margin:2em;max-width:1400px} table{border-collapse:collapse;font-size:13px}",
        "td,th{border:1px solid #ccc;padding:3px 6px} img{max-width:640px;margin:4px}",
        "</style></head><body><h1>dfkd-bench report</h1>",
        f"<p>{html.escape(note_for(table))} Speed-up: DeepInversion's synthesis time over the method's.</p>",
        shown.to_html(index=False, escape=True, na_rep="-"),
        "<h2>Curves</h2><p>Mean over seeds per epoch; the band is ± one std where two or more seeds reached "
        "the epoch; n in the legend.</p>", *(_img(p) for p in written["plots"]),
        "<h2>Synthetic samples (last batches of one seed)</h2>",
        *(f"<figure>{_img(p)}<figcaption>{html.escape(p.stem)}</figcaption></figure>" for p in written["samples"]),
        "</body></html>",
    ]
    atomic_write_bytes(out_dir / "index.html", "\n".join(parts).encode())
