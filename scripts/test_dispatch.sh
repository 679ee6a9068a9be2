#!/usr/bin/env bash
# The fp32 parity files again on a second CPU dispatch path: torch picks its CPU kernels by
# instruction set (ATEN_CPU_CAPABILITY) and XLA by its own (--xla_cpu_max_isa), and each choice
# sums in another order. A tolerance that only one path meets is fitted to a machine, not derived.
#
# The second path is AVX2 where this CPU's widest is AVX-512 (a CPU without AVX-512, the most
# common other x86-64 server, runs AVX2 by default), else torch's unvectorised `default`.
# The subset is every file whose assertions compare two fp32 computations that sum in different
# orders: sharded layouts vs one process, JAX vs torch, official goldens, trainer runs that are
# compared by tolerance, and the kernels against their references. Files that test formats, CLI,
# data and bit-exact resume do not depend on the summation order and run once.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
widest=$(.venv/bin/python -P -c "import torch; print(torch.backends.cpu.get_cpu_capability())")
if [ "$widest" = "AVX512" ]; then
  export ATEN_CPU_CAPABILITY=avx2 XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_cpu_max_isa=AVX2"
else
  export ATEN_CPU_CAPABILITY=default XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_cpu_max_isa=SSE4_2"
fi
echo "[dispatch] this CPU's widest torch path is $widest; now ATEN_CPU_CAPABILITY=$ATEN_CPU_CAPABILITY, XLA_FLAGS=$XLA_FLAGS" >&2
files=(
  parity_tests/test_dit.py parity_tests/test_dit_official_torch.py parity_tests/test_dit_official_jax.py
  parity_tests/test_vae.py parity_tests/test_vae_official.py
  parity_tests/test_flow.py parity_tests/test_preference.py parity_tests/test_sampler.py
  parity_tests/test_megatron_tp.py parity_tests/test_parallel_layouts.py parity_tests/test_context_parallel.py
  parity_tests/test_grad_norm.py parity_tests/test_trainer.py parity_tests/kernels
)
bash scripts/test.sh "${files[@]}" "$@"
