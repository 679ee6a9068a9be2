#!/usr/bin/env bash
# On the GPU machine (no network): install the carried wheels of .whl/ (see build_gpu_wheels.sh)
# without touching the preinstalled torch/JAX/triton. Usage: source scripts/install_gpu_offline.sh
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import mugv.core.dit, megatron.core; print('mugv + megatron-core', megatron.core.__version__, 'ready')"
