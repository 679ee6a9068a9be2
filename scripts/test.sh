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
exec .venv/bin/python -m pytest "${marker[@]}" "${args[@]}"
