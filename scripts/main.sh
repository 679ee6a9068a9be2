#!/usr/bin/env bash
# Set up (if needed) and run mugv's main job on the embedded default (no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m mugv.torch_backend.main_job "$@"
