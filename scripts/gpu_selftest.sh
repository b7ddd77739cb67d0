#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root, with dist/ carried:
#   dist/fp4.xz (scripts/gpu_build.sh: the stripped cuda binary, compressed; unpacked by
#   scripts/gpu_unpack.sh)
#   dist/commit (git rev-parse --short HEAD of that build)
#   dist/mixed (optional: a MIXED_PRECISION checkpoint from `fp4 quantize --strategy auto_mixed`,
#   see scripts/gpu_build.sh)
# Checks every CUDA op against its CPU reference, whole models on GPU vs CPU (fixtures, every
# checkpoint format, synthetic), then benchmarks kernels and the synthetic 9B; JSON into $OUT.
set -euo pipefail
source scripts/gpu_unpack.sh
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp/fp4-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
extra=()
[ -d dist/mixed ] && extra+=(--model dist/mixed)
status=0
dist/fp4 selftest --gpu --synthetic qwen3.5-9b "${extra[@]}" --out "$out/selftest.json" "$@" || status=1
python3 - "$out/selftest.json" "$(cat dist/commit)" <<'PY'
import json, sys, datetime
p, commit = sys.argv[1], sys.argv[2]
r = json.load(open(p))
r["commit"] = commit
r["date"] = datetime.date.today().isoformat()
json.dump(r, open(p, "w"), indent=2)
PY

[ -d dist/mixed ] || exit $status
# `fp4 serve --device cuda` answers like the CPU server: the same greedy completion from both.
model=dist/mixed  # NVFP4 + FP8 layers, tokenizer included
template=crates/fp4-chat/templates/qwen3_5.jinja
dist/fp4 serve --model "$model" --chat-template "$template" --served-model-name m --port 8000 --device cuda > "$out/serve_cuda.log" 2>&1 &
gpu_pid=$!
dist/fp4 serve --model "$model" --chat-template "$template" --served-model-name m --port 8001 > "$out/serve_cpu.log" 2>&1 &
cpu_pid=$!
trap 'kill $gpu_pid $cpu_pid 2>/dev/null || true' EXIT
python3 - "$out/selftest.json" <<'PY'
import json, sys, time, urllib.request
def post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req, timeout=60))
for port in (8000, 8001):
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            break
        except Exception:
            time.sleep(0.5)
body = {"model": "m", "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
gpu, cpu = post(8000, body), post(8001, body)
same = gpu["choices"][0]["text"] == cpu["choices"][0]["text"] and gpu["usage"] == cpu["usage"]
print("serve --device cuda vs cpu, greedy /v1/completions:", "same" if same else "DIFFERENT", repr(gpu["choices"][0]["text"]))
p = sys.argv[1]
r = json.load(open(p))
r["checks"].append({"check": "serve --device cuda = serve cpu (greedy /v1/completions, 24 tokens)", "pass": same,
                    "detail": {"gpu": gpu["choices"][0]["text"], "cpu": cpu["choices"][0]["text"], "usage": gpu["usage"]}})
r["all_passed"] = r["all_passed"] and same
json.dump(r, open(p, "w"), indent=2)
sys.exit(0 if same else 1)
PY
exit $status
