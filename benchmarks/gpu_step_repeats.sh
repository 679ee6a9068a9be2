#!/usr/bin/env bash
# On the GPU machine (after `source scripts/install_gpu_offline.sh` with the --hopper wheels):
# the same training-step variants measured again and again in fresh processes, alternating their
# order (A B, B A, ...) with a pause between runs, because one H100's clocks drift under sustained
# load (session 11: the same FA4 forward took 264-300 ms in one hour) and a variant run second in a
# process measured 10-35 ms slower. Each run's JSON goes to $OUT/rN/dit_step.json; then
#   python -P benchmarks/step_budget.py <those files>
# prints every run and the mean, sd and range per variant.
# Usage: bash benchmarks/gpu_step_repeats.sh RUNS PAUSE_S RES VARIANT_A VARIANT_B [dit_step args]
set -uo pipefail
runs=$1 pause=$2 res=$3 a=$4 b=$5; shift 5
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
for i in $(seq 1 "$runs"); do
  if [ $((i % 2)) = 1 ]; then order="$a $b"; else order="$b $a"; fi
  sleep "$pause"
  timeout 200 python3 -P benchmarks/dit_step.py --out "$OUT/r$i" --res "$res" --attention none --skip-ref \
      --variants $order "$@" > "$OUT/r$i.log" 2>&1
  echo "run $i ($order): rc $?"; grep "^| $res |" "$OUT/r$i.log"
done
python3 -P benchmarks/step_budget.py "$OUT"/r*/dit_step.json
