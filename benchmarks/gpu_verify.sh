#!/usr/bin/env bash
# One GPU call that renews this checkout's kernel records and measures the kernels' wall time,
# for sessions where machine starts are scarce (after `source scripts/install_gpu_offline.sh`
# with the megatron-core and mugv wheels of this checkout carried; FA4 is not needed: the
# record's FA4 entries are carried over by the verification).
#
#   PARTS="verify host" VERIFY_S=300 HOST_S=110 HOST_RES=256p bash benchmarks/gpu_verify.sh
#
# verify: `mugv verify-kernels` for the four Triton kernels and the compiled layers (or the list
#         VERIFY_ONLY names; the record keeps the others whose code is unchanged), writing
#         $OUT/verify/verified_kernels.json (copy its device entry into kernels/verified.json);
# host:   benchmarks/kernel_host.py at HOST_RES (wall, loop and GPU time per forward+backward
#         call of each kernel against torch.compile of its reference) into $OUT/host.
# Each part has its own time limit, so a slow part cannot take the other's result with it.
set -uo pipefail
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
PARTS=${PARTS:-verify host}
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
echo "GPU: $gpu"
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
verify() {  # $1: output folder
  local dir=$1
  mkdir -p "$dir"
  local t0=$SECONDS
  timeout "${VERIFY_S:-300}" python3 -P -m mugv.kernels.verify \
      --only "${VERIFY_ONLY:-adaln_modulate,gated_residual_modulate,qk_rmsnorm_rope,groupnorm_silu,compiled_layers}" \
      --record "$dir/verified_kernels.json" --log-dir "$dir" > "$dir/verify.txt" 2>&1
  echo "verify ($dir) rc $? in $((SECONDS - t0)) s"; tail -12 "$dir/verify.txt"
  rm -f "$dir/parity_junit.xml"   # at most 8 files come back
}
host() {
  local t0=$SECONDS
  # shellcheck disable=SC2086
  timeout "${HOST_S:-110}" python3 -P benchmarks/kernel_host.py --out "$OUT/host" \
      --res ${HOST_RES:-256p} --calls 200 > "$OUT/host.log" 2>&1
  echo "kernel_host rc $? in $((SECONDS - t0)) s"; grep -v "^{" "$OUT/host.log" | tail -60
}
# the parts in the order PARTS names them
for part in $PARTS; do
  case $part in
    verify) verify "$OUT/verify" ;;
    host) host ;;
    *) echo "unknown part $part (verify, host)" ;;
  esac
done
