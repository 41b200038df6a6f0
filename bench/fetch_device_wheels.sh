#!/usr/bin/env bash
# Before a GPU session: download the pure-Python packages the device script may lack (the GPU
# machine has no internet) into ./.wheels (git-ignored), for Python 3.12; then name .wheels in
# the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .wheels
pip download -q -d .wheels --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
    pytest pytest-benchmark tqdm
du -sh .wheels
