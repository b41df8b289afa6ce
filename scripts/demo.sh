#!/usr/bin/env bash
# Install sgl-budget into .venv and run the main job: replay the bundled policies on the bundled trace,
# print the cost table and write the plot to out/.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
sgl-budget demo --out out "$@"
