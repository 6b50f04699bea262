#!/usr/bin/env bash
# CPU benchmark on the offline default: Fashion-MNIST, WRN-16-2 teacher -> WRN-16-1 student.
#   1. the quick preset of DeepInversion (what `make demo` runs)
#   2. the cpu preset of all thirteen methods, then the four baselines: same student, seeds and budget
#   3. the compare table and the report (tables, curves, sample grids, HTML) from the run folders
# Finished runs are skipped and interrupted ones resume, so the script can be re-run after a stop.
# Usage: bash benchmarks/fashion_mnist_cpu.sh [SEEDS] [BACKEND]   (defaults: 0,1,2 and local)
#   BACKEND=ray runs two runs at a time on a local Ray instance (one core each), which on a
#   2-core machine finishes in about half the wall time of `local` (one run after another).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SEEDS=${1:-0,1,2}
BACKEND=${2:-local}
OUT=results/fashion-mnist
COMMON=(--dataset fashion-mnist --teacher wrn16_2 --student wrn16_1 --seeds "$SEEDS" --backend "$BACKEND")
METHODS=deepinversion,cmi,fast,fast_meta,csd,nayer,cpnet,adadfkd,spaceshipnet,dafl,zskt,dfad,dfq
BASELINES=teacher,kd-noise,kd-real,student-real

start=$(date +%s)
$BIN/dfkd-bench sweep --methods deepinversion --preset quick "${COMMON[@]}" --output $OUT/quick
$BIN/dfkd-bench sweep --methods $METHODS --preset cpu "${COMMON[@]}" --output $OUT/cpu
$BIN/dfkd-bench sweep --methods $BASELINES --preset cpu "${COMMON[@]}" --output $OUT/cpu
$BIN/dfkd-bench compare $OUT/cpu --format markdown --output $OUT/cpu/compare.md
$BIN/dfkd-bench report $OUT/cpu --output $OUT/cpu/report
echo "benchmark wall time: $(( ($(date +%s) - start) / 60 )) min on $(nproc) cores ($(uname -n))"
