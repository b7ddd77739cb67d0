#!/usr/bin/env bash
# Runs on the GPU machine (device tool) from the repository root with dist/ (scripts/gpu_build.sh)
# and .peer/ (../shared/tools/llamacpp-peer/fetch.sh .peer) carried: starts the llama.cpp peer
# (Q4_K_M and BF16 of the same random 9B shape) detached, runs fp4's selftest and engine benchmarks
# while the peer builds, waits for the peer, and writes $OUT/engine-bench.json
# (schema fp4.engine-bench.v1: both sides of the same lease, with ratios).
#   [PROFILE="1 8"] bash scripts/gpu_engine_bench.sh [seconds to wait for the peer, default 420]
# If the peer is not done in time, run `bash scripts/gpu_engine_bench.sh --collect` in the next call.
set -uo pipefail
out=${OUT:-/tmp/fp4-out}
mkdir -p "$out"
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
source scripts/gpu_unpack.sh
if [ "${1:-}" != "--collect" ]; then
    if [ -d .peer ] && [ ! -f /tmp/peer.done ]; then
        setsid nohup bash .peer/run.sh tests/fixtures/chat > /dev/null 2>&1 < /dev/null &
    fi
    # The GEMV geometry and layout sweep (decode kernels not shipped yet, against the shipped one).
    dist/fp4 selftest --gpu --gemv-sweep --out "$out/gemv-sweep.json" > "$out/gemv-sweep.log" 2>&1
    echo "gemv sweep exit $?"
    bash scripts/gpu_selftest.sh > "$out/selftest.log" 2>&1
    echo "selftest exit $?"
    cp "$out/selftest.json" /tmp/fp4-selftest.json 2>/dev/null
    wait_s=${1:-420}
else
    cp /tmp/fp4-selftest.json "$out/selftest.json" 2>/dev/null
    wait_s=540
fi
[ -d .peer ] && bash .peer/wait.sh "$wait_s" | tail -20
cp /tmp/peer-out/llamabench-*.json /tmp/peer-out/batched-q4km.txt "$out/" 2>/dev/null
python3 - "$out" <<'PY'
import json, os, re, sys, datetime
out = sys.argv[1]
try:
    st = json.load(open(f"{out}/selftest.json"))
except Exception as e:
    sys.exit(f"no selftest.json: {e}")
e = st.get("engine") or {}
fp4 = {
    "decode_bs1_nvfp4": e.get("decode_bs1_nvfp4"),
    "decode_bs1_nvfp4_eager": e.get("decode_bs1_nvfp4_eager"),
    "decode_bs1_bf16": e.get("decode_bs1_bf16"),
    "ttft_1k_nvfp4_ms": e.get("ttft_1k_nvfp4_ms"),
    "ttft_4k_nvfp4_ms": e.get("ttft_4k_nvfp4_ms"),
    "aggregate_decode": e.get("aggregate_decode_nvfp4"),
    "aggregate_decode_bf16": e.get("aggregate_decode_bf16"),
    "decode_depth": e.get("decode_depth"),
    "server_overhead_fraction": e.get("server_overhead_fraction"),
    "decode_bs1_nvfp4_served": e.get("decode_bs1_nvfp4_served"),
    "decode_bs1_nvfp4_sampled_t0.2": e.get("decode_bs1_nvfp4_sampled_t0.2"),
    "ttft_1k_nvfp4_served_ms": e.get("ttft_1k_nvfp4_served_ms"),
    "ttft_4k_nvfp4_served_ms": e.get("ttft_4k_nvfp4_served_ms"),
    "ttft_1k_nvfp4_served_chunk2048_ms": e.get("ttft_1k_nvfp4_served_chunk2048_ms"),
    "ttft_4k_nvfp4_served_chunk2048_ms": e.get("ttft_4k_nvfp4_served_chunk2048_ms"),
    "copy_gb_per_s": st.get("copy_gb_per_s"),
    "bytes_per_token_nvfp4": e.get("bytes_per_token_nvfp4"),
    # Issue 16: TTFT turn by turn over a 20-turn conversation, prefix caching on and off.
    "conversation_ttft_ms": e.get("conversation_ttft_ms"),
    # Issue 16: MTP speculative decoding, K = 3, acceptance forced to mean length 2.5.
    "mtp": e.get("mtp"),
}
peer = {"engine": "llama.cpp 0c1e570 (llama-bench, llama-batched-bench; FA on, all layers on the GPU)"}
def bench(q):
    try:
        rows = json.load(open(f"{out}/llamabench-{q}.json"))
    except Exception:
        return None, None
    pp = next((r["avg_ts"] for r in rows if r["n_prompt"]), None)
    tg = next((r["avg_ts"] for r in rows if r["n_gen"] and not r["n_prompt"]), None)
    return pp, tg
pp_q, tg_q = bench("q4km")
_, tg_b = bench("bf16")
peer.update({"decode_bs1_q4km": tg_q, "decode_bs1_bf16": tg_b, "pp1000_q4km_tok_s": pp_q})
agg = {}
try:
    for line in open(f"{out}/batched-q4km.txt"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit():
            agg[cells[2]] = float(cells[7])  # B -> S_TG t/s
except Exception:
    pass
peer["aggregate_decode_q4km"] = agg or None
def ratio(a, b):
    return round(a / b, 3) if a and b else None
ratios = {
    "decode_bs1_nvfp4_vs_q4km": ratio(fp4["decode_bs1_nvfp4"], tg_q),
    "decode_bs1_bf16_vs_bf16": ratio(fp4["decode_bs1_bf16"], tg_b),
    "ttft_1k_q4km_over_nvfp4": ratio(1000.0 / pp_q * 1e3 if pp_q else None, fp4["ttft_1k_nvfp4_ms"]),
}
for b in ("1", "8", "32"):
    ratios[f"aggregate_{b}_vs_q4km"] = ratio((fp4["aggregate_decode"] or {}).get(b), agg.get(b))
res = {"schema": "fp4.engine-bench.v1", "device": st.get("device"), "commit": st.get("commit"),
       "date": datetime.date.today().isoformat(), "fp4": fp4, "peer": peer, "ratios": ratios,
       "all_checks_passed": st.get("all_passed"), "checks_failed": st.get("failed")}
json.dump(res, open(f"{out}/engine-bench.json", "w"), indent=2)
print(json.dumps(res, indent=1))
PY
# With PROFILE="1 8": per-kernel decode profiles at those batch sizes once the peer is done (they
# would disturb its timings), as far as the call's time allows (ncu takes ~1 min a batch).
for b in ${PROFILE:-}; do
    if [ "$SECONDS" -lt 470 ]; then
        bash scripts/gpu_profile.sh "$b" | head -25
    fi
done
