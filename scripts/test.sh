#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. `--slow` also runs the tests marked slow
# (longer than the CI budget); other arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
marker=(-m "not slow")
args=()
for a in "$@"; do
  if [ "$a" = "--slow" ]; then marker=(); else args+=("$a"); fi
done
# -P (and PYTHONSAFEPATH for every child process the tests start): the working directory is not put
# on sys.path, so the repository's top-level folders (kernels/, core/, ...) can never shadow an
# installed package of the same name (PyPI's `kernels`, which transformers imports).
export PYTHONSAFEPATH=1
exec "${MUGV_VENV:-.venv}/bin/python" -P -m pytest "${marker[@]}" "${args[@]}"
