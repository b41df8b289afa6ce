#!/usr/bin/env bash
# Everything this project owes a GPU, in one command for a device machine (torch + triton there, no internet):
# the kernel tests on CUDA (serving shapes, CUDA-graph capture) and the MoE decode benchmark.
#   here:  bash scripts/gpu_wheels.sh            (once: the missing pure-Python wheels into .whl/)
#   there: bash scripts/gpu_check.sh [benchmark args]   (carry .whl; results land in $OUT or ./out/gpu)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT_DIR="${OUT:-$PWD/out/gpu}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

# sgl_budget laid out as the wheel installs it (sgl_budget.kernels is kernels/, ...), without pip or a build
SITE=/tmp/sgl_budget_site
rm -rf "$SITE" && mkdir -p "$SITE"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl || exit 1
fi
cp -r sgl_budget "$SITE/" && cp -r kernels "$SITE/sgl_budget/kernels" && cp -r grammar "$SITE/sgl_budget/grammar"
cp -r policies "$SITE/sgl_budget/policies"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import sgl_budget.kernels.backend, lark, torch, triton; print('sgl_budget from', sgl_budget.__file__, \
'| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT_DIR/device.txt"

rc=0
"$PY" -m pytest -q tests/test_kernels.py tests/test_benchmarks.py 2>&1 \
  | tee "$OUT_DIR/kernel_tests.log" || rc=1
"$PY" benchmarks/moe_decode.py --json "$OUT_DIR/moe_decode.json" "$@" 2>&1 | tee "$OUT_DIR/moe_decode.md" || rc=1
exit $rc
