#!/usr/bin/env bash
# Downloads into .whl/ the pure-Python wheels sgl_budget needs that the device machine's image lacks (lark), for
# `run(carry=[".whl"], command="bash scripts/gpu_check.sh")`. .whl/ stays out of git (.git/info/exclude).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform any -d .whl "lark==1.3.1"
ls -la .whl
