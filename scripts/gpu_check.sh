#!/usr/bin/env bash
# Everything this project owes a GPU, in one command for a device machine (torch + triton there, no internet):
# the kernel tests on CUDA (serving shapes, CUDA-graph capture) and the MoE decode benchmark.
#   here:  bash scripts/gpu_prepare.sh   (once: missing wheels + SGLang's extracted GEMM kernel into .gpu/)
#   there: bash scripts/gpu_check.sh [all|tests|bench] [benchmark args]   (carry .gpu; results in $OUT or out/gpu)
# Each part prints as it goes and tees into the results folder, so a run cut off by a time limit keeps what it did;
# split into `tests` and `bench` calls where one call's limit is short (kernel compiles take a few minutes).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PART=all
case "${1:-}" in all|tests|bench) PART=$1; shift ;; esac
OUT_DIR="${OUT:-$PWD/out/gpu}"
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

# sgl_budget laid out as the wheel installs it (sgl_budget.kernels is kernels/, ...), without pip or a build
SITE=/tmp/sgl_budget_site
rm -rf "$SITE" && mkdir -p "$SITE"
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .gpu/wheels/*.whl || exit 1
fi
if [ -f .gpu/sglang_fused_moe.py ]; then export SGL_BUDGET_SGLANG_KERNEL="$PWD/.gpu/sglang_fused_moe.py"; fi
cp -r sgl_budget "$SITE/" && cp -r kernels "$SITE/sgl_budget/kernels" && cp -r grammar "$SITE/sgl_budget/grammar"
cp -r policies "$SITE/sgl_budget/policies"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# run from a copy of tests/ and benchmarks/: in the checkout, ./sgl_budget (without kernels/) would shadow $SITE
RUN=/tmp/sgl_budget_run
rm -rf "$RUN" && mkdir -p "$RUN" && cp -r tests benchmarks "$RUN/" && cd "$RUN"
"$PY" -c "import sgl_budget.kernels.backend, lark, torch, triton; print('sgl_budget from', sgl_budget.__file__, \
'| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.cuda.is_available())" || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT_DIR/device.txt"

rc=0
if [ "$PART" != bench ]; then
  "$PY" -m pytest -q -rs tests/test_kernels.py tests/test_kernels_adaptive.py tests/test_benchmarks.py 2>&1 | tee "$OUT_DIR/kernel_tests.log" || rc=1
fi
if [ "$PART" != tests ]; then
  # by default also say where the time goes at batch 64, and what per-request choice costs a server
  [ $# -gt 0 ] || set -- --profile 64 --per-request
  "$PY" benchmarks/moe_decode.py --json "$OUT_DIR/moe_decode.json" "$@" 2>&1 | tee "$OUT_DIR/moe_decode.md" || rc=1
fi
exit $rc
