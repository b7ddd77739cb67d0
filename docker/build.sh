#!/usr/bin/env bash
# Builds what the images ship and stages it in one folder: the fp4 binary (stripped) and fp4's
# Qwen3.5 chat template. The Dockerfiles' builder stages run this script; CI runs it natively
# (`docker/build.sh --cpu --profile dev target/docker-ci`, reusing the tests' build) and checks
# the staged binary, so the steps the images take cannot rot.
#
#   docker/build.sh [--cpu] [--profile release|dev] [OUT_DIR]   (default: --features cuda, release, dist/docker)
#
# With CUDA (the default) the kernels are compiled by the pinned nvcc of scripts/nvcc.sh
# (CUDA 13.0 wheels from PyPI) for sm_90a, sm_120a and sm_121a (crates/fp4-kernels/build.rs):
# one binary for Hopper, Blackwell and the DGX Spark's GB10. The binary links no CUDA library;
# it loads libcuda (the driver's) and cuBLAS/cuBLASLt 13 at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda=1
profile=release
out=dist/docker
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) cuda=0 ;;
        --profile) profile=$2; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        -*) echo "docker/build.sh: unknown option $1" >&2; exit 2 ;;
        *) out=$1 ;;
    esac
    shift
done
features=()
if [ "$cuda" = 1 ]; then
    CUDA_HOME=$(scripts/nvcc.sh)
    export CUDA_HOME
    features=(--features cuda)
fi
cargo build --locked --profile "$profile" --bin fp4 "${features[@]}"
dir=$profile
[ "$profile" = dev ] && dir=debug
bin="${CARGO_TARGET_DIR:-target}/$dir/fp4"
mkdir -p "$out"
strip -o "$out/fp4" "$bin"
cp crates/fp4-chat/templates/qwen3_5.jinja "$out/qwen3_5.jinja"
# What the image runs must start: a broken binary fails here, not in the image.
"$out/fp4" --version
"$out/fp4" serve --help > /dev/null
echo "staged in $out: $(du -sh "$out" | cut -f1)"
