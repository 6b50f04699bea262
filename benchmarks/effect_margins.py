"""How far each numeric-effect test is from flipping on another CPU.

Runs the tests marked ``numeric`` (their verdicts go through ``assert_effect``) once per CPU kernel
path, each in its own pytest process, and prints for every compared pair: the margin
(``larger - smaller``) under each path, how far the kernels moved it (largest minus smallest
margin), and their ratio. A verdict whose smallest margin is under ``--factor`` times the move is
listed as fragile, and the script exits 1.

    python benchmarks/effect_margins.py                     # the three paths below, one after another
    python benchmarks/effect_margins.py --jobs 3 -k csd     # in parallel; only tests matching 'csd'

Paths: ``native`` (what PyTorch picks on this CPU), ``avx2`` (``ATEN_CPU_CAPABILITY=avx2`` and oneDNN
held to AVX2) and ``default`` (PyTorch's portable kernels). On a CPU without AVX-512, native is avx2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATHS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
}


def _launch(name: str, env_extra: dict, log: Path, keyword: str | None) -> subprocess.Popen:
    env = {**os.environ, **env_extra, "DFKD_BENCH_EFFECTS": str(log)}
    for key in set(PATHS["avx2"]) | set(PATHS["default"]):
        if key not in env_extra:
            env.pop(key, None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-m", "numeric and not slow"]
    if keyword:
        cmd += ["-k", keyword]
    out = open(log.with_suffix(".out"), "w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _read(log: Path) -> dict[tuple[str, str], tuple[float, float]]:
    rows = {}
    if log.exists():
        for line in log.read_text().splitlines():
            r = json.loads(line)
            rows[(r["test"], r["what"])] = (r["larger"], r["smaller"])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated, from: " + ", ".join(PATHS))
    parser.add_argument("--jobs", type=int, default=1, help="paths run at once (each pytest uses one thread)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("--factor", type=float, default=5.0, help="the margin a verdict needs, in kernel moves")
    parser.add_argument("--json", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    names = [p for p in args.paths.split(",") if p]
    unknown = [p for p in names if p not in PATHS]
    if unknown:
        parser.error(f"unknown path(s) {unknown}; choose from {list(PATHS)}")

    work = Path(tempfile.mkdtemp(prefix="effect-margins-"))
    logs = {name: work / f"{name}.jsonl" for name in names}
    failed = []
    pending = list(names)
    while pending:
        batch, pending = pending[: args.jobs], pending[args.jobs:]
        procs = {name: _launch(name, PATHS[name], logs[name], args.keyword) for name in batch}
        for name, proc in procs.items():
            if proc.wait() != 0:
                failed.append(name)
                print(f"pytest failed under {name}; its output: {logs[name].with_suffix('.out')}", file=sys.stderr)

    values = {name: _read(logs[name]) for name in names}
    keys = sorted(set().union(*values.values()))
    table, fragile = [], 0
    for key in keys:
        margins = {n: values[n][key][0] - values[n][key][1] for n in names if key in values[n]}
        move = max(margins.values()) - min(margins.values())
        low = min(margins.values())
        ratio = float("inf") if move == 0 else low / move
        ok = low > 0 and ratio >= args.factor
        fragile += not ok
        table.append({"test": key[0], "what": key[1], "margins": margins, "move": move, "ratio": ratio, "ok": ok})

    width = max((len(r["test"]) for r in table), default=10)
    print(f"{'test':<{width}}  {'what':<52}  " + "  ".join(f"{n:>10}" for n in names) + f"  {'move':>9}  {'ratio':>8}")
    for r in table:
        cells = "  ".join(f"{r['margins'][n]:>10.4g}" if n in r["margins"] else f"{'-':>10}" for n in names)
        ratio = "inf" if r["ratio"] == float("inf") else f"{r['ratio']:.1f}"
        flag = "" if r["ok"] else "  FRAGILE"
        print(f"{r['test']:<{width}}  {r['what'][:52]:<52}  {cells}  {r['move']:>9.2g}  {ratio:>8}{flag}")
    print(f"{len(table)} verdicts, {fragile} under {args.factor:g}x the kernel move; logs in {work}")
    if args.json:  # an infinite ratio (the kernels did not move the margin) is written as null
        rows = [{**r, "ratio": None if r["ratio"] == float("inf") else r["ratio"]} for r in table]
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if (fragile or failed) else 0


if __name__ == "__main__":
    sys.exit(main())
