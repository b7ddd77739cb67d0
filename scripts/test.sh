#!/usr/bin/env bash
# The project's test command (README): formatting, lints, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
# The server as the official openai client sees it (needs `pip install openai`; .ci/run installs it).
python3 tests/serve/conformance.py --fp4 target/debug/fp4
