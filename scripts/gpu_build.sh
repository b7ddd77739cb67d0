#!/usr/bin/env bash
# Builds what scripts/gpu_selftest.sh runs on the GPU machine into dist/ (git-ignored, carried
# by the device tool): the stripped cuda binary, xz-compressed (dist/fp4.xz; the GPU scripts
# unpack it through scripts/gpu_unpack.sh), its commit, and a MIXED_PRECISION checkpoint of the
# tiny-quant fixture made by this build's own quantizer.
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA_HOME=$(scripts/nvcc.sh)
export CUDA_HOME
cargo build --release --features cuda
mkdir -p dist
strip -o dist/fp4 target/release/fp4
git rev-parse --short HEAD > dist/commit
git diff --quiet || echo "$(cat dist/commit)-dirty" > dist/commit
rm -rf dist/mixed dist/fp4.xz
dist/fp4 quantize --model tests/fixtures/tiny-quant --strategy auto_mixed --effective-bits 7 \
    --calib-data tests/fixtures/modelopt/tiny-quant/calib.jsonl --output dist/mixed
xz -T2 -9 -c dist/fp4 > dist/fp4.xz
rm dist/fp4
du -sh dist
