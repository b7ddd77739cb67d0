#!/usr/bin/env bash
# Per-kernel profile of one graph-replayed decode step of BATCH synthetic-9B sequences (ncu, kernels
# serialised) on the GPU machine (device tool), dist/ carried: $OUT/profile-bsBATCH.csv and a summary
# (time and launches per kernel and grid, heaviest first) on stdout.
#   bash scripts/gpu_profile.sh [BATCH]
set -uo pipefail
source scripts/gpu_unpack.sh
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp/fp4-out}
mkdir -p "$out"
batch=${1:-1}
csv="$out/profile-bs$batch.csv"
ncu --clock-control none --cache-control none --graph-profiling node --metrics gpu__time_duration.sum --csv \
    dist/fp4 selftest --gpu --profile-decode --profile-batch "$batch" --synthetic qwen3.5-9b --decode-tokens 1 \
    > "$csv" 2> "$out/profile-bs$batch.err"
status=$?
python3 - "$csv" <<'PY'
import csv, collections, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
if not rows:
    sys.exit("no ncu rows")
head = rows[0]; ki = head.index("Kernel Name"); vi = head.index("Metric Value"); gi = head.index("Grid Size") if "Grid Size" in head else None
agg = collections.defaultdict(lambda: [0, 0.0])
for r in rows[1:]:
    try: v = float(r[vi].replace(",", ""))
    except ValueError: continue
    k = r[ki].split("(")[0] + (" grid " + r[gi] if gi is not None else "")
    agg[k][0] += 1; agg[k][1] += v
tot = sum(v[1] for v in agg.values())
print(f"profiled kernels: {sum(v[0] for v in agg.values())} launches, {tot/1e3:.1f} us")
for k, (n, v) in sorted(agg.items(), key=lambda kv: -kv[1][1])[:40]:
    print(f"{v/1e3:9.1f} us {n:5d}x  {k}")
PY
exit $status
