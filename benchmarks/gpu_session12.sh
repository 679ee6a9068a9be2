#!/usr/bin/env bash
# Session 12's GPU call (after `source scripts/install_gpu_offline.sh`; no FA4 needed). On an H200
# (whose records then predated sessions 8-11): `mugv verify-kernels` for the four Triton kernels and the
# compiled layers (FA4 needs the two-call install and is left for a session with more device
# time). On either GPU: benchmarks/kernel_host.py, where the Triton kernels' wall time goes at
# 256p and 720p against torch.compile. Each part has its own time limit.
set -uo pipefail
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "GPU: $gpu"
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
if [[ "$gpu" == *H200* ]]; then
  mkdir -p "$OUT/verify"
  timeout 300 python3 -P -m mugv.kernels.verify \
      --only adaln_modulate,gated_residual_modulate,qk_rmsnorm_rope,groupnorm_silu,compiled_layers \
      --record "$OUT/verify/verified_kernels.json" --log-dir "$OUT/verify" > "$OUT/verify/verify.txt" 2>&1
  echo "verify rc $?"; tail -8 "$OUT/verify/verify.txt"
fi
timeout 240 python3 -P benchmarks/kernel_host.py --out "$OUT/host" --res 256p 720p --calls 200 \
    > "$OUT/host.log" 2>&1
echo "kernel_host rc $?"; grep -v "^{" "$OUT/host.log" | tail -110
