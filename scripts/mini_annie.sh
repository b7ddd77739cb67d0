#!/usr/bin/env bash
# The whole loop on the embedded mini-Annie (issue 10): quantize it four ways (naive RTN of every
# linear with generic calibration, and strategies A/B/C with Annie's conversations), serve each
# variant (and BF16) on the CPU, run the mini-Annie bench suite against it, measure KL against
# BF16 on the held-out conversations, and print one table.
#
#   scripts/mini_annie.sh [OUT_DIR]        (default target/mini-annie; FP4=path/to/fp4 to override)
#   FP4=dist/fp4 RUN_ARGS="--device cuda" scripts/mini_annie.sh OUT   (serve and KL on the GPU)
#   SKIP_QUANTIZE=1 ...: reuse OUT/{rtn,A,B,C} from an earlier run (quantize here, serve there)
#   VARIANTS="bf16 rtn B": serve and score only these
#
# Quantized variants are served with --w4a4: activations quantized with each layer's input_scale,
# what the user's Blackwell GPU (and vLLM there) computes, so calibration data matters.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${FP4:-}" ]; then
    cargo build --release
    FP4=target/release/fp4
fi
out=${1:-target/mini-annie}
read -r -a run_args <<< "${RUN_ARGS:-}"
model=models/mini-annie
suite=configs/bench/mini-annie.toml
evalset=tests/fixtures/mini-annie/eval.jsonl
mkdir -p "$out"

if [ -z "${SKIP_QUANTIZE:-}" ]; then
    "$FP4" quantize --model "$model" --strategy rtn --calib-data configs/calib/mini-annie-generic.jsonl \
        --output "$out/rtn" --force
    # 32 conversations (~13k tokens) calibrate; auto_mixed (C) scores each group on 4 of them
    # (about 7 of the loop's minutes on 2 cores).
    for s in A B C; do
        "$FP4" quantize --model "$model" --config "configs/strategies/$s.toml" --calib-samples 32 --score-samples 4 \
            --calib-data configs/calib/mini-annie.jsonl --output "$out/$s" --force
    done
fi

port=8190
variants=${VARIANTS:-bf16 rtn A B C}
for v in $variants; do
    dir=$model
    extra=()
    if [ "$v" != bf16 ]; then dir=$out/$v; extra=(--w4a4); fi
    "$FP4" serve --model "$dir" --port $port --served-model-name mini-annie "${extra[@]}" "${run_args[@]}" \
        --reasoning-parser qwen3 --enable-auto-tool-choice --tool-call-parser qwen3_coder > "$out/$v.serve.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do
        curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
        sleep 0.2
    done
    "$FP4" bench --backend-a "$v" "http://127.0.0.1:$port" --suite "$suite" --runs 1 --warmup 1 \
        --output "$out/$v.bench.json" --markdown "$out/$v.bench.md" > /dev/null
    kill $pid
    wait $pid 2> /dev/null || true
    if [ "$v" != bf16 ]; then
        "$FP4" eval kl --reference "$model" --model "$dir" --data "$evalset" --w4a4 "${run_args[@]}" --json > "$out/$v.kl.json"
    fi
done
# One table: gates (value/threshold) and KL per variant.
# shellcheck disable=SC2086
python3 - "$out" $variants <<'PY' | tee "$out/summary.md"
import json, os, sys
out, variants = sys.argv[1], sys.argv[2:]
rows = []
for v in variants:
    b = json.load(open(os.path.join(out, f"{v}.bench.json")))["backends"][0]
    gates = {g["name"]: g for g in b["gates"]}
    kl_path = os.path.join(out, f"{v}.kl.json")
    kl = json.load(open(kl_path)) if os.path.exists(kl_path) else None
    rows.append((v, gates, kl))
names = ["thinking_leak", "tool_calling", "no_markdown", "factual", "reasoning", "verbosity_tokens"]
print("| variant | " + " | ".join(names) + " | all gates | KL mean (W4A4) | top-1 |")
print("|---" * (len(names) + 4) + "|")
for v, gates, kl in rows:
    cells = []
    for n in names:
        g = gates[n]
        val = f"{g['value']:.0f}" if g.get("total") is not None else f"{g['value']:.1f}"
        if g.get("total") is not None:
            val += f"/{g['total']}"
        cells.append(("✅ " if g["pass"] else "❌ ") + val)
    allp = all(g["pass"] for n, g in gates.items() if n in names)
    k = f"{kl['kl_mean']:.4f}" if kl else "—"
    t = f"{kl['top1_agreement']:.3f}" if kl else "—"
    print(f"| {v} | " + " | ".join(cells) + f" | {'pass' if allp else 'FAIL'} | {k} | {t} |")
PY
