"""The prepared CUDA check: every method and baseline, a short run each, under float16 and bfloat16.

For each (method, autocast dtype) it runs ``dfkd-bench run`` in its own process (a CUDA error
cannot poison the next run) for a few rounds of the ``quick`` preset, then writes one JSON and
one markdown table: status, seconds per round of synthesis and of student steps, images per
second, peak CUDA memory, accuracy after the rounds, and the error of a run that failed.

    python benchmarks/gpu_check.py --output results/gpu/h200            # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --methods fast,kd-noise \\
        --set epochs=1 --output /tmp/cpu-check                          # the same code path on CPU

``--jobs N`` runs N of them at a time on the one device: the check's wall time drops, and the
times in the table then include the sharing (the header says so). On CPU it sets ``amp_cpu=true``
so autocast and the GradScaler run there too (the test suite runs it that way at a tiny budget so
that it cannot rot). ``benchmarks/gpu_check.sh`` installs the project around an existing PyTorch
first. Offline: the shipped teachers (``teachers/``) and Fashion-MNIST from
``$DFKD_BENCH_DATA``/``--data-root`` or Debian's copy.
Exit status: 0 when every run completed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float16", "bfloat16")


def all_methods(plugins: list[str]) -> list[str]:
    from dfkd_bench.registry import SYNTHESIZERS, load_plugins

    load_plugins(plugins)
    return SYNTHESIZERS.names()


def device_label(device: str) -> dict:
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda, but PyTorch sees no CUDA device")
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        return {"device": device, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda, "torch": torch.__version__}
    return {"device": device, "name": "cpu", "torch": torch.__version__}


def run_one(method: str, dtype: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One short run; the row of the table."""
    folder = workdir / f"{method}-{dtype}"
    cmd = [sys.executable, "-m", "dfkd_bench", *[a for p in args.plugin for a in ("--plugin", p)], "run",
           "--method", method, "--preset", args.preset, "--seed", "0", "--device", args.device,
           "--dataset", args.dataset, "--output", str(folder), "--name", "run", "--no-train-teacher",
           "--budget", f"epochs={args.epochs + warmup_epochs(method, args)}",
           "--set", "amp=true", "--set", f"amp_dtype={dtype}"]  # autocast is a run option, off by default
    if args.device == "cpu":
        cmd += ["--set", "amp_cpu=true"]
    for key in ("teacher", "student", "teacher_store"):
        if getattr(args, key):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    for kv in args.set:
        cmd += ["--set", kv]
    env = dict(os.environ)
    if args.data_root:
        env["DFKD_BENCH_DATA"] = str(args.data_root)
    start = time.time()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.run_timeout)
        out, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, code = f"timed out after {args.run_timeout} s: {exc}", -1
    row = {"method": method, "amp_dtype": dtype, "wall_seconds": round(time.time() - start, 1),
           "command": " ".join(cmd)}
    summary_path = folder / "run" / "summary.json"
    if code != 0 or not summary_path.is_file():
        lines = [line for line in out.strip().splitlines() if line.strip()]
        row.update(status="error", error=(lines[-1] if lines else f"exit code {code}")[:300])
        return row
    summary = json.loads(summary_path.read_text())
    records = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines() if line]
    last = records[-1] if records else {}  # the records' counters carry 3 decimals, the summary's 2
    synth, distill = last.get("synth_seconds") or 0.0, last.get("distill_seconds") or 0.0
    per_epoch = _rounds_per_epoch(folder / "run" / "config.json")
    n_rounds = per_epoch * len(records)  # every epoch synthesizes; warm-up epochs train no student
    student_rounds = per_epoch * sum(1 for r in records if not r.get("warmup"))
    row.update(
        status=summary["status"] if summary["status"] != "budget" else "complete",
        reason=summary.get("reason"),
        rounds=n_rounds,
        student_rounds=student_rounds,
        synth_s_per_round=round(synth / n_rounds, 3) if n_rounds else None,
        student_s_per_round=round(distill / student_rounds, 3) if student_rounds else None,
        images_per_s=round(summary["images"] / synth, 1) if synth > 0 else None,
        peak_cuda_mb=summary.get("peak_cuda_mb"), peak_rss_mb=summary.get("peak_rss_mb"),
        accuracy=summary.get("final_acc"), amp=summary.get("amp"), device_name=summary.get("device"),
    )
    if summary["status"] == "failed":
        row["status"], row["error"] = "failed", summary.get("reason")
    return row


def _rounds_per_epoch(config_path: Path) -> int:
    cfg = json.loads(config_path.read_text())
    return max(1, cfg["ep_steps"] // max(1, cfg["kd_steps"])) if cfg["method"] != "teacher" else 0


def warmup_epochs(method: str, args: argparse.Namespace) -> int:
    """The method's warm-up epochs (synthesis only, no student step) in the checked preset, after ``--set``:
    the check adds them to ``--epochs`` so that every run reaches its student steps (Fast warms up 1 epoch)."""
    from dfkd_bench.config import parse_assignments, resolve_config
    from dfkd_bench.errors import DfkdError
    from dfkd_bench.registry import load_plugins

    load_plugins(args.plugin)
    try:  # the run's own resolution of preset and --set values
        cfg, _, _ = resolve_config(method, args.preset, parse_assignments(args.set))
    except DfkdError:  # an unknown method or preset, a bad --set: its run reports the error
        return 0
    return cfg.warmup_epochs


def markdown(rows: list[dict], label: dict, args: argparse.Namespace) -> str:
    head = (f"# CUDA check: {label['name']}\n\n{label}\n\n`{args.preset}` preset, seed 0, "
            f"{args.epochs} epoch(s) of student steps per run (after the method's warm-up epochs, if any), "
            f"device {args.device}; times are wall seconds per synthesis round "
            f"and per round of student steps"
            + (f", with {args.jobs} runs sharing the device at a time (times are inflated by the sharing)"
               if args.jobs > 1 else "") + ".\n\n")
    cols = ["method", "amp_dtype", "status", "synth_s_per_round", "student_s_per_round", "images_per_s",
            "peak_cuda_mb", "peak_rss_mb", "accuracy", "wall_seconds", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("" if r.get(c) is None else str(r.get(c)).replace("|", "/") for c in cols)
                     + " |")
    return head + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", default="", help="comma-separated (default: every method and baseline)")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--epochs", type=int, default=1,
                        help="epochs of student steps per run; the method's warm-up epochs come on top")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--teacher", default="")
    parser.add_argument("--student", default="")
    parser.add_argument("--teacher-store", dest="teacher_store", default=str(ROOT / "teachers"))
    parser.add_argument("--data-root", dest="data_root", default="")
    parser.add_argument("--plugin", action="append", default=[])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-timeout", dest="run_timeout", type=float, default=300.0)
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time on the one device (their times then include the sharing)")
    parser.add_argument("--output", required=True, help="folder for gpu_check.json, gpu_check.md and the runs")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    label = device_label(args.device)
    methods = [m for m in args.methods.split(",") if m] or all_methods(args.plugin)
    dtypes = [d for d in args.dtypes.split(",") if d]
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")

    def one(job: tuple[str, str]) -> dict:
        method, dtype = job
        row = run_one(method, dtype, args, output / "runs")
        print(f"{method:14s} {dtype:9s} {row['status']:8s} synth {row.get('synth_s_per_round')} s/round, "
              f"student {row.get('student_s_per_round')} s/round, peak CUDA {row.get('peak_cuda_mb')} MiB, "
              f"acc {row.get('accuracy')}" + (f"  ERROR {row['error']}" if row.get("error") else ""), flush=True)
        return row

    jobs = [(method, dtype) for method in methods for dtype in dtypes]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is its own process; threads only wait
        rows = list(pool.map(one, jobs))
    record = {"machine": label, "preset": args.preset, "epochs": args.epochs, "jobs": args.jobs, "sets": args.set,
              "runs": rows}
    (output / "gpu_check.json").write_text(json.dumps(record, indent=1) + "\n")
    (output / "gpu_check.md").write_text(markdown(rows, label, args))
    bad = [r for r in rows if r["status"] != "complete"]
    print(f"{len(rows) - len(bad)} of {len(rows)} runs complete; wrote {output / 'gpu_check.md'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
