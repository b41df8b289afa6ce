# Shared by scripts/demo.sh and scripts/test.sh: create (or reuse) a venv and install sgl-budget into it.
# Usage: source scripts/env.sh [extras]   e.g. "test" or "test,sglang"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SGL_BUDGET_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
EXTRAS="${1:-}"
# SGL_BUDGET_MORE_EXTRAS (e.g. "lmeval", which .ci/run sets) adds extras to whatever the caller asks for
if [ -n "${SGL_BUDGET_MORE_EXTRAS:-}" ]; then EXTRAS="${EXTRAS:+$EXTRAS,}$SGL_BUDGET_MORE_EXTRAS"; fi
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# Without sglang, torch 2.13.0 is the CPU build this machine kind keeps on disk (no multi-GB CUDA
# download); any torch >= 2.4 works. sglang 0.5.23 brings its own torch (2.14.1).
if [[ ",$EXTRAS," != *",sglang,"* ]] && ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "torch==2.13.0" || "$VENV/bin/python" -m pip install -q "torch>=2.4"
fi
if [ -n "$EXTRAS" ]; then SPEC="$ROOT[$EXTRAS]"; else SPEC="$ROOT"; fi
"$VENV/bin/python" -m pip install -q -e "$SPEC"
export PATH="$VENV/bin:$PATH"
