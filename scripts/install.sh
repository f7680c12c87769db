#!/usr/bin/env bash
# Install tcexport with the model zoos and test tools into the current Python.
# torch is pinned to the newest release the development machines allow; pip takes it from the local disk there.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1" 2>/dev/null \
  || python -m pip install --quiet --disable-pip-version-check "torch<=2.14.1" "torchvision<=0.29.1"
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
