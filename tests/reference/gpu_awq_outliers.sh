#!/usr/bin/env bash
# Runs on the GPU machine (device tool): ModelOpt 0.47's fake-quant KL on the held-out
# activation-outlier model of awq_outliers.py.   carry: .whl (as gpu_modelopt.sh)
# Writes $OUT/awq.tar.gz (model, calib/eval data, ModelOpt exports, modelopt.json).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
rm -rf /tmp/awq
python3 tests/reference/awq_outliers.py --src tests/fixtures/tiny-quant --out /tmp/awq 2>&1 \
    | grep -vE "Loading weights|UserWarning|warnings.warn" || true
test -f /tmp/awq/modelopt.json
tar -C /tmp/awq -czf "$OUT/awq.tar.gz" .
ls -la "$OUT"
