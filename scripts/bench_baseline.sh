#!/usr/bin/env bash
# Uncompressed baselines for BENCHMARKS.md: ViT-B/16 (seeded random weights; timing does not depend on them)
# and all-MiniLM-L6-v2 (real weights), each exported, built with ONNX Runtime (optimizations off and on), benched.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${TCEXPORT_OUT:-out/bench_baseline}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
[ -f "$out/vit_b16.onnx" ] || tcexport export timm:vit_base_patch16_224 --seed 0 -o "$out/vit_b16.onnx"
[ -f "$out/minilm.onnx" ] || tcexport export st:all-MiniLM-L6-v2 --seq-len 128 -o "$out/minilm.onnx"
for model in vit_b16 minilm; do
  tcexport build "$out/$model.onnx" --opt-level disable -o "$out/$model-noopt"
  tcexport build "$out/$model.onnx" --opt-level all -o "$out/$model-ort"
done
tcexport bench "$out/vit_b16-noopt" "$out/vit_b16-ort" --batch 1,8 --warmup 3 --iters ${ITERS_VIT:-20} \
  --json "$out/vit_b16.json" --plot "$out/vit_b16.png"
tcexport bench "$out/minilm-noopt" "$out/minilm-ort" --batch 1,8 --warmup 5 --iters ${ITERS_MINILM:-50} \
  --json "$out/minilm.json" --plot "$out/minilm.png"
