#!/usr/bin/env bash
# Idempotent set-up of .venv for mugv. On a machine without an NVIDIA GPU it installs the local
# CPU build of torch 2.13.0 FIRST, so that no CUDA package is ever downloaded; then the package
# itself (editable) with its test and video extras. Re-running is a no-op unless the inputs changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.installed-$(cat pyproject.toml setup.py scripts/install.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[install] setting up .venv (first run: a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  if ! command -v nvidia-smi >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q "torch==2.13.0"
  fi
  .venv/bin/python -m pip install -q -e ".[test]"
  if .venv/bin/python -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "[install] warning: CUDA packages were installed" >&2
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi
