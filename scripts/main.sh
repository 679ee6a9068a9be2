#!/usr/bin/env bash
# Set up (if needed) and run mugv's main job: the end-to-end demo on the embedded product-video
# dataset (no downloads): data -> VAE -> latent/text cache -> curriculum pre-training -> samples
# -> runs/demo/report.md. Extra arguments go to `mugv demo` (e.g. --quick, --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # tiny models on a small CPU: one intra-op thread
# The installed console script: it never puts the repository root on sys.path, so the top-level
# folders (kernels/, core/, ...) cannot shadow installed packages; PYTHONSAFEPATH covers children.
export PYTHONSAFEPATH=1
exec .venv/bin/mugv demo "$@"
