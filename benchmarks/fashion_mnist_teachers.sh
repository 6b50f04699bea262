#!/usr/bin/env bash
# Does a ranking survive the teacher? Fashion-MNIST, three WRN-16-2 teachers trained with the shipped
# recipe and seeds 0, 1, 2 (seed 0 is the shipped one), WRN-16-1 students, the cpu preset:
#   1. the two variant teachers, wrn16_2@s1 and wrn16_2@s2 (skipped when stored; a stopped training resumes)
#   2. NAYER, CSD, CMI, Fast and DeepInversion x 3 teachers x SEEDS, with the data-free checkpoint rule on
#      (selection_images=512: held-out synthetic images, never trained on; no trained number changes)
#   3. the across-teacher table, last-3 stability and data-free pick, and the report
# Finished runs are skipped and interrupted ones resume, so the script can be re-run after a stop.
# Time (2-core AMD EPYC, AVX-512, one thread per run, two runs side by side): the five methods on one
# (teacher, seed) took 13,462 s (NAYER 2,813, CSD 4,205, CMI 2,976, Fast 1,205, DeepInversion 2,262),
# so the grid at 2 seeds is about 22 core-hours, 11 hours on 2 cores; training the two variant teachers
# side by side took 2,194 s and 2,172 s (their sidecars' train_seconds).
# Measured: the 30 runs at seeds 0,1 took 93,483 run-seconds (26.0 h, about 13 h on 2 cores) on three
# 2-core machines (results/fashion-mnist/teachers/machines.md says which made which run).
# Usage: bash benchmarks/fashion_mnist_teachers.sh [SEEDS] [BACKEND]   (defaults: 0,1 and local)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
SEEDS=${1:-0,1}
BACKEND=${2:-local}
OUT=results/fashion-mnist/teachers
TEACHERS=wrn16_2,wrn16_2@s1,wrn16_2@s2
METHODS=nayer,csd,cmi,fast,deepinversion

start=$(date +%s)
for s in 1 2; do
  if [ ! -f "teachers/fashion-mnist/wrn16_2@s$s.pt" ]; then
    $BIN/dfkd-bench teacher train --dataset fashion-mnist --arch wrn16_2 --seed "$s"
  fi
done
$BIN/dfkd-bench sweep --methods $METHODS --preset cpu --dataset fashion-mnist --teachers $TEACHERS \
  --student wrn16_1 --seeds "$SEEDS" --set selection_images=512 --backend "$BACKEND" --output $OUT
$BIN/dfkd-bench compare $OUT --across teachers --format markdown --output $OUT/across-teachers.md
$BIN/dfkd-bench compare $OUT --format markdown --output $OUT/compare.md
$BIN/dfkd-bench report $OUT --output $OUT/report
echo "benchmark wall time: $(( ($(date +%s) - start) / 60 )) min on $(nproc) cores ($(uname -n))"
