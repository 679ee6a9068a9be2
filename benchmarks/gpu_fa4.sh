#!/usr/bin/env bash
# On the GPU machine, after `source scripts/install_gpu_offline.sh` with the --hopper wheels:
#   fix     benchmarks/fa4_dq_fix.py: FA4's dQ at head dim 72 with each fix of kernels/fa4_sm90.py
#           and none (correctness and 720p speed), the SM90 backward's tile configs; then
#           `mugv verify-kernels --only fa4` under the default fix (kernel32 if only that one passed;
#           the choice is kept in /tmp/mugv_fa4_fix for the next runs on this warm machine)
#   verify  `mugv verify-kernels` (python -m mugv.kernels.verify): every Triton kernel's, FA4's and
#           the compiled DiT's parity on this device -> MUGV_VERIFIED_KERNELS (copied to $OUT/verified_kernels.json)
#   step    benchmarks/dit_step.py: whole training steps with and without FA4 (the plain-PyTorch
#           block baseline in the same run), table last
# Usage: bash benchmarks/gpu_fa4.sh fix|verify|step [verify-kernels args | dit_step args]
set -uo pipefail
# the record lives in /tmp (kept between runs on the same warm machine; $OUT is emptied per run)
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 MUGV_VERIFIED_KERNELS=/tmp/mugv_verified_kernels.json
[ -f /tmp/mugv_fa4_fix ] && export MUGV_FA4_DQ_FIX=$(cat /tmp/mugv_fa4_fix)
what=${1:-verify}; shift || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ "$what" = fix ]; then
  time timeout 400 python3 -P benchmarks/fa4_dq_fix.py --out "$OUT/fix" --sweep postprocess16 --child-timeout 120 2>&1 | tail -30
  mode=$(python3 - "$OUT/fix/fa4_dq_fix.json" <<'PY'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
except (OSError, ValueError):
    rows = []
ok = lambda m: [r.get("passes") for r in rows if r["label"] == m] == [True, True]   # at 72 and 80
print("postprocess16" if ok("postprocess16") else "kernel32" if ok("kernel32") else "postprocess16")
PY
)
  echo "$mode" > /tmp/mugv_fa4_fix; export MUGV_FA4_DQ_FIX=$mode; echo "dQ fix used from here: $mode"
  time python3 -P -m mugv.kernels.verify --only fa4 --log-dir "$OUT/verify" 2>&1 | tee "$OUT/verify.txt"
  cp "$MUGV_VERIFIED_KERNELS" "$OUT/verified_kernels.json"
elif [ "$what" = verify ]; then   # extra args go to verify-kernels (e.g. --only fa4)
  time python3 -P -m mugv.kernels.verify --log-dir "$OUT" "$@" 2>&1 | tee "$OUT/verify.txt"
  cp "$MUGV_VERIFIED_KERNELS" "$OUT/verified_kernels.json"
else
  time python3 -P benchmarks/dit_step.py --out "$OUT" "$@" 2>&1 | tail -60
fi
