#!/usr/bin/env bash
# The project's test command (README): formatting, lints, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# Docker (docker/README.md): lint the Dockerfiles with hadolint from PyPI, and run the images'
# build script on the build the tests just made (CPU, dev profile: no second full build).
scripts/hadolint.sh
docker/build.sh --cpu --profile dev target/docker-ci
# The CUDA path, compiled and linted (no GPU here): build.rs builds the sm_90a/sm_120a/sm_121a
# fatbins with the pinned nvcc that scripts/nvcc.sh installs. `fp4 selftest --gpu` runs them.
CUDA_HOME=$(scripts/nvcc.sh)
export CUDA_HOME
cargo clippy --workspace --all-targets --features cuda -- -D warnings
# The server as the official openai client sees it. The client comes from the system's python3
# when it has one, else from PyPI into target/py (a venv, like scripts/nvcc.sh's).
py=python3
if ! python3 -c "import openai" > /dev/null 2>&1; then
    if [ ! -x target/py/bin/python ]; then
        python3 -m venv target/py
    fi
    if ! target/py/bin/python -c "import openai" > /dev/null 2>&1; then
        target/py/bin/pip install -q --disable-pip-version-check openai
    fi
    py=target/py/bin/python
fi
"$py" tests/serve/conformance.py --fp4 "${CARGO_TARGET_DIR:-target}/debug/fp4"
