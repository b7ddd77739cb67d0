#!/usr/bin/env bash
# Kernel iteration on the GPU machine (device tool), dist/ carried (scripts/gpu_build.sh):
# `fp4 selftest --quick` (linear, decode-op, fusion and runner checks, then the kernel and
# engine benchmarks of the synthetic 9B) into $OUT/quick.json, and with `profile` a per-kernel
# profile of one graph-replayed decode step of BATCH sequences (scripts/gpu_profile.sh).
#   bash scripts/gpu_quick.sh [profile [BATCH]]
set -euo pipefail
source scripts/gpu_unpack.sh
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp/fp4-out}
mkdir -p "$out"
status=0
dist/fp4 selftest --gpu --quick --synthetic qwen3.5-9b --out "$out/quick.json" 2>&1 | tail -n 60 || status=1
if [ "${1:-}" = profile ]; then
    bash scripts/gpu_profile.sh "${2:-1}" || status=1
fi
exit $status
