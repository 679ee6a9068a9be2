#!/usr/bin/env bash
# The GPU benchmarks of issues 6, 15 and 14 in one call on the device machine (repo root, no network).
#
#   bash benchmarks/gpu_suite.sh [vae] [lora] [multi]      # default: all three; multi needs 2+ GPUs
#
# Before (here): `bash scripts/build_gpu_wheels.sh` (mugv + megatron-core wheels into .whl/), then
# the device call carries `.whl`. On the device the mugv wheel is rebuilt from the carried working
# tree first when pip can (so uncommitted or newer code is what runs); else the carried one is used.
# Results: $OUT/vae/vae_throughput.json, $OUT/lora/lora_step.json, $OUT/multi_gpu_1/multi_gpu.json
# (1-GPU scaling baseline), $OUT/multi_gpu_N/multi_gpu.json, and each script's log; the summary
# table is printed last. Each script runs under its own time limit (seconds; override with
# MUGV_VAE_LIMIT, MUGV_LORA_LIMIT, MUGV_MULTI_LIMIT) so one that hangs cannot eat the others' time,
# and the parts together stay inside MUGV_SUITE_BUDGET (default 570 s, under the device tool's
# 600 s per command); a part that no longer fits is skipped and listed in the summary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mugv_gpu_suite}
mkdir -p "$OUT"
# NVLink multicast stays off (the device machine's rule; kept even where a program sets its own env).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(vae lora multi)
want() { local p; for p in "${parts[@]}"; do [ "$p" = "$1" ] && return 0; done; return 1; }

t0=$(date +%s)
if [ "${MUGV_SUITE_SKIP_INSTALL:-0}" = 1 ]; then  # mugv already importable (or a dry run on a CPU)
  echo "[suite] install skipped (MUGV_SUITE_SKIP_INSTALL=1)"
else
# Fresh mugv wheel from this tree when possible (the carried one may predate the working tree).
if python3 -m pip wheel -q --no-deps --no-build-isolation --no-index -w /tmp/mugv_fresh_whl . >/dev/null 2>&1; then
  rm -f .whl/mugv-*.whl && cp /tmp/mugv_fresh_whl/mugv-*.whl .whl/ && echo "[suite] mugv wheel rebuilt from the tree"
else
  echo "[suite] WARNING: could not rebuild the mugv wheel here; using the carried .whl (run scripts/build_gpu_wheels.sh after your last change)"
fi
# shellcheck disable=SC1091
source scripts/install_gpu_offline.sh || { echo "[suite] install failed"; exit 1; }
# The wheel does not ship the kernel registry's record (docs/benchmarks.md, issue 13): without it
# every Triton kernel slot falls back to its torch reference. MUGV_SUITE_KERNELS=0 keeps it that way.
if [ "${MUGV_SUITE_KERNELS:-1}" = 1 ] && [ -f kernels/verified.json ] && [ -d /tmp/site/mugv/kernels ]; then
  cp kernels/verified.json /tmp/site/mugv/kernels/ && echo "[suite] Triton kernels on where kernels/verified.json lists this GPU"
fi
fi
set +e
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null)
ngpu=${ngpu:-0}
echo "[suite] torch $(python3 -c 'import torch; print(torch.__version__)'), $ngpu GPU(s): $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1); set-up $(( $(date +%s) - t0 )) s"

run() {  # run NAME LIMIT CMD...: log to $OUT/NAME.log, record the exit status and time
  local name=$1 limit=$2; shift 2
  local s; s=$(date +%s)
  # Stay inside the whole call's budget (the device tool stops a command at 600 s): the summary
  # must still print. A part that would get under 60 s is skipped and says so.
  local left=$(( ${MUGV_SUITE_BUDGET:-570} - (s - t0) - 20 ))
  if [ "$left" -lt 60 ]; then
    echo "$name skipped: only $left s of the suite budget left" | tee -a "$OUT/suite_status.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[suite] $name: $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - s ))" >> "$OUT/suite_status.txt"
  tail -n 25 "$OUT/$name.log"
  echo "[suite] $name: exit $rc after $(( $(date +%s) - s )) s"
}

: > "$OUT/suite_status.txt"
if want vae; then
  run vae "${MUGV_VAE_LIMIT:-240}" python3 benchmarks/vae_throughput.py --out "$OUT/vae"
fi
if want lora; then
  run lora "${MUGV_LORA_LIMIT:-330}" python3 benchmarks/lora_step.py --out "$OUT/lora"
fi
if want multi; then
  if [ "$ngpu" -ge 2 ]; then
    run multi_gpu_1 "${MUGV_MULTI_LIMIT:-300}" python3 -m torch.distributed.run --nproc_per_node 1 \
      benchmarks/multi_gpu.py --parts scaling --out "$OUT/multi_gpu_1"
    run "multi_gpu_$ngpu" "${MUGV_MULTI_LIMIT:-300}" python3 -m torch.distributed.run --nproc_per_node "$ngpu" \
      benchmarks/multi_gpu.py --out "$OUT/multi_gpu_$ngpu" --baseline "$OUT/multi_gpu_1/multi_gpu.json"
  else
    echo "[suite] multi_gpu skipped: $ngpu GPU(s)" | tee -a "$OUT/suite_status.txt"
  fi
fi

echo
echo "==================== mugv GPU suite summary ($(( $(date +%s) - t0 )) s) ===================="
cat "$OUT/suite_status.txt"
python3 - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
def load(p):
    try:
        return json.load(open(p))
    except Exception as e:  # noqa: BLE001
        return {"error": f"{p}: {e}"}
rows = []
if os.path.exists(f"{out}/vae/vae_throughput.json"):
    v = load(f"{out}/vae/vae_throughput.json")
    for k in ("throughput_256p", "throughput_720p"):
        c = v.get(k, {})
        rows.append((f"VAE {k[11:]} {c.get('frames', '')} frames", "error: " + c["error"][:60] if "error" in c else
                     f"encode {c.get('encode_fps', 0):.1f} frames/s, decode {c.get('decode_fps', 0):.1f} frames/s"))
    for k in ("memory_720p_5s", "memory_720p_20s"):
        c = v.get(k, {})
        rows.append((f"VAE {k[7:]} peak / working GiB", "error: " + c["error"][:60] if "error" in c else
                     f"encode {c.get('encode_peak_gib', 0):.2f} / {c.get('encode_working_gib', 0):.2f}, "
                     f"decode {c.get('decode_peak_gib', 0):.2f} / {c.get('decode_working_gib', 0):.2f}"))
    if "working_growth" in v:
        rows.append(("VAE working set 20 s / 5 s", ", ".join(f"{k.split('_')[0]} {x:.3f}x" for k, x in v["working_growth"].items())))
    p = v.get("bf16_vs_fp32", {})
    if "decode" in p:
        rows.append(("VAE bf16 vs fp32 (max rel)", f"posterior mean {p['posterior_mean']['max_rel']:.2e}, decode {p['decode']['max_rel']:.2e}"))
if os.path.exists(f"{out}/lora/lora_step.json"):
    l = load(f"{out}/lora/lora_step.json")
    for rc, c in l.get("cases", {}).items():
        rows.append((f"LoRA latent {l.get('latent')} recompute={rc}", c.get("skipped") or ("error: " + c["error"][-80:] if "error" in c else
                     f"step {c['step_time_s']:.3f} s, {c['tokens_per_s']:.0f} tokens/s, MFU {100 * c['mfu']:.1f}%, "
                     f"peak {c.get('peak_gib', 0):.1f} GiB")))
    ff = l.get("arithmetic", {}).get("full_finetune_gib", {}).get("full", {})
    if ff:
        rows.append(("full fine-tune, 1 GPU (estimate)", f"{ff['total']:.1f} GiB; needs >= "
                     f"{l['arithmetic'].get('full_finetune_min_gpus')} GPUs"))
for path in sorted(glob.glob(f"{out}/multi_gpu_*/multi_gpu.json")):
    m = load(path)
    w = m.get("world", "?")
    for tag, c in m.get("parity", {}).get("layouts", {}).items():
        rows.append((f"parity world {w} {tag}", c.get("skipped") or ("error: " + c["error"][-80:] if "error" in c else
                     f"loss rel {c['loss_rel']:.1e}, worst grad rel {c['grad_worst_rel']:.1e}, pass {c['pass']}")))
    s = m.get("reshard", {})
    if s:
        rows.append((f"reshard world {w} TP2->PP2", s.get("skipped") or ("error: " + s["error"][-80:] if "error" in s else
                     f"next loss rel {s['loss_rel']:.1e}, worst grad rel {s['grad_worst_rel']:.1e}, pass {s['pass']}")))
    c = m.get("scaling", {})
    if c:
        eff = c.get("weak_scaling_efficiency")
        rows.append((f"scaling world {w}", c.get("skipped") or ("error: " + c["error"][-80:] if "error" in c else
                     f"{c['layers']} layers, {c['tokens_per_s_per_gpu']:.0f} tokens/s/GPU, MFU {100 * c['mfu']:.1f}%, "
                     f"peak {c.get('peak_gib_max_rank', 0):.1f} GiB, weak-scaling eff. "
                     + ("n/a" if eff is None else f"{100 * eff:.1f}%"))))
width = max((len(a) for a, _ in rows), default=10)
print("| " + "case".ljust(width) + " | result |")
print("|" + "-" * (width + 2) + "|---|")
for a, b in rows:
    print(f"| {a.ljust(width)} | {b} |")
EOF
