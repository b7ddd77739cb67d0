#!/usr/bin/env bash
# GEMV bottleneck probe on the GPU machine (device tool), dist/ carried: ncu's detailed sections
# (speed of light, memory, scheduler, warp stalls, occupancy) for the decode step's NVFP4 GEMV
# kernels at batch ${1:-1}, into $OUT/gemv-probe.txt.
#   bash scripts/gpu_gemv_probe.sh [BATCH] [KERNEL REGEX]
set -uo pipefail
source scripts/gpu_unpack.sh
export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
out=${OUT:-/tmp/fp4-out}
mkdir -p "$out"
ncu --clock-control none --cache-control none --graph-profiling node -k "regex:${2:-nvfp4_mma_gemv_nt1}" -c 4 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section SchedulerStats --section WarpStateStats \
    --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --print-details all \
    dist/fp4 selftest --gpu --profile-decode --profile-batch "${1:-1}" --synthetic qwen3.5-9b --decode-tokens 1 \
    > "$out/gemv-probe.txt" 2> "$out/gemv-probe.err"
echo "ncu exit $?"
grep -E "Grid Size|Duration|DRAM Throughput|Memory Throughput|Issue Slots Busy|Issued Warp|No Eligible|Active Warps Per|Eligible Warps|Stall|Achieved Occupancy|Registers|Warp Cycles Per Issued|L1/TEX Hit|L2 Hit|Executed Ipc|SM Busy" "$out/gemv-probe.txt" | head -120
