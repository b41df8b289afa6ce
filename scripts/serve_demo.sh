#!/usr/bin/env bash
# Install sgl-budget with the pinned SGLang into .venv (several GB, once), then serve the embedded model with the
# stock SGLang server on CPU, with and without a bundled policy, and print both answers (about 2 minutes on 2 cores).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" sglang
cd "$ROOT"
sgl-budget serve-demo "$@"
