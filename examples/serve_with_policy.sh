#!/usr/bin/env bash
# Serve a Mixture-of-Experts model with an sgl_budget policy on a GPU machine, with the stock SGLang.
#
#   bash examples/serve_with_policy.sh /path/to/DeepSeek-V2-Lite [policy]
#
# 1. checks the policy against the model's config (the launcher checks it again before serving),
# 2. prints the per-layer plan,
# 3. launches SGLang with --moe-policy (MoE runner: triton, which consumes standard top-k output).
set -euo pipefail
MODEL="${1:?usage: $0 MODEL_DIR [POLICY]}"
POLICY="${2:-$(dirname "$0")/../policies/alloc-moe-sere-decode.policy}"
pip install -q "sgl-budget[sglang]" 2>/dev/null || pip install -q -e "$(dirname "$0")/..[sglang]"
sgl-budget check "$POLICY" --model-spec "$MODEL"
sgl-budget explain "$POLICY" --model-spec "$MODEL"
exec python -m sglang.launch_server --model-path "$MODEL" --moe-policy "$POLICY" \
  --moe-runner-backend triton --port 30000
