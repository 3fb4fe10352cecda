#!/usr/bin/env bash
# gte's standing GPU checks and figures in one command, < 8 minutes on one GPU (benchmarks/README.md, "GPU suite"):
#
#   benchmarks/gpu.sh [OUT_DIR] [more `gte bench --suite gpu` options, e.g. --budget 600]
#
# Writes OUT_DIR/gpu_suite.json, OUT_DIR/gpu_suite.md and OUT_DIR/gpu_suite.log (default OUT_DIR:
# benchmarks/gpu-<date>); exit status 1 when a check failed. Installs nothing and downloads nothing: it runs the gte of
# this checkout with $PYTHON, else this checkout's .venv, else python3 (which must have gte's dependencies).
# A dry run on a machine without a GPU: benchmarks/gpu.sh OUT_DIR --device cpu
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-$root/benchmarks/gpu-$(date +%Y%m%d-%H%M%S)}"
[ $# -gt 0 ] && shift
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
"$python" -m gte bench --suite gpu --out "$out" "$@" 2>&1 | tee "$out/gpu_suite.log"
