#!/usr/bin/env bash
# Session 12's FA4 call on the GPU machine, right after a call that carried .whl/hopper-libs/part-aa
# (this one carries part-ab, part-ac, count, .whl/hopper and the megatron-core + mugv wheels):
# install FA4, `mugv verify-kernels --only fa4` into the user record (merged over the device's
# entry in the wheel's kernels/verified.json), then the 720p step with the trainer's defaults.
source scripts/install_gpu_offline.sh >/dev/null 2>&1
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1   # PYTHONPATH: set by install_gpu_offline.sh
nvidia-smi --query-gpu=name --format=csv,noheader
mkdir -p $OUT/v
timeout 200 python3 -P -m mugv.kernels.verify --only fa4 --log-dir $OUT/v > $OUT/v/verify_fa4.txt 2>&1; echo "verify rc $?"; tail -4 $OUT/v/verify_fa4.txt
cp ~/.cache/mugv/verified_kernels.json $OUT/v/ 2>/dev/null
timeout 200 python3 -P benchmarks/dit_step.py --out $OUT/step --res 720p --steps 5 --attention none --skip-ref --variants compiled-layers-qk+fadam+auto > $OUT/step.log 2>&1; echo "step rc $?"
grep -E "^\| 720p|backend|fa4" $OUT/step.log | tail -8
