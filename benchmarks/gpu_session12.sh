#!/usr/bin/env bash
# Session 12's second GPU call (after `source scripts/install_gpu_offline.sh` with the --hopper
# wheels; the first call carried part-aa). On an H200, whose records predate sessions 8-11: the
# whole `mugv verify-kernels` (every Triton kernel, the compiled layers, FA4), then the 720p step
# with the trainer's defaults. On either GPU: the SM90 forward tile sweep of FA4 at head dim 80.
# Each part has its own time limit, so one hang cannot take the others' results.
set -uo pipefail
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "GPU: $gpu"
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
if [[ "$gpu" == *H200* ]]; then
  mkdir -p "$OUT/verify"
  timeout 330 python3 -P -m mugv.kernels.verify --record "$OUT/verify/verified_kernels.json" \
      --log-dir "$OUT/verify" > "$OUT/verify/verify.txt" 2>&1
  echo "verify rc $?"; tail -25 "$OUT/verify/verify.txt"
  export MUGV_VERIFIED_KERNELS="$OUT/verify/verified_kernels.json"
  timeout 170 python3 -P benchmarks/dit_step.py --out "$OUT/step" --res 720p --steps 5 --attention none \
      --skip-ref --variants compiled-layers-qk+fadam+auto > "$OUT/step.log" 2>&1
  echo "step rc $?"; grep -E "^\| 720p|attention|fa4|kernels" "$OUT/step.log" | tail -12
fi
timeout 200 python3 -P benchmarks/fa4_dq_fix.py --out "$OUT/fwd" --modes --sweep-fwd postprocess16 \
    --child-timeout 190 > "$OUT/fwd.log" 2>&1
echo "fwd sweep rc $?"; tail -16 "$OUT/fwd.log"
