#!/usr/bin/env bash
# On the GPU machine, after `source scripts/install_gpu_offline.sh` with the --hopper wheels:
# 1. `mugv verify-kernels` (python -m mugv.kernels.verify): every Triton kernel's and FA4's parity
#    on this device -> MUGV_VERIFIED_KERNELS (copied to $OUT/verified_kernels.json);
# 2. benchmarks/dit_step.py: SDPA vs FA4 attention at 10B width and whole training steps with and
#    without FA4 (the plain-PyTorch block baseline in the same run), table last.
# Usage: bash benchmarks/gpu_fa4.sh verify|step [dit_step args]
set -uo pipefail
# the record lives in /tmp (kept between runs on the same warm machine; $OUT is emptied per run)
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 MUGV_VERIFIED_KERNELS=/tmp/mugv_verified_kernels.json
what=${1:-verify}; shift || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ "$what" = verify ]; then
  time python3 -P -m mugv.kernels.verify --log-dir "$OUT" 2>&1 | tee "$OUT/verify.txt"
  cp "$MUGV_VERIFIED_KERNELS" "$OUT/verified_kernels.json"
else
  time python3 -P benchmarks/dit_step.py --out "$OUT" "$@" 2>&1 | tail -60
fi
