#!/usr/bin/env bash
# CPU benchmark on the offline default: Fashion-MNIST, WRN-16-2 teacher -> WRN-16-1 student.
#   1. the quick preset of DeepInversion (what `make demo` runs)
#   2. the cpu preset of all five methods, then the four baselines, same student, seeds and epochs
#   3. the report (tables, curves, sample grids, HTML) from the committed run folders
# Finished runs are skipped and interrupted ones resume, so the script can be re-run after a stop.
# Usage: bash benchmarks/fashion_mnist_cpu.sh [SEEDS]   (default seeds: 0)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SEEDS=${1:-0}
OUT=results/fashion-mnist
COMMON=(--dataset fashion-mnist --teacher wrn16_2 --student wrn16_1 --seeds "$SEEDS")

$BIN/dfkd-bench sweep --methods deepinversion --preset quick "${COMMON[@]}" --output $OUT/quick
$BIN/dfkd-bench sweep --methods deepinversion,fast,fast_meta,cmi,csd --preset cpu "${COMMON[@]}" --output $OUT/cpu
$BIN/dfkd-bench sweep --methods teacher,kd-noise,kd-real,student-real --preset cpu "${COMMON[@]}" --output $OUT/cpu
$BIN/dfkd-bench compare $OUT/cpu --format markdown --output $OUT/cpu/compare.md
$BIN/dfkd-bench report $OUT/cpu --output $OUT/cpu/report
