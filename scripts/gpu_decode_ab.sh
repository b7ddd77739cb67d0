#!/usr/bin/env bash
# A/B of two builds on the GPU machine (device tool), dist/ carried: graph-replayed decode of the
# synthetic 9B (NVFP4, 1k-token prompt) at each BATCH size, this build and the base build
# (dist/base.xz, an earlier dist/fp4.xz; dist/base.commit) alternately on the same card, into
# $OUT/decode-ab.json; then the quick checks of this build (`fp4 selftest --quick`: linear,
# decode-op, fusion and runner checks, kernel benchmarks) into $OUT/quick.json.
# With DEPTHS="4096 16384 …", then batch-1 decode of this build at each context depth into
# $OUT/decode-depth.json. With PARTS="mtp conversation", those engine benchmarks of this build
# (selftest --engine-part) into $OUT/<part>.json.
#   [ROUNDS=2] [DEPTHS="…"] [PARTS="…"] bash scripts/gpu_decode_ab.sh [BATCH ...]   (default: 1 8, one round)
set -uo pipefail
source scripts/gpu_unpack.sh
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp/fp4-out}
mkdir -p "$out"
xz -dc dist/base.xz > /tmp/fp4-base && chmod +x /tmp/fp4-base
rate() {  # binary batch [depth] -> tok/s
    "$1" selftest --gpu --profile-decode --profile-batch "$2" --profile-depth "${3:-0}" --synthetic qwen3.5-9b --decode-tokens 64 2>/dev/null |
        sed -n 's/.*: \([0-9.]*\) tok\/s.*/\1/p'
}
rows=()
for b in ${@:-1 8}; do
    for round in $(seq "${ROUNDS:-1}"); do
        new=$(rate dist/fp4 "$b"); base=$(rate /tmp/fp4-base "$b")
        echo "batch $b round $round: this build $new tok/s, base $base tok/s"
        rows+=("{\"batch\": $b, \"round\": $round, \"tok_s\": ${new:-null}, \"base_tok_s\": ${base:-null}}")
    done
done
printf '{"schema": "fp4.decode-ab.v1", "device": "%s", "commit": "%s", "base": "%s", "runs": [%s]}\n' \
    "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" "$(cat dist/commit)" "$(cat dist/base.commit 2>/dev/null)" \
    "$(IFS=,; echo "${rows[*]}")" > "$out/decode-ab.json"
cat "$out/decode-ab.json"
if [ -n "${DEPTHS:-}" ]; then
    rows=()
    for d in 0 $DEPTHS; do
        r=$(rate dist/fp4 1 "$d")
        echo "depth $d: $r tok/s"
        rows+=("\"$d\": ${r:-null}")
    done
    printf '{"schema": "fp4.decode-depth.v1", "device": "%s", "commit": "%s", "tok_s": {%s}}\n' \
        "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" "$(cat dist/commit)" \
        "$(IFS=,; echo "${rows[*]}")" > "$out/decode-depth.json"
fi
for part in ${PARTS:-}; do
    dist/fp4 selftest --gpu --synthetic qwen3.5-9b --engine-part "$part" --out "$out/$part.json" > "$out/$part.log" 2>&1
    echo "engine part $part exit $?"; grep "engine " "$out/$part.log" | tail -4
done
# The checks last: the timings come back even when the call's time runs out during them.
dist/fp4 selftest --gpu --quick --out "$out/quick.json" > "$out/quick.log" 2>&1
echo "quick checks exit $? ($(grep -c '"pass": false' "$out/quick.json" 2>/dev/null) failed)"
