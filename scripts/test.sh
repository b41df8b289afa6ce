#!/usr/bin/env bash
# Install sgl-budget with its test extras (and the pinned sglang, for the integration tests) and run
# the whole test suite. SGL_BUDGET_NO_SGLANG=1 skips installing sglang (its tests are then skipped).
set -euo pipefail
EXTRAS="test,sglang"
if [ -n "${SGL_BUDGET_NO_SGLANG:-}" ]; then EXTRAS="test"; fi
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" "$EXTRAS"
cd "$ROOT"
set +e
python -m pytest "$@"
rc=$?
set -e
# pytest exit code 5 means "no tests collected": treat it as a failure.
if [ "$rc" -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi
exit "$rc"
