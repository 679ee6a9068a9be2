#!/usr/bin/env bash
# Collects, into .whl/, what the GPU machine (Python 3.12, torch/JAX/triton preinstalled, no
# network) lacks: mugv itself as a wheel and megatron-core's cp312 wheel. Run here, then on the
# device machine run scripts/install_gpu_offline.sh with `.whl` carried.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
rm -f .whl/mugv-*.whl
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl . 2>/dev/null || .venv/bin/python -m pip wheel -q --no-deps -w .whl .
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "megatron-core==0.16.1"
ls -la .whl
