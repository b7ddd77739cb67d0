#!/usr/bin/env bash
# Kernel iteration on the GPU machine (device tool), dist/ carried (scripts/gpu_build.sh):
# `fp4 selftest --quick` (linear, decode-op, fusion and runner checks, then the kernel and
# engine benchmarks of the synthetic 9B) into $OUT/quick.json, and with `profile` a per-kernel
# profile of one graph-replayed decode step of BATCH sequences (ncu; 1 if not given) into
# $OUT/profile.csv.
#   bash scripts/gpu_quick.sh [profile [BATCH]]
set -euo pipefail
source scripts/gpu_unpack.sh
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp/fp4-out}
mkdir -p "$out"
status=0
dist/fp4 selftest --gpu --quick --synthetic qwen3.5-9b --out "$out/quick.json" 2>&1 | tail -n 60 || status=1
if [ "${1:-}" = profile ]; then
    ncu --clock-control none --cache-control none --graph-profiling node --metrics gpu__time_duration.sum --csv \
        dist/fp4 selftest --gpu --profile-decode --profile-batch "${2:-1}" --synthetic qwen3.5-9b --decode-tokens 1 > "$out/profile.csv" 2> "$out/profile.err" || status=1
    python3 - "$out/profile.csv" <<'PY'
import csv, collections, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; ki = head.index("Kernel Name"); vi = head.index("Metric Value"); gi = head.index("Grid Size") if "Grid Size" in head else None
agg = collections.defaultdict(lambda: [0, 0.0])
for r in rows[1:]:
    try: v = float(r[vi].replace(",", ""))
    except ValueError: continue
    k = r[ki].split("(")[0] + (" grid " + r[gi] if gi is not None else "")
    agg[k][0] += 1; agg[k][1] += v
tot = sum(v[1] for v in agg.values())
print(f"profiled kernels: {sum(v[0] for v in agg.values())} launches, {tot/1e3:.1f} us")
for k, (n, v) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:30]:
    print(f"{v/1e3:9.1f} us {n:5d}x  {k}")
PY
fi
exit $status
