#!/usr/bin/env bash
# On the GPU machine (no network): install the carried wheels of .whl/ (see build_gpu_wheels.sh)
# without touching the preinstalled torch/JAX/triton. Usage: source scripts/install_gpu_offline.sh
# With .whl/hopper (build_gpu_wheels.sh --hopper): FlashAttention-4 too. Parts of the split CuTe DSL
# libraries are kept in /tmp/mugv-hopper-parts across runs until all have arrived.
set -e
SITE=/tmp/site
ls .whl/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl/hopper-libs ]; then
  mkdir -p /tmp/mugv-hopper-parts
  cp .whl/hopper-libs/part-* /tmp/mugv-hopper-parts/ 2>/dev/null || true
  [ -f .whl/hopper-libs/count ] && cp .whl/hopper-libs/count /tmp/mugv-hopper-parts/
fi
if [ -d .whl/hopper ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/hopper/*.whl
  have=$(ls /tmp/mugv-hopper-parts/part-* 2>/dev/null | wc -l)
  want=$(cat /tmp/mugv-hopper-parts/count 2>/dev/null || echo "?")
  if [ "$have" = "$want" ]; then
    cat /tmp/mugv-hopper-parts/part-* | xz -d | tar -C "$SITE" -xf -
  else
    echo "[hopper] $have of $want parts of the CuTe DSL libraries here: carry the others" >&2
  fi
  for d in python_packages dsl_packages; do   # what the wheel's .pth would add (pip --target skips it)
    [ -d "$SITE/nvidia_cutlass_dsl/$d" ] && export PYTHONPATH=$PYTHONPATH:$SITE/nvidia_cutlass_dsl/$d
  done
fi
python3 -c "import mugv.core.dit, megatron.core; print('mugv + megatron-core', megatron.core.__version__, 'ready')" || true
python3 -c "import flash_attn.cute, importlib.metadata as m; print('flash-attn-4', m.version('flash-attn-4'), 'ready')" 2>/dev/null || true
