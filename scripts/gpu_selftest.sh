#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root, with dist/ carried:
#   dist/fp4 (built here: cargo build --release --features cuda; strip -o dist/fp4 target/release/fp4)
#   dist/commit (git rev-parse --short HEAD of that build)
# Checks every CUDA kernel against its CPU reference and benchmarks them; JSON into $OUT.
set -euo pipefail
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp/fp4-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
dist/fp4 selftest --gpu --out "$out/selftest.json"
python3 - "$out/selftest.json" "$(cat dist/commit)" <<'PY'
import json, sys, datetime
p, commit = sys.argv[1], sys.argv[2]
r = json.load(open(p))
r["commit"] = commit
r["date"] = datetime.date.today().isoformat()
json.dump(r, open(p, "w"), indent=2)
PY
