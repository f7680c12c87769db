#!/usr/bin/env bash
# Install tcexport with its test extras and run the test suite (GPU/TensorRT tests skip with a reason here).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python -m pytest -q -rs "$@"
