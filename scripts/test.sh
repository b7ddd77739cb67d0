#!/usr/bin/env bash
# The project's test command (README): formatting, lints, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The CUDA path, compiled and linted (no GPU here): build.rs builds the sm_90a/sm_120a/sm_121a
# fatbins with the pinned nvcc that scripts/nvcc.sh installs. `fp4 selftest --gpu` runs them.
CUDA_HOME=$(scripts/nvcc.sh)
export CUDA_HOME
cargo clippy --workspace --all-targets --features cuda -- -D warnings
# The server as the official openai client sees it (needs `pip install openai`; .ci/run installs it).
python3 tests/serve/conformance.py --fp4 target/debug/fp4
