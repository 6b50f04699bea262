"""Reading run folders and turning them into comparison tables (pandas does the grouping).

The score is the last epoch's test accuracy: mean ± std over seeds, n, and the 95% t-interval
of the mean. Per setting, each method is tested against the best one (Welch's t-test, see
:mod:`dfkd_bench.stats`). The best epoch is chosen on the test set, so it is reported in its own
labelled column, never as the score. Failed runs, and summaries whose numbers are not finite
or not numbers, are listed apart and never averaged. Runs distilled from different teacher
checkpoints (told apart by the teacher's sha256) are never averaged or ranked together.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from .errors import DfkdError
from .registry import SYNTHESIZERS, load_plugins
from .rundir import CONFIG, LAST_K, MEMORY_FIELDS, METRICS, SUMMARY, read_metrics, without_idle_amp
from .stats import ALPHA, CONFIDENCE, NA, Estimate, Mark, best_group, estimate

# "settings" lists what a run changed relative to its preset (--set values), so variants are never averaged
# together; "teacher sha256" (its first 12 hex digits) keeps apart runs of two checkpoints of one architecture
GROUP_KEYS = ["dataset", "teacher", "student", "method", "loss", "preset", "settings", "teacher sha256"]
# methods are ranked against each other within one setting
SETTING_KEYS = ["dataset", "teacher", "teacher sha256", "student", "preset"]
FINISHED = ("complete", "budget")
MALFORMED = "malformed"  # a summary whose numbers cannot be scored (not finite, not numbers)
# summary fields that are averaged: each must be a finite number (or absent/null)
_NUMERIC_FIELDS = ("final_acc", "best_acc", "teacher_acc", "images", "teacher_passes", "synth_seconds",
                   "total_seconds", "epochs_done")


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
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8 (a binary file), or not JSON
        warnings.warn(f"skipping {run_dir}: unreadable run folder ({type(exc).__name__})", stacklevel=2)
        return None
    if not isinstance(summary, dict) or "status" not in summary or not isinstance(config, dict):
        warnings.warn(f"skipping {run_dir}: summary.json has no status", stacklevel=2)
        return None
    row = {k: config.get(k) for k in GROUP_KEYS}
    row["settings"] = settings_beyond_preset(config, summary.get("amp"))
    row["side information"] = side_information(config)
    sha = summary.get("teacher_sha256")
    row["teacher sha256"] = sha[:12] if isinstance(sha, str) and sha else "?"  # "?": a summary that lacks it
    status, reason = summary["status"], summary.get("reason")
    bad = [k for k in _NUMERIC_FIELDS if not _finite_or_none(summary.get(k))]
    if bad:  # listed with the failed runs, never averaged
        status, reason = MALFORMED, f"summary.json: {', '.join(bad)} not a finite number"
    row.update({
        "run": str(run_dir),
        "seed": config.get("seed"),
        "status": status,
        "reason": reason,
        "final_acc": summary.get("final_acc"),
        "best_acc": summary.get("best_acc"),
        "teacher_acc": summary.get("teacher_acc"),
        "images": summary.get("images"),
        "teacher_passes": summary.get("teacher_passes"),
        "synth_seconds": summary.get("synth_seconds"),
        "total_seconds": summary.get("total_seconds"),
        "epochs_done": summary.get("epochs_done"),
        **{k: summary.get(k) for k in MEMORY_FIELDS},  # absent in summaries written before they were recorded
    })
    return row


def side_information(config: dict[str, Any]) -> str:
    """What a run's method used besides the teacher (``Synthesizer.side_information``); '?' when its method
    is not registered here."""
    load_plugins()
    try:
        return SYNTHESIZERS.get(config["method"]).side_information(config.get("method_cfg") or {})
    except Exception:  # an unknown method (a plugin not loaded), or a config.json of another version
        return "?"


def _finite_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value))


# Run fields that say where or how a run ran, not what it computed, or that are grouped on already.
# selection_images changes no trained number (selection.py restores the method and RNGs; tests/test_selection.py),
# and the teacher's source is told apart by its sha256.
_NOT_SETTINGS = {"method", "dataset", "teacher", "student", "preset", "loss", "seed", "device", "eval_batch_size",
                 "teacher_checkpoint", "method_cfg", "loss_cfg", "selection_images", "teacher_pretrained",
                 "teacher_weights"}


def settings_beyond_preset(config: dict[str, Any], autocast: bool | None = None) -> str:
    """What ``config`` (a run's config.json) sets differently from its preset, as ``key=value`` pairs;
    ``""`` when it is the preset as it stands today, ``"?"`` when the preset cannot be resolved here.
    ``autocast`` is whether the run ran under autocast (its summary's ``amp``): when it did not, the AMP
    fields changed no number and are not differences (a CPU run's ``amp=true`` from before amp was off)."""
    from .config import resolve_config

    try:
        load_plugins()
        fields = {k: config[k] for k in ("dataset", "teacher", "student") if k in config}
        ref, _, _ = resolve_config(config["method"], config["preset"], {"loss": config.get("loss") or ""}, **fields)
    except Exception:  # an unknown method or preset (a plugin not loaded, a renamed preset)
        return "?"
    ref_dict = json.loads(json.dumps(ref.to_dict(), default=str))  # tuples -> lists, as on disk
    if autocast is False:
        config = without_idle_amp(config, False)
    diff = [f"{k}={config[k]}" for k in sorted(config)
            if k not in _NOT_SETTINGS and k in ref_dict and config[k] != ref_dict[k]]
    for part in ("method_cfg", "loss_cfg"):
        ours, theirs = config.get(part) or {}, ref_dict.get(part) or {}
        # a key today's code no longer has is a difference too (the run used a setting that is gone)
        diff += [f"{part[:-4]}.{k}={ours[k]}" for k in sorted(ours) if k not in theirs or ours[k] != theirs[k]]
    return ", ".join(diff)


def collect(root: Path, at: tuple[str, float] | None = None, last_k: int = LAST_K) -> pd.DataFrame:
    """One row per run folder below ``root``. With ``at=(budget, limit)``, the accuracy, best accuracy
    and counters are those of the last epoch that stayed within that budget (read from metrics.jsonl);
    a run with no such epoch gets no score. Each finished run also gets ``last_k_mean`` and ``last_k_std``:
    the mean and sample std of its last ``last_k`` epochs' test accuracy (within the budget, with ``at``);
    None when its metrics cannot be read."""
    if last_k < 1:
        raise DfkdError(f"--last-k must be at least 1, got {last_k}")
    rows = []
    for run_dir in find_runs(root):
        row = load_run(run_dir)
        if row is None:
            continue
        try:
            records = read_metrics(run_dir / METRICS) if row["status"] in FINISHED or at is not None else []
            if at is not None:
                records = within_budget(records, *at)
                row.update(_row_at(records))
        except DfkdError as exc:  # listed with the failed runs, never averaged
            if at is not None:
                row.update(status=MALFORMED, reason=str(exc), final_acc=None)
            records = []
        row.update(_last_k(records, last_k))
        row.update(data_free_pick(records))
        rows.append(row)
    return pd.DataFrame(rows)


def data_free_pick(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The data-free checkpoint rule (selection.py) applied after the fact: the epoch whose student agreed most
    with the teacher on the run's held-out synthetic images (the latest on a tie) and that epoch's test
    accuracy; None for both when the run recorded no agreement (``selection_images`` off)."""
    scored = [r for r in records if isinstance(r.get("selection_agreement"), (int, float))
              and isinstance(r.get("test_acc"), (int, float))]
    if not scored:
        return {"selected_epoch": None, "selected_acc": None}
    best = max(scored, key=lambda r: (r["selection_agreement"], r["epoch"]))
    return {"selected_epoch": best["epoch"], "selected_acc": best["test_acc"]}


def _last_k(records: list[dict[str, Any]], k: int) -> dict[str, Any]:
    accs = [r["test_acc"] for r in records[-k:] if isinstance(r.get("test_acc"), (int, float))]
    if not accs:
        return {"last_k_mean": None, "last_k_std": None, "last_k": k}
    mean = sum(accs) / len(accs)
    std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
    return {"last_k_mean": mean, "last_k_std": std, "last_k": k}


BUDGET_COLUMNS = {"images": "images", "teacher_passes": "teacher_passes", "seconds": "elapsed_seconds",
                  "synth_seconds": "synth_seconds", "epochs": "epoch"}


def within_budget(metrics: list[dict[str, Any]], budget: str, limit: float) -> list[dict[str, Any]]:
    """The per-epoch records whose cumulative ``budget`` was at most ``limit``."""
    column = BUDGET_COLUMNS[budget]
    out = []
    for record in metrics:
        used = record.get(column)
        if column == "epoch" and used is not None:
            used += 1  # epochs are 0-based in the records, budgets count them
        if used is not None and used <= limit:
            out.append(record)
    return out


def _row_at(within: list[dict[str, Any]]) -> dict[str, Any]:
    if not within:
        return {"final_acc": None, "best_acc": None, "at_epoch": None}
    last = within[-1]
    return {"final_acc": last["test_acc"], "at_epoch": last["epoch"],
            "best_acc": max(r["test_acc"] for r in within),
            "images": last.get("images"), "teacher_passes": last.get("teacher_passes"),
            "synth_seconds": last.get("synth_seconds"), "total_seconds": last.get("elapsed_seconds"),
            **{k: max((r[k] for r in within if r.get(k) is not None), default=None) for k in MEMORY_FIELDS}}


# summary field -> column: a run's largest epoch peak (runtime.peak_memory), averaged over its seeds
MEMORY_COLUMNS = {"peak_rss_mb": "peak RSS MiB", "peak_cuda_mb": "peak CUDA MiB"}


def _fmt_mb(values: pd.Series) -> str:
    """Mean of the runs that measured it, rounded to whole MiB; '-' when none did (CPU runs have no CUDA peak)."""
    measured = pd.to_numeric(values, errors="coerce").dropna()
    return f"{measured.mean():.0f}" if len(measured) else "-"


def is_baseline(method: str) -> bool:
    """A reference row (teacher, real-data and noise baselines): shown, never ranked."""
    return method in SYNTHESIZERS and getattr(SYNTHESIZERS.get(method), "is_baseline", False)


def _fmt_mean_std(est: Estimate) -> str:
    if est.n == 0:
        return "-"
    return f"{est.mean:.2f} ± {NA if est.n < 2 else f'{est.std:.2f}'}"


def _fmt_ci(est: Estimate) -> str:
    return NA if est.n < 2 else f"[{est.ci_low:.2f}, {est.ci_high:.2f}]"


def _fmt_p(mark: Mark | None) -> str:
    if mark is None or mark.mark == "best":
        return "-"
    if mark.mark == NA:
        return NA
    return "<0.001" if mark.p < 0.001 else f"{mark.p:.3f}"


def _scored(df: pd.DataFrame) -> pd.DataFrame:
    """Finished runs that have a score: the only ones averaged."""
    return df[df["status"].isin(FINISHED) & df["final_acc"].notna()]


def _epoch_span(at_epochs: pd.Series) -> str:
    first, last = int(at_epochs.min()) + 1, int(at_epochs.max()) + 1  # shown 1-based, as budgets count
    return str(first) if first == last else f"{first}-{last}"


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, teacher, student, method, loss, preset) over the finished runs: mean ± std,
    95% t-interval, n, and the best-group mark of each method within its setting."""
    if df.empty:
        return df
    load_plugins()  # baselines are told apart through the registry
    ok = _scored(df)
    rows, samples = [], []
    for key, g in ok.groupby(GROUP_KEYS, sort=True, dropna=False):
        repeated = sorted(g["seed"][g["seed"].duplicated()].unique().tolist())
        if repeated:
            name = "/".join(str(v) for k, v in zip(GROUP_KEYS, key) if v and k != "teacher sha256")
            warnings.warn(f"{name}: several runs share a seed ({repeated}); each is counted in n", stacklevel=2)
        score = estimate(g["final_acc"].tolist())
        row = {
            **dict(zip(GROUP_KEYS, key)),
            "settings": key[GROUP_KEYS.index("settings")] or "preset",
            "side information": g["side information"].iloc[0] if "side information" in g else "?",
            "acc (last epoch)": _fmt_mean_std(score),
            "95% CI": _fmt_ci(score),
            "n seeds": score.n,
            "best-epoch acc (test-selected)": _fmt_mean_std(estimate(g["best_acc"].dropna().tolist())),
            "teacher acc": f"{g['teacher_acc'].mean():.2f}" if g["teacher_acc"].notna().any() else "-",
            "images": int(g["images"].mean()) if g["images"].notna().any() else 0,
            "synthesis s": round(float(g["synth_seconds"].mean()), 1),
            "total s": round(float(g["total_seconds"].mean()), 1),
            **{label: _fmt_mb(g[key]) for key, label in MEMORY_COLUMNS.items() if key in g},
            "acc_mean": score.mean, "acc_std": score.std, "ci95_low": score.ci_low, "ci95_high": score.ci_high,
        }
        if "at_epoch" in g:
            row["epochs at budget"] = _epoch_span(g["at_epoch"])
        if "last_k_mean" in g and g["last_k_mean"].notna().any():
            # the mean over seeds of each run's last-k mean, ± the mean over seeds of each run's swing over them
            stability = f"{g['last_k_mean'].mean():.2f} ± {g['last_k_std'].mean():.2f}"
            row[f"last-{int(g['last_k'].iloc[0])} epochs"] = stability
        if "selected_acc" in g and g["selected_acc"].notna().any():
            row[PICK_COLUMN] = _fmt_mean_std(estimate(g["selected_acc"].dropna().tolist()))
        rows.append(row)
        samples.append(g["final_acc"].tolist())
    if not rows:
        return pd.DataFrame(rows)
    table = pd.DataFrame(rows)
    if PICK_COLUMN in table:  # groups without the rule's records
        table[PICK_COLUMN] = table[PICK_COLUMN].fillna("-")
    # a memory column no run measured (CUDA on CPU runs, or summaries older than the field) is left out
    table = table.drop(columns=[c for c in MEMORY_COLUMNS.values() if c in table and (table[c] == "-").all()])
    marks: dict[int, Mark] = {}
    contenders = table[[not is_baseline(m) for m in table["method"]]]
    for _, g in contenders.groupby(SETTING_KEYS, sort=False, dropna=False):
        marks.update(best_group({i: samples[i] for i in g.index}))
    table["best group"] = [marks[i].mark if i in marks else "-" for i in table.index]
    table["p vs best"] = [_fmt_p(marks.get(i)) for i in table.index]
    table["p_vs_best"] = [marks[i].p if i in marks else float("nan") for i in table.index]
    return table


PICK_COLUMN = "data-free pick"
DISPLAY_COLUMNS = [k for k in GROUP_KEYS if k != "teacher sha256"] + ["side information",
    "acc (last epoch)", "95% CI", "n seeds", "best group", "p vs best", "epochs at budget", "last-k epochs",
    PICK_COLUMN, "best-epoch acc (test-selected)", "teacher acc", "teacher sha256", "images", "synthesis s", "total s",
    "peak RSS MiB", "peak CUDA MiB"]
# machine-readable copies of the statistics, for the csv format only
NUMERIC_COLUMNS = ["acc_mean", "acc_std", "ci95_low", "ci95_high", "p_vs_best"]

NOTE = ("Score: test accuracy of the last epoch (with --at: of the last epoch within the budget), mean ± sample "
        f"std over n seeds; {CONFIDENCE:.0%} CI: t-interval of the mean. best group: per dataset/teacher/student/"
        "preset, 'best' is the method with the highest mean; 'yes' = not significantly worse than it, 'no' = worse "
        f"(Welch's t-test, unequal variances, two-sided p < {ALPHA}, no multiple-comparison correction); n/a = the "
        "method or the best has fewer than 2 seeds, so nothing is tested; '-' = baseline (reference row, not "
        "ranked). The best-epoch column is selected on the test set and is not a score. last-k epochs: the mean "
        "over seeds of each run's mean accuracy over its last k epochs, ± the mean over seeds of the sample std "
        "over those k epochs (how far a run swings from epoch to epoch); a stability measure, not a score.")
PICK_NOTE = (" data-free pick (runs with selection_images > 0): the test accuracy of the epoch whose student agreed "
             "most with the teacher on held-out synthetic images the method made once and the student never trained "
             "on (the latest epoch on a tie), mean ± std over seeds; the choice uses no real data.")


def note_for(table: pd.DataFrame) -> str:
    """The note printed under ``table``: what its columns mean."""
    if is_across(table):
        return ACROSS_NOTE
    return NOTE + (PICK_NOTE if PICK_COLUMN in table.columns else "")


ACROSS_KEYS = ["dataset", "teacher arch", "student", "method", "loss", "preset", "settings"]
ACROSS_NOTE = ("Across teachers: per method, the mean over seeds on each teacher (a checkpoint: a variant and its "
               "sha256), then over the teachers: their mean, their sample std (spread across teachers) and the "
               "worst teacher's mean. best group: per dataset/teacher architecture/student/preset, against the "
               "method with the highest mean over teachers among those run on the most teachers (a partial grid's "
               "means over fewer teachers are not comparable), a paired t-test over the teachers both ran on (the "
               f"unit is the teacher, not the seed; two-sided p < {ALPHA} = worse); n/a: fewer than 2 shared "
               "teachers. Baselines are shown, never ranked.")


def scored_by_teacher(df: pd.DataFrame) -> pd.DataFrame:
    """The scored runs with ``teacher arch`` (the teacher's name before ``@``) and ``teacher id`` (its name and
    sha256 prefix: one checkpoint) added, for comparisons across teachers."""
    ok = _scored(df).copy()
    ok["teacher arch"] = [str(t).partition("@")[0] for t in ok["teacher"]]
    ok["teacher id"] = ok["teacher"].astype(str) + " " + ok["teacher sha256"].astype(str)
    return ok


def across_teachers(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, teacher architecture, student, method, loss, preset, settings) over the scored
    runs: the mean over teachers of the per-teacher seed means, their spread, the worst teacher's mean and
    which teacher it is, and the best-group mark from a paired t-test over shared teachers (:data:`ACROSS_NOTE`)."""
    from .stats import paired_p

    ok = scored_by_teacher(df)
    if ok.empty:
        return pd.DataFrame()
    load_plugins()
    rows, per_teacher = [], []
    for key, g in ok.groupby(ACROSS_KEYS, sort=True, dropna=False):
        means = g.groupby("teacher id")["final_acc"].mean()
        seeds = g.groupby("teacher id")["final_acc"].size()
        worst = means.idxmin()
        spread = float(means.std(ddof=1)) if len(means) > 1 else float("nan")
        rows.append({**dict(zip(ACROSS_KEYS, key)), "settings": key[ACROSS_KEYS.index("settings")] or "preset",
                     "mean over teachers": f"{means.mean():.2f}",
                     "spread across teachers": "n/a" if math.isnan(spread) else f"{spread:.2f}",
                     "worst teacher": f"{means.min():.2f} ({worst.split(' ')[0]})", "n teachers": len(means),
                     "seeds per teacher": ",".join(str(int(n)) for n in seeds)})
        per_teacher.append(means.to_dict())
    table = pd.DataFrame(rows)
    marks, ps = ["-"] * len(table), ["-"] * len(table)
    setting = ["dataset", "teacher arch", "student", "preset"]
    for _, g in table.groupby(setting, sort=False, dropna=False):
        contenders = [i for i in g.index if not is_baseline(table.at[i, "method"])]
        if not contenders:
            continue
        # a mean over fewer teachers is not comparable: the best is among those that ran on the most teachers
        best = max(contenders, key=lambda i: (table.at[i, "n teachers"], float(table.at[i, "mean over teachers"])))
        for i in contenders:
            if i == best:
                marks[i] = "best"
                continue
            shared = sorted(set(per_teacher[i]) & set(per_teacher[best]))
            p = paired_p([per_teacher[i][t] for t in shared], [per_teacher[best][t] for t in shared])
            marks[i] = "n/a" if math.isnan(p) else ("no" if p < ALPHA else "yes")
            ps[i] = "n/a" if math.isnan(p) else f"{p:.3f}"
    table["best group"], table["p vs best (paired over teachers)"] = marks, ps
    return table


ACROSS_COLUMNS = ACROSS_KEYS + ["mean over teachers", "spread across teachers", "worst teacher", "n teachers",
                                 "seeds per teacher", "best group", "p vs best (paired over teachers)"]


def is_across(table: pd.DataFrame) -> bool:
    """Whether ``table`` is an :func:`across_teachers` table."""
    return "mean over teachers" in table.columns


def display_columns(table: pd.DataFrame, extra: list[str] | None = None) -> list[str]:
    """The columns shown, in order: :data:`DISPLAY_COLUMNS` present in ``table`` (``last-k epochs`` stands for
    the ``last-<k> epochs`` column it holds), then ``extra``."""
    out = []
    for c in (ACROSS_COLUMNS if is_across(table) else DISPLAY_COLUMNS) + (extra or []):
        if c == "last-k epochs":
            out += [t for t in table.columns if t.startswith("last-") and t.endswith(" epochs")]
        elif c in table.columns:
            out.append(c)
    return out


def failed_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The runs left out of every average: failed ones, and finished ones without a score (no epoch
    within the ``--at`` budget)."""
    if df.empty:
        return df
    out = df[~df.index.isin(_scored(df).index)][["run", "status", "reason"]].copy()
    finished = out["status"].isin(FINISHED)
    no_epoch = "no epoch within the --at budget" if "at_epoch" in df else "no epoch recorded"
    out.loc[finished, "reason"] = no_epoch
    return out


def to_format(table: pd.DataFrame, fmt: str, extra: list[str] | None = None) -> str:
    """The table as csv, markdown (with the note below it) or latex (the note as a comment above it),
    with the display columns plus ``extra``; csv also carries the numeric statistics."""
    numeric = NUMERIC_COLUMNS if fmt == "csv" else []
    note = note_for(table)
    table = table[display_columns(table, (extra or []) + numeric)]
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "markdown":
        return _markdown(table) + "\n" + note + "\n"
    if fmt == "latex":
        return f"% {note}\n" + table.to_latex(index=False, escape=True).replace("±", r"$\pm$")
    raise ValueError(f"unknown format {fmt!r}")


def _markdown(table: pd.DataFrame) -> str:
    """A GitHub table without the optional 'tabulate' dependency."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(str(row[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["collect", "summarize", "to_format", "failed_runs", "find_runs", "load_run", "read_metrics", "METRICS",
           "is_baseline", "within_budget", "NOTE", "note_for"]
