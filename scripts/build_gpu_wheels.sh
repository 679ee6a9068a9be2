#!/usr/bin/env bash
# Collects, into .whl/, what the GPU machine (Python 3.12, torch/JAX/triton preinstalled, no
# network) lacks: mugv itself as a wheel and the cp312 wheels of megatron-core and PyAV. Run here, then on the
# device machine run scripts/install_gpu_offline.sh with `.whl` carried.
#
# --hopper also collects the `mugv[hopper]` extra (FlashAttention-4 and its CuTe DSL, the versions
# pyproject.toml pins) into .whl/hopper/. Its nvidia-cutlass-dsl-libs-cu13 wheel (92 MB) exceeds
# one transfer (64 MiB), so it is unpacked, packed as tar.xz and split into .whl/hopper-libs/part-*
# (~30 MiB each): carry `.whl/hopper-libs/part-aa` in one run and the rest of `.whl` in the next,
# started at once on the same machine (install_gpu_offline.sh keeps parts in /tmp until all are there).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
rm -f .whl/mugv-*.whl
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl . 2>/dev/null || .venv/bin/python -m pip wheel -q --no-deps -w .whl .
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
python3 -m pip download -q --no-deps "${PLAT[@]}" -d .whl "megatron-core==0.16.1"
# PyAV (video decode/encode: data, cache, samples), the lock's version, cp312 wheel with FFmpeg inside
python3 -m pip download -q --no-deps "${PLAT[@]}" -d .whl "$(grep -o '^av==[0-9.]*' locks/cpu-py311.txt)"
if [ "${1:-}" = "--hopper" ]; then
  rm -rf .whl/hopper .whl/hopper-libs && mkdir -p .whl/hopper .whl/hopper-libs
  # the extra's pins, from pyproject.toml (one place); the cu12 libs are not needed beside cu13
  pins=$(python3 - <<'PY'
import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["hopper"]
out = []
for d in deps:
    out.append(d.replace("[cu13]", ""))
    if d.startswith("nvidia-cutlass-dsl["):
        v = d.split("==")[1]
        out += [f"nvidia-cutlass-dsl-libs-base=={v}", f"nvidia-cutlass-dsl-libs-core=={v}",
                f"nvidia-cutlass-dsl-libs-cu13=={v}"]
print("\n".join(out))
PY
)
  while read -r pin; do
    python3 -m pip download -q --no-deps "${PLAT[@]}" -d .whl/hopper "$pin" 2>&1 | { grep -v 'is ignored' || true; }
  done <<< "$pins"
  big=$(ls .whl/hopper/nvidia_cutlass_dsl_libs_cu13-*.whl)
  tmp=$(mktemp -d)
  python3 -m zipfile -e "$big" "$tmp"
  tar -C "$tmp" -cf - . | xz -9 -T2 | split -b 30M - .whl/hopper-libs/part-
  ls .whl/hopper-libs/part-* | wc -l > .whl/hopper-libs/count.tmp && mv .whl/hopper-libs/count.tmp .whl/hopper-libs/count
  rm -rf "$tmp" "$big"
fi
ls -laR .whl
