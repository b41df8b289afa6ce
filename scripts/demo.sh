#!/usr/bin/env bash
# Install sgl-budget (with transformers) into .venv and run the main job on the embedded model: quality of the
# bundled policies vs full top-k on held-out text, and their cost replayed on a recorded trace; plots in out/
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" hf
cd "$ROOT"
sgl-budget demo --out out "$@"
