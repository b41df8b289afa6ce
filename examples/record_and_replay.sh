#!/usr/bin/env bash
# Record router logits from real traffic, then replay policies offline against stock top-k.
#
#   bash examples/record_and_replay.sh /path/to/model
#
# Recording copies router logits to the host and CUDA-graph replays never reach Python,
# so record with CUDA graphs off. The trace file follows the traffic (rewritten every few seconds),
# so stopping the server (Ctrl-C) loses at most the last few seconds.
set -euo pipefail
MODEL="${1:?usage: $0 MODEL_DIR}"
python -m sglang.launch_server --model-path "$MODEL" --moe-record-trace traces/ --moe-record-max-tokens 50000 \
  --cuda-graph-backend-decode disabled --cuda-graph-backend-prefill disabled --port 30000 &
SERVER=$!
trap 'kill $SERVER' EXIT
echo "send traffic to http://127.0.0.1:30000, then press Enter"; read -r
kill -INT $SERVER; wait $SERVER || true; trap - EXIT
sgl-budget replay policies/*.policy --trace "$(ls traces/*.trace.safetensors | head -1)" --batch-size 32 --plot out/replay.png
