#!/usr/bin/env bash
# Prepares .gpu/ for a device machine (torch + triton there, no internet, no sglang), to be carried with
# `run(carry=[".gpu"], command="bash scripts/gpu_check.sh")`: the pure-Python wheels sgl_budget needs that the
# image lacks (lark), and SGLang's Triton fused_moe_kernel extracted from the installed sglang (if any) so that
# the benchmark runs SGLang's own GEMM there. .gpu/ stays out of git (.git/info/exclude).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")" .gpu/wheels
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform any -d .gpu/wheels "lark==1.3.1"
if "$PY" -c "import sglang" 2>/dev/null; then
  "$PY" scripts/extract_sglang_moe_kernel.py .gpu/sglang_fused_moe.py
else
  echo "sglang is not importable with $PY: the benchmark will use sgl_budget's own grouped GEMM there"
fi
ls -la .gpu .gpu/wheels
