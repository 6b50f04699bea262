"""The parity table: per method and side, accuracy at checkpoints (mean ± std over seeds), the
gap ours - theirs at the end, and seconds per round of each side with the ratio ours / theirs."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from dfkd_bench.errors import DfkdError

from .protocols import REFERENCES, REPOS


def load_results(method_dir: Path) -> list[dict[str, Any]]:
    """The finished results of one method folder (``<side>-s<seed>.json``)."""
    out = []
    for path in sorted(Path(method_dir).glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise DfkdError(f"{path} is corrupt; delete it and run it again") from None
        if result.get("status") == "complete":
            out.append(result)
    shas = {r["protocol_sha"] for r in out}
    if len(shas) > 1:
        raise DfkdError(f"{method_dir} mixes runs of {len(shas)} protocols; keep one protocol per output folder")
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def checkpoints(rounds: int, every: int) -> list[int]:
    """Rounds to report: every ``every``-th, and always the last."""
    out = list(range(every, rounds + 1, every)) if every > 0 else []
    return out if out and out[-1] == rounds else out + [rounds]


def _per_round(result: dict[str, Any], key: str) -> float:
    rounds = result["rounds"]
    return sum(r[key] for r in rounds) / len(rounds)


def side_summary(results: list[dict[str, Any]], marks: list[int]) -> dict[str, Any]:
    """Aggregate one side's runs (one per seed)."""
    acc = {m: [r["rounds"][m - 1]["acc"] for r in results if len(r["rounds"]) >= m] for m in marks}
    synth = [_per_round(r, "synth_seconds") for r in results]
    distill = [_per_round(r, "distill_seconds") for r in results]
    total = [s + d for s, d in zip(synth, distill)]
    # a run resumed by a later process (ours resumes from its checkpoint) has only that process's CPU clock:
    # it is left out of the CPU column, which a process covering under 90% of the run's wall time marks
    cpu = [r["cpu_seconds"] / len(r["rounds"]) for r in results if r.get("cpu_seconds") is not None
           and r.get("process_wall_seconds", 0) >= 0.9 * r.get("wall_seconds", 0)]
    return {"n": len(results), "seeds": sorted(r["seed"] for r in results), "acc": acc,
            "synth": synth, "distill": distill, "total": total, "cpu": cpu}


def _side_order(side: str) -> tuple[int, str]:
    return (0 if side.startswith("theirs") else 1 if side == "ours" else 2, side)


def _baseline(method: str, sides: list[str]) -> str | None:
    """The side that differences and ratios are taken against: the authors' own repository first."""
    for repo in REFERENCES.get(method, ()):
        if f"theirs-{repo}" in sides:
            return f"theirs-{repo}"
    return next((s for s in sides if s.startswith("theirs")), None)


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _describe(method: str, proto: dict[str, Any]) -> str:
    step_s = "s" if proto["g_steps"] != 1 else ""
    steps = f"{proto['g_steps']} synthesis step{step_s} on {proto['synth_batch_size']} images"
    if "g_loops" in proto:  # NAYER: loops of g_steps per round, each with a new noisy layer
        steps = (f"{proto['g_loops']} loops of {steps} (generator re-initialized every {proto['g_life']} rounds, "
                 f"{proto['label_embeddings']} label embeddings)")
    weights = ", ".join(f"{k} {proto[k]:g}" for k in ("bn", "oh", "adv", "balance", "csd", "cr", "cr_T", "tv",
                                                     "bn_mmt", "fea")
                        if k in proto)
    plural = "s" if proto["rounds"] != 1 else ""
    if "ep_steps" in proto:  # an online method: several generator rounds per epoch, new samples every student step
        body = (f"{proto['rounds']} epoch{plural} of {proto['ep_steps'] // proto['kd_steps']} rounds of ({steps}, "
                f"{proto['kd_steps']} student steps on new samples of {proto['batch_size']})")
    else:
        body = (f"{proto['rounds']} round{plural} of {steps} then {proto['kd_steps']} student steps of "
                f"{proto['batch_size']}")
    return (f"{proto['dataset']}, {proto['teacher']} -> {proto['student']}; {body}; SGD lr {proto['lr']:g} "
            f"(cosine over the epochs), wd {proto['weight_decay']:g}, T {proto['T']:g}, warm-up {proto['warmup']}; "
            f"{weights}; lr_g {proto['lr_g']:g}")


def method_table(method: str, results: list[dict[str, Any]], every: int = 5) -> str:
    """The markdown section of one method."""
    if not results:
        return f"### {method}\n\nno finished runs\n"
    proto = results[0]["protocol"]
    marks = checkpoints(proto["rounds"], every)
    by_side: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_side.setdefault(r["side"], []).append(r)
    sides = sorted(by_side, key=_side_order)
    summaries = {s: side_summary(by_side[s], marks) for s in sides}
    base = _baseline(method, sides)
    lines = [f"### {method}", "", f"Protocol ({results[0]['protocol_sha']}): {_describe(method, proto)}.", ""]
    notes = []
    for s in sides:
        ref = by_side[s][0].get("reference")
        if ref:
            version = ref["commit"] or f"sources sha256 {ref['sources_sha256'][:12]}"
            notes.append(f"- `{s}`: {REPOS.get(ref['repo'], ref['repo'])} ({version})")
        elif by_side[s][0].get("ours_set"):
            sets = " ".join(f"--set {k}={v}" for k, v in by_side[s][0]["ours_set"].items())
            notes.append(f"- `{s}`: dfkd-bench with `{sets}`")
    lines += notes + ([""] if notes else [])
    head = (["side", "n", "seeds"] + [f"acc r{m}" for m in marks[:-1]] + [f"final (r{marks[-1]})", "Δ final",
            "synth s/round", "distill s/round", "s/round", "ratio", "CPU s/round", "CPU ratio"])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_sum = summaries.get(base) if base else None
    for s in sides:
        sm = summaries[s]
        final = sm["acc"][marks[-1]]
        delta = ratio = cpu_ratio = "-"
        if base_sum and s != base:
            if final and base_sum["acc"][marks[-1]]:
                delta = f"{_mean(final) - _mean(base_sum['acc'][marks[-1]]):+.2f}"
            if base_sum["total"]:
                ratio = f"{_mean(sm['total']) / _mean(base_sum['total']):.2f}"
            if sm["cpu"] and base_sum["cpu"]:
                cpu_ratio = f"{_mean(sm['cpu']) / _mean(base_sum['cpu']):.2f}"
        row = [s, str(sm["n"]), ",".join(map(str, sm["seeds"]))] + [fmt(sm["acc"][m]) for m in marks]
        row += [delta, fmt(sm["synth"], 1), fmt(sm["distill"], 1), fmt(sm["total"], 1), ratio, fmt(sm["cpu"], 1),
                cpu_ratio]
        lines.append("| " + " | ".join(row) + " |")
    against = f"Δ final and ratios: against `{base}`. " if base else ""
    lines += ["", f"Accuracy in %, mean ± sample std over seeds. {against}s/round: wall seconds of synthesis + "
              "distillation per round (evaluation excluded); CPU s/round: CPU seconds of the whole process "
              "(start-up and evaluations included) per round, which a busy machine does not inflate; a run "
              "resumed by a second process is left out of it (its clock misses the first).", ""]
    return "\n".join(lines)


def write_tables(output: Path, every: int = 5) -> str:
    """Write ``<method>/table.md`` for every method folder with results and ``parity.md`` with all of
    them; return the combined markdown."""
    output = Path(output)
    if not output.is_dir():
        raise DfkdError(f"{output} is not a folder of parity results")
    sections = []
    for method_dir in sorted(p for p in output.iterdir() if p.is_dir()):
        results = load_results(method_dir)
        if not results:
            continue
        text = method_table(method_dir.name, results, every)
        (method_dir / "table.md").write_text(text)
        sections.append(text)
    if not sections:
        raise DfkdError(f"no finished parity runs under {output}")
    combined = "# Parity with the authors' code\n\n" + "\n".join(sections)
    (output / "parity.md").write_text(combined)
    return combined
