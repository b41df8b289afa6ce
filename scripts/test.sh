#!/usr/bin/env bash
# Install sgl-budget with its test extras into .venv and run the whole test suite.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" test
cd "$ROOT"
set +e
python -m pytest "$@"
rc=$?
set -e
# pytest exit code 5 means "no tests collected": treat it as a failure.
if [ "$rc" -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
