"""Fingerprint short runs of every method and baseline, to prove a refactor changed no number.

For each registered method (and baseline) it runs ``dfkd-bench run`` for a few epochs of one
preset, one seed, one thread, then records a sha256 of the scored student's tensors and of the
per-epoch metrics with the wall-clock fields left out. Run it on the commit before a change and on
the commit after, on one machine, and compare the two JSON files::

    # before: from a checkout of the old commit (its own venv)
    OMP_NUM_THREADS=1 python benchmarks/fingerprint.py run --exe ../old/.venv/bin/dfkd-bench \\
        --workdir /tmp/fp-old --json /tmp/fp-old.json
    # after
    OMP_NUM_THREADS=1 python benchmarks/fingerprint.py run --workdir /tmp/fp-new --json /tmp/fp-new.json
    python benchmarks/fingerprint.py compare /tmp/fp-old.json /tmp/fp-new.json

``compare`` prints one line per method and exits 1 when any fingerprint differs or is missing.
Seeded runs are bitwise only on one machine and one build of PyTorch: compare files made on the
same machine.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Every method and baseline, at the budget the structure issue asks for (2 epochs of ``cpu``).
DEFAULT_METHODS = ("cmi", "csd", "dafl", "deepinversion", "dfad", "dfq", "fast", "fast_meta", "nayer", "zskt",
                   "kd-noise", "kd-real", "student-real", "teacher")
# Fields that depend on the clock or the machine's load, not on the arithmetic.
TIME_FIELDS = ("synth_seconds", "distill_seconds", "elapsed_seconds", "eval_seconds", "total_seconds",
               "peak_rss_mb", "peak_cuda_mb")


def tensors_sha256(path: Path) -> str:
    """sha256 over a saved state dict's keys, dtypes, shapes and bytes, in key order."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            value = value.detach().reshape(-1).contiguous()
            digest.update(f"{value.dtype}{tuple(state[key].shape)}".encode())
            digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def metrics_sha256(path: Path) -> tuple[str, int]:
    """sha256 over metrics.jsonl without :data:`TIME_FIELDS`; and the number of epochs."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    clean = [{k: v for k, v in row.items() if k not in TIME_FIELDS} for row in rows]
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest(), len(rows)


def run_one(exe: str, method: str, preset: str, epochs: int, seed: int, workdir: Path, sets: list[str]) -> dict:
    folder = workdir / method
    if folder.exists():
        shutil.rmtree(folder)
    cmd = [exe, "run", "--method", method, "--preset", preset, "--seed", str(seed), "--device", "cpu",
           "--budget", f"epochs={epochs}", "--output", str(folder)] + [a for kv in sets for a in ("--set", kv)]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = {"method": method, "command": " ".join(cmd), "seconds": round(time.time() - start, 1)}
    if proc.returncode != 0:
        out["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return out
    student = next(folder.rglob("student.pt"), None)
    metrics = next(folder.rglob("metrics.jsonl"), None)
    if student is None or metrics is None:
        out["error"] = f"no student.pt or metrics.jsonl under {folder}"
        return out
    out["student_sha256"] = tensors_sha256(student)
    out["metrics_sha256"], out["epochs"] = metrics_sha256(metrics)
    out["test_acc"] = json.loads(metrics.read_text().splitlines()[-1]).get("test_acc")
    return out


def cmd_run(args: argparse.Namespace) -> int:
    exe = args.exe or str(Path(sys.executable).with_name("dfkd-bench"))
    methods = args.methods.split(",") if args.methods else list(DEFAULT_METHODS)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkout = str(Path(exe).resolve().parents[2])  # <checkout>/.venv/bin/dfkd-bench
    commit = subprocess.run(["git", "-C", checkout, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    # uncommitted changes to tracked files: the runs are of the working tree, not of `commit` alone
    dirty = bool(subprocess.run(["git", "-C", checkout, "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    rows = []
    for method in methods:
        row = run_one(exe, method, args.preset, args.epochs, args.seed, workdir, args.sets)
        rows.append(row)
        print(f"{method:14s} {row.get('error') or row['student_sha256'][:12] + ' ' + row['metrics_sha256'][:12]}"
              f"  acc {row.get('test_acc')}  {row['seconds']} s", flush=True)
    record = {"exe": exe, "commit": commit, "dirty": dirty, "preset": args.preset, "epochs": args.epochs,
              "seed": args.seed, "sets": args.sets, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runs": rows}
    Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 1 if any("error" in r for r in rows) else 0


def cmd_compare(args: argparse.Namespace) -> int:
    a, b = (json.loads(Path(p).read_text()) for p in (args.before, args.after))
    before = {r["method"]: r for r in a["runs"]}
    after = {r["method"]: r for r in b["runs"]}
    def label(x: dict) -> str:
        return x.get("commit", "?")[:12] + (" (with uncommitted changes)" if x.get("dirty") else "")

    print(f"before {label(a)}  after {label(b)}")
    bad = 0
    for method in sorted(set(before) | set(after)):
        x, y = before.get(method, {}), after.get(method, {})
        keys = ("student_sha256", "metrics_sha256")
        if any(k not in x or k not in y for k in keys):
            verdict = f"MISSING ({x.get('error') or y.get('error') or 'not run on one side'})"
            bad += 1
        elif all(x[k] == y[k] for k in keys):
            verdict = f"identical (acc {y.get('test_acc')})"
        else:
            verdict = f"DIFFERENT (acc {x.get('test_acc')} -> {y.get('test_acc')})"
            bad += 1
        print(f"{method:14s} {verdict}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run every method and write the fingerprints")
    run.add_argument("--exe", help="the dfkd-bench executable (default: the one beside this Python)")
    run.add_argument("--methods", help="comma-separated names (default: every method and baseline)")
    run.add_argument("--preset", default="cpu")
    run.add_argument("--epochs", type=int, default=2)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="passed to every run (e.g. a smaller budget: --set ep_steps=20 --set kd_steps=10)")
    run.add_argument("--workdir", required=True, help="where the run folders go (emptied per method)")
    run.add_argument("--json", required=True, help="the fingerprints file to write")
    cmp = sub.add_parser("compare", help="compare two fingerprint files")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = parser.parse_args(argv)
    return cmd_run(args) if args.command == "run" else cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())
