"""Plan and run parity runs: one subprocess per (method, side, seed), one JSON per finished run.

Layout under the output folder, per method::

    <method>/<side>-s<seed>.json     the result (accuracy after every round, seconds, protocol, versions)
    <method>/logs/<side>-s<seed>.log everything the run printed
    <method>/runs/ours...-s<seed>/   dfkd-bench's run folder (it resumes itself after an interruption)
    <method>/work/theirs...-s<seed>/ the authors' PNG pool while their run is going (removed afterwards)

``side`` is ``theirs-<repo>``, ``ours`` or ``ours-<label>`` (ours with extra ``--set`` keys).
A run whose JSON exists is skipped, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from dfkd_bench.config import resolve_config
from dfkd_bench.errors import DfkdError
from dfkd_bench.registry import load_plugins
from dfkd_bench.rundir import read_metrics
from dfkd_bench.runtime import atomic_write_json

from . import shims
from .protocols import OUR_PRESET, REFERENCES, REPOS, ours_command, ours_overrides, protocol_sha

ROOT = Path(__file__).resolve().parents[2]  # the dfkd-bench checkout: the subprocesses run from here
LABEL = re.compile(r"^[a-z0-9][a-z0-9_.=+-]*$")


@dataclass
class RunSpec:
    """One planned run."""

    method: str
    side: str  # "theirs-<repo>", "ours" or "ours-<label>"
    seed: int
    protocol: dict[str, Any]
    checkout: Path | None = None  # theirs only
    ours_set: dict[str, str] = field(default_factory=dict)  # ours only: extra --set keys of a labelled variant

    @property
    def name(self) -> str:
        return f"{self.side}-s{self.seed}"

    def result_path(self, output: Path) -> Path:
        return Path(output) / self.method / f"{self.name}.json"


def pick_checkouts(paths: list[Path]) -> dict[str, Path]:
    """repo name -> checkout, for the checkouts given with --reference."""
    out: dict[str, Path] = {}
    for path in paths:
        repo = shims.detect_repo(Path(path))
        if repo in out and out[repo] != Path(path).resolve():
            raise DfkdError(f"two checkouts of {REPOS[repo]} given: {out[repo]} and {path}")
        out[repo] = Path(path).resolve()
    return out


def reference_for(method: str, checkouts: dict[str, Path]) -> tuple[str, Path]:
    """The checkout the method's reference side runs from: its authors' repository first."""
    for repo in REFERENCES[method]:
        if repo in checkouts:
            return repo, checkouts[repo]
    wanted = " or ".join(f"https://github.com/{REPOS[r]}" for r in REFERENCES[method])
    raise DfkdError(f"the reference side of '{method}' needs a checkout of {wanted} (pass it with --reference)")


def check_ours(method: str, proto: dict[str, Any], extra: dict[str, str]) -> None:
    """Resolve our side's config now, so a bad key fails before any run starts."""
    load_plugins()
    overrides = {**ours_overrides(proto), **extra, "loss": proto["loss"]}
    resolve_config(method, OUR_PRESET, overrides, dataset=proto["dataset"], teacher=proto["teacher"],
                   student=proto["student"])


def plan(methods: list[str], protocols: dict[str, dict[str, Any]], seeds: list[int], sides: list[str],
         checkouts: dict[str, Path], label: str = "", ours_set: dict[str, str] | None = None) -> list[RunSpec]:
    """Every run to do, seed-major with theirs before ours, so a partial sweep holds complete pairs."""
    ours_set = dict(ours_set or {})
    if ours_set and not label:
        raise DfkdError("--ours-set changes our side's settings: name the variant with --label")
    if label and not LABEL.match(label):
        raise DfkdError(f"--label must be lowercase letters, digits and _.=+- (got '{label}')")
    specs = []
    for method in methods:
        proto = protocols[method]
        if "ours" in sides:
            check_ours(method, proto, ours_set)
        theirs = reference_for(method, checkouts) if "theirs" in sides else None
        for seed in seeds:
            for side in sides:
                if side == "theirs":
                    repo, path = theirs
                    specs.append(RunSpec(method, f"theirs-{repo}", seed, proto, checkout=path))
                else:
                    specs.append(RunSpec(method, f"ours-{label}" if label else "ours", seed, proto,
                                         ours_set=ours_set))
    return specs


def existing_result(spec: RunSpec, output: Path) -> dict[str, Any] | None:
    """The finished result of ``spec``, or None. A result of another protocol or variant is refused."""
    path = spec.result_path(output)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise DfkdError(f"{path} is corrupt; delete it to run it again") from None
    if result.get("protocol_sha") != protocol_sha(spec.protocol):
        raise DfkdError(f"{path} holds a run of another protocol; use another --output "
                        "(e.g. for --rounds smoke runs) or delete it")
    if result.get("ours_set", {}) != spec.ours_set:
        raise DfkdError(f"{path} holds variant '{spec.side}' with other --ours-set keys "
                        f"({result.get('ours_set')}); choose another --label")
    return result


def _subprocess_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_logged(cmd: list[str], log_path: Path, env: dict[str, str], echo: Callable[[str], None]
               ) -> tuple[int, float, float]:
    """Run ``cmd``, copying its output to ``log_path`` and ``echo``. Returns (exit code, wall s, CPU s)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    with open(log_path, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, env=env, cwd=ROOT) as proc:
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                echo(line.rstrip("\n"))
        except KeyboardInterrupt:
            proc.kill()  # our own child; the context manager then waits for it
            raise
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return proc.returncode, time.time() - start, cpu


def ours_rounds(run_dir: Path, lr0: float) -> list[dict[str, Any]]:
    """Per-round records from a dfkd-bench run folder (one round per epoch): accuracy, the lr the
    round trained at, and the round's synthesis/distillation seconds (metrics hold running totals)."""
    out, prev = [], {"synth_seconds": 0.0, "distill_seconds": 0.0, "lr": lr0}
    for rec in read_metrics(run_dir / "metrics.jsonl"):
        out.append({"round": rec["epoch"] + 1, "acc": rec["test_acc"], "lr": prev["lr"],
                    "synth_seconds": round(rec["synth_seconds"] - prev["synth_seconds"], 3),
                    "distill_seconds": round(rec["distill_seconds"] - prev["distill_seconds"], 3)})
        prev = rec
    return out


def _base_record(spec: RunSpec) -> dict[str, Any]:
    return {"method": spec.method, "side": spec.side, "seed": spec.seed, "protocol": spec.protocol,
            "protocol_sha": protocol_sha(spec.protocol), "ours_set": spec.ours_set}


def run_one(spec: RunSpec, output: Path, threads: int, store: Path, echo: Callable[[str], None]
            ) -> dict[str, Any] | None:
    """Run ``spec`` in a subprocess (teacher from ``store``) and write its JSON. Returns the record,
    or None if the run failed (its log says why)."""
    output = Path(output).resolve()
    method_dir = output / spec.method
    log_path = method_dir / "logs" / f"{spec.name}.log"
    env = _subprocess_env(threads)
    prefix = f"[{spec.method} {spec.name}] "
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if spec.side.startswith("theirs"):
        work = method_dir / "work" / spec.name
        work.mkdir(parents=True, exist_ok=True)
        job = {"method": spec.method, "protocol": spec.protocol, "seed": spec.seed, "checkout": str(spec.checkout),
               "work_dir": str(work), "teacher_store": str(store)}
        atomic_write_json(work / "job.json", job)
        partial = work / "result.json"
        cmd = [sys.executable, "-m", "benchmarks.parity.reference", str(work / "job.json"), str(partial)]
        code, wall, cpu = run_logged(cmd, log_path, env, lambda line: echo(prefix + line))
        if code != 0 or not partial.is_file():
            return None
        record = {**_base_record(spec), **json.loads(partial.read_text())}
        shutil.rmtree(work, ignore_errors=True)
        if not any(work.parent.iterdir()):
            work.parent.rmdir()
    else:
        args = ours_command(spec.method, spec.protocol, spec.seed, str(method_dir / "runs"), spec.name,
                            str(store), spec.ours_set)
        code, wall, cpu = run_logged([sys.executable, "-m", "dfkd_bench.cli", *args], log_path, env,
                                     lambda line: echo(prefix + line))
        run_dir = method_dir / "runs" / spec.name
        summary_path = run_dir / "summary.json"
        if code != 0 or not summary_path.is_file():
            return None
        summary = json.loads(summary_path.read_text())
        if summary["status"] != "complete":
            return None
        config = json.loads((run_dir / "config.json").read_text())
        record = {**_base_record(spec), "status": "complete", "command": ["dfkd-bench", *args],
                  "run_dir": str(run_dir), "config": config, "rounds": ours_rounds(run_dir, config["lr"]),
                  "teacher": {"arch": summary["teacher_arch"], "path": summary["teacher_path"],
                              "sha256": summary["teacher_sha256"], "test_accuracy": summary["teacher_acc"]},
                  "device": summary["device"], "versions": summary["versions"], "git_commit": summary["git_commit"],
                  "wall_seconds": summary["total_seconds"]}
    # CPU seconds of the whole process (start-up and evaluations included), robust to a busy machine
    record.update({"threads": threads, "process_wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                   "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "log": str(log_path)})
    atomic_write_json(spec.result_path(output), record)
    return record


def default_teacher_store() -> Path:
    """Where both sides load the teacher from: $DFKD_BENCH_TEACHERS, else this checkout's teachers/."""
    env = os.environ.get("DFKD_BENCH_TEACHERS")
    return Path(env).resolve() if env else ROOT / "teachers"
