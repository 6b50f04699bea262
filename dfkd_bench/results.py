"""Reading run folders and turning them into comparison tables (pandas does the grouping).

The score is the last epoch's test accuracy, mean +- std over seeds. The best epoch is
chosen on the test set, so it is reported in its own labelled column, never as the score.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from .rundir import CONFIG, METRICS, SUMMARY, read_metrics

GROUP_KEYS = ["dataset", "teacher", "student", "method", "loss", "preset"]


def find_runs(root: Path) -> list[Path]:
    """Every run folder below ``root`` (or ``root`` itself): those with a config or a summary."""
    root = Path(root)
    return sorted({p.parent for name in (CONFIG, SUMMARY) for p in root.rglob(name)})


def load_run(run_dir: Path) -> dict[str, Any] | None:
    """One row for the table, or None (with a warning) if the folder is incomplete or corrupt."""
    if not (run_dir / SUMMARY).is_file():
        warnings.warn(f"skipping {run_dir}: incomplete (no summary.json; still running or interrupted, "
                      "re-run its command to resume)", stacklevel=2)
        return None
    try:
        summary = json.loads((run_dir / SUMMARY).read_text())
        config = json.loads((run_dir / CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        warnings.warn(f"skipping {run_dir}: unreadable run folder ({type(exc).__name__})", stacklevel=2)
        return None
    if not isinstance(summary, dict) or "status" not in summary:
        warnings.warn(f"skipping {run_dir}: summary.json has no status", stacklevel=2)
        return None
    row = {k: config.get(k) for k in GROUP_KEYS}
    row.update({
        "run": str(run_dir),
        "seed": config.get("seed"),
        "status": summary["status"],
        "reason": summary.get("reason"),
        "final_acc": summary.get("final_acc"),
        "best_acc": summary.get("best_acc"),
        "teacher_acc": summary.get("teacher_acc"),
        "images": summary.get("images"),
        "teacher_passes": summary.get("teacher_passes"),
        "synth_seconds": summary.get("synth_seconds"),
        "total_seconds": summary.get("total_seconds"),
        "epochs_done": summary.get("epochs_done"),
    })
    return row


def collect(root: Path, at: tuple[str, float] | None = None) -> pd.DataFrame:
    """One row per run folder below ``root``. With ``at=(budget, limit)``, ``final_acc`` is the
    accuracy of the last epoch that stayed within that budget (read from metrics.jsonl)."""
    rows = []
    for run_dir in find_runs(root):
        row = load_run(run_dir)
        if row is None:
            continue
        if at is not None:
            row["final_acc"], row["at_epoch"] = accuracy_at(read_metrics(run_dir / METRICS), *at)
        rows.append(row)
    return pd.DataFrame(rows)


BUDGET_COLUMNS = {"images": "images", "teacher_passes": "teacher_passes", "seconds": "elapsed_seconds",
                  "synth_seconds": "synth_seconds", "epochs": "epoch"}


def accuracy_at(metrics: list[dict[str, Any]], budget: str, limit: float) -> tuple[float | None, int | None]:
    """Test accuracy after the last epoch whose cumulative ``budget`` was at most ``limit``."""
    column = BUDGET_COLUMNS[budget]
    best: tuple[float | None, int | None] = (None, None)
    for record in metrics:
        used = record.get(column)
        if column == "epoch" and used is not None:
            used += 1  # epochs are 0-based in the records, budgets count them
        if used is not None and used <= limit:
            best = (record["test_acc"], record["epoch"])
    return best


def _fmt_mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "-"
    if len(values) == 1:
        return f"{values.iloc[0]:.2f}"
    return f"{values.mean():.2f} ± {values.std(ddof=1):.2f}"


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, teacher, student, method, loss, preset) over the finished runs."""
    if df.empty:
        return df
    ok = df[df["status"].isin(["complete", "budget"])]
    rows = []
    for key, g in ok.groupby(GROUP_KEYS, sort=True, dropna=False):
        rows.append({
            **dict(zip(GROUP_KEYS, key)),
            "acc (last epoch)": _fmt_mean_std(g["final_acc"]),
            "acc_mean": g["final_acc"].mean(),
            "acc_std": g["final_acc"].std(ddof=1) if len(g) > 1 else float("nan"),
            "n seeds": int(g["seed"].nunique()),
            "best-epoch acc (test-selected)": _fmt_mean_std(g["best_acc"]),
            "teacher acc": f"{g['teacher_acc'].mean():.2f}" if g["teacher_acc"].notna().any() else "-",
            "images": int(g["images"].mean()) if g["images"].notna().any() else 0,
            "synthesis s": round(float(g["synth_seconds"].mean()), 1),
            "total s": round(float(g["total_seconds"].mean()), 1),
        })
    return pd.DataFrame(rows)


DISPLAY_COLUMNS = GROUP_KEYS + ["acc (last epoch)", "n seeds", "best-epoch acc (test-selected)", "teacher acc",
                                "images", "synthesis s", "total s"]


def failed_runs(df: pd.DataFrame) -> pd.DataFrame:
    if df.empty:
        return df
    return df[~df["status"].isin(["complete", "budget"])][["run", "status", "reason"]]


def to_format(table: pd.DataFrame, fmt: str, extra: list[str] | None = None) -> str:
    """The table as csv, markdown or latex, with the display columns plus ``extra``."""
    table = table[[c for c in DISPLAY_COLUMNS + (extra or []) if c in table.columns]]
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "markdown":
        return _markdown(table)
    if fmt == "latex":
        return table.to_latex(index=False, escape=True).replace("±", r"$\pm$")
    raise ValueError(f"unknown format {fmt!r}")


def _markdown(table: pd.DataFrame) -> str:
    """A GitHub table without the optional 'tabulate' dependency."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["collect", "summarize", "to_format", "failed_runs", "find_runs", "load_run", "read_metrics", "METRICS"]
