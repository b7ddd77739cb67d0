#!/usr/bin/env bash
# Runs on the GPU machine (device tool): ModelOpt 0.47 goldens for the tiny fixtures
# (default: all three; or the model names given as arguments).
#   carry: .whl (nvidia-modelopt 0.47.0 and its missing pure-Python deps, see README)
# Writes $OUT/modelopt.tar.gz with one directory per fixture model.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
work=/tmp/modelopt
rm -rf "$work" && mkdir -p "$work"
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(tiny-vl tiny-text tiny-quant)
for m in "${models[@]}"; do
    python3 tests/reference/make_modelopt_golden.py --model "tests/fixtures/$m" --out "$work/$m" 2>&1 \
        | grep -vE "Loading weights|UserWarning|warnings.warn" || true
    test -f "$work/$m/versions.json"
done
tar -C "$work" -czf "$OUT/modelopt.tar.gz" .
ls -la "$OUT"
