#!/usr/bin/env bash
# The prepared CUDA check on a machine with one CUDA GPU and PyTorch already installed:
# installs this project around that PyTorch (never replacing it), then runs benchmarks/gpu_check.py
# for every method and baseline under float16 and bfloat16 and writes results/gpu/<gpu name>/.
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [extra gpu_check.py options]
#
# Offline machines: give --wheels a folder of wheels for what is missing (timm, kornia, pandas, ...;
# `pip download` them elsewhere); Fashion-MNIST is read from $DFKD_BENCH_DATA, ./data/fashion-mnist or
# Debian's /usr/share/datasets/fashion-mnist; the teachers are the shipped ones in teachers/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=""
if [ "${1:-}" = "--wheels" ]; then WHEELS=$2; shift 2; fi

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
# the project itself without dependencies: pip must not resolve (and replace) torch
"$PY" -m pip install --quiet --no-deps --no-build-isolation -e . 2>/dev/null || "$PY" -m pip install --quiet --no-deps -e .
missing=$("$PY" - <<'PY'
import importlib.util
need = {"timm": "timm", "kornia": "kornia", "pandas": "pandas", "click": "click", "rich": "rich",
        "matplotlib": "matplotlib", "scipy": "scipy", "numpy": "numpy", "torchvision": "torchvision"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [ -n "$missing" ]; then
  echo "installing: $missing"
  pinned="torch==$("$PY" -c 'import torch; print(torch.__version__)')"
  if [ -n "$WHEELS" ]; then
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" $missing "$pinned"
  else
    "$PY" -m pip install --quiet $missing "$pinned"
  fi
fi
if [ -z "${DFKD_BENCH_DATA:-}" ] && [ ! -d data/fashion-mnist ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
  echo "error: no Fashion-MNIST here: copy its four .gz files (Debian: /usr/share/datasets/fashion-mnist) into" \
       "data/fashion-mnist, or set DFKD_BENCH_DATA" >&2
  exit 2
fi
name=$("$PY" -c "import torch, re; print(re.sub(r'[^A-Za-z0-9]+', '-', torch.cuda.get_device_name(0)).strip('-').lower())")
exec "$PY" benchmarks/gpu_check.py --device cuda --output "results/gpu/$name" "$@"
