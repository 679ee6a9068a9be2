#!/usr/bin/env bash
# Idempotent set-up of .venv for mugv from the lock (locks/cpu-py311.txt: exact versions, sha256
# hashes, the CPU build of torch so no CUDA package is ever downloaded), then mugv itself as an
# editable install without dependencies. Re-running is a no-op unless the lock, pyproject.toml,
# setup.py or this script changed. `bash scripts/lock.sh` regenerates the lock.
#
# The lock is for CPython 3.11 on Linux x86_64 (this project's machines and CI). The GPU machine
# (Python 3.12, torch preinstalled, no network) uses scripts/build_gpu_wheels.sh instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MUGV_VENV:-.venv}
LOCK=${MUGV_LOCK:-locks/cpu-py311.txt}
if [ ! -x "$VENV/bin/python" ]; then
  ver=$("$PY" -c 'import sys, platform; print(f"{sys.version_info[0]}.{sys.version_info[1]} {platform.machine()}")')
  if [ "$ver" != "3.11 x86_64" ]; then
    echo "[install] $LOCK is for CPython 3.11 on x86_64; $PY is $ver. Set PYTHON=/path/to/python3.11." >&2
    exit 2
  fi
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat "$LOCK" pyproject.toml setup.py scripts/install.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[install] setting up $VENV from $LOCK (first run: a few minutes)" >&2
  # --no-deps: the lock is the whole closure; pip must not resolve anything the lock does not name.
  # (grep drops pip's warnings about this machine's configured local index folders that lack a
  # package: noise, not errors; pip's exit status is kept by pipefail.)
  "$VENV/bin/python" -m pip install -q --require-hashes --no-deps -r "$LOCK" 2>&1 | { grep -v 'is ignored: it is neither' || true; } >&2
  "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | { grep -v 'is ignored: it is neither' || true; } >&2
  "$VENV/bin/python" -m pip check >&2
  if "$VENV/bin/python" -m pip list 2>/dev/null | grep -qi '^nvidia-'; then
    echo "[install] warning: CUDA packages are installed in $VENV" >&2
  fi
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
