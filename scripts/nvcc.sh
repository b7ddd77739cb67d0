#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 nvcc (pip wheels) into target/nvcc and prints CUDA_HOME.
# Pinned because unpinned installs mix 13.5 parts whose PTX driver 580 cannot load.
# Used by developers and CI alike: `export CUDA_HOME=$(scripts/nvcc.sh)`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/target/nvcc"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" >&2
fi
home=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13
if [ ! -x "$home/bin/nvcc" ]; then
    "$venv/bin/pip" install -q --disable-pip-version-check nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 \
        nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
fi
test -x "$home/bin/nvcc" || { echo "nvcc not found under $home after install" >&2; exit 1; }
echo "$home"
