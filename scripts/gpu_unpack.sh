#!/usr/bin/env bash
# Sourced by the GPU machine's scripts (gpu_selftest.sh, gpu_quick.sh, gpu_engine_bench.sh,
# gpu_gemv_probe.sh): scripts/gpu_build.sh leaves the binary as dist/fp4.xz (7 MB instead of 32,
# so that dist/ and the llama.cpp peer's .peer/ fit one device call's 64 MiB); this unpacks it to
# dist/fp4 once per machine, with the Python that every GPU machine has.
if [ -f dist/fp4.xz ] && [ ! -x dist/fp4 ]; then
    python3 -c 'import lzma, shutil; shutil.copyfileobj(lzma.open("dist/fp4.xz"), open("dist/fp4", "wb"))'
    chmod +x dist/fp4
fi
