#!/usr/bin/env bash
# GPU check for tcexport's TensorRT integration, for the day a GPU machine is lent. Under 8 minutes, two parts,
# each skipped with its reason when what it needs is absent (so it also runs, and skips, on a CPU machine):
#   1. kernels (torch with CUDA, triton; nvcc for the C++ kernels; no TensorRT): the Triton kernels and the
#      CUDA kernels of plugins/cpp on the GPU equal the references; Triton vs the eager torch reference timed.
#   2. TensorRT: ViT-B/16 with ToMe r=16 built three ways (subgraph, function, plugin) in fp32 and fp16, each
#      validated against the PyTorch reference, and benched at batch 1, 8 and 64 against the uncompressed engine,
#      next to the FLOP-ideal speedup.
# Output: out/gpu_check/ (logs, bench JSON) and a summary on stdout. Exit 1 when a check that ran failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-out/gpu_check}
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}   # stop starting new TensorRT builds after this (the whole script < 8 min)
mkdir -p "$OUT"
START=$(date +%s)
status=0
elapsed() { echo $(( $(date +%s) - START )); }
skip() { echo "SKIP part $1: $2"; }

CUDA_OK=$(python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)  # one torch import
has_cuda_torch() { [ "$CUDA_OK" = 1 ]; }
has_triton() { python -c "import triton" 2>/dev/null; }
has_tensorrt() { python -c "import tensorrt" 2>/dev/null; }

# ---------------------------------------------------------------- part 1: kernels
if ! has_cuda_torch; then
  skip 1 "torch has no CUDA device here (torch.cuda.is_available() is False)"
elif ! has_triton; then
  skip 1 "triton is not installed"
else
  echo "== part 1: Triton kernels on $(python -c 'import torch; print(torch.cuda.get_device_name())')"
  if ! python scripts/gpu_check_kernels.py | tee "$OUT/kernels.jsonl"; then status=1; fi
  if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
    echo "== part 1: CUDA kernels of plugins/cpp (GPU harness vs host harness, which the CPU tests tie to the references)"
    if ! timeout 240 python -m pytest -q -rs -m gpu tests/test_plugins_cpp.py 2>&1 | tee "$OUT/cuda_kernels.log"; then
      status=1
    fi
  else
    skip 1 "CUDA kernels: no nvcc (the GPU harness of plugins/cpp is built with nvcc)"
  fi
fi

# ---------------------------------------------------------------- part 2: TensorRT
if ! has_cuda_torch; then
  skip 2 "no CUDA device"
elif ! has_tensorrt; then
  skip 2 "TensorRT is not installed (pip install 'tcexport[trt10]' or '[trt11]')"
else
  echo "== part 2: TensorRT $(python -c 'import tensorrt; print(tensorrt.__version__)')"
  M="$OUT/models"; mkdir -p "$M"
  run() { echo "+ $*"; "$@" >>"$OUT/part2.log" 2>&1 || { echo "FAILED: $*"; tail -3 "$OUT/part2.log"; status=1; return 1; }; }
  rm -f "$M"/*.onnx
  run tcexport export timm:vit_base_patch16_224 --seed 0 -o "$M/vit_b16.onnx"
  for impl in subgraph function plugin; do
    run tcexport compress "$M/vit_b16.onnx" --method tome --r 16 --impl "$impl" -o "$M/tome_$impl.onnx"
  done
  tcexport inspect "$M/tome_subgraph.onnx" --json > "$OUT/inspect.json" 2>>"$OUT/part2.log"
  plugins=auto   # the C++ library when $TCEXPORT_PLUGIN_LIBRARY or plugins/cpp/build has one, else Python
  engines=()
  for precision in fp32 fp16; do
    for name in vit_b16 tome_subgraph tome_function tome_plugin; do
      if [ "$(elapsed)" -gt "$BUDGET_S" ]; then
        echo "SKIP build $name $precision: past the ${BUDGET_S}s budget"; continue
      fi
      dir="$OUT/engines/$name-$precision"
      rm -rf "$dir"
      if run tcexport build "$M/$name.onnx" --backend trt --precision "$precision" --batch 1,8,64 \
          --plugins "$plugins" --timing-cache "$OUT/timing.cache" -o "$dir"; then
        engines+=("$dir")
        if [ "$name" != vit_b16 ]; then
          run tcexport validate "$dir" --samples 2 --batch 1,8 --json "$OUT/validate-$name-$precision.json"
        fi
      fi
    done
  done
  for precision in fp32 fp16; do
    set -- $(printf '%s\n' "${engines[@]}" | grep -- "-$precision$")
    if [ $# -gt 1 ] && [ "$(elapsed)" -lt $(( BUDGET_S + 60 )) ]; then
      run tcexport bench "$@" --batch 1,8,64 --iters 50 --json "$OUT/bench-$precision.json"
    fi
  done
  python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
flops = json.loads((out / "inspect.json").read_text())["token_schedule"]["flops"]
print(f"FLOP-ideal speedup of ToMe r=16: {flops['ideal_speedup']:.2f}x")
for path in sorted(out.glob("bench-*.json")):
    for entry in json.loads(path.read_text())["results"]:
        print(f"{path.stem:12s} {entry['artifact']:28s} batch {entry['batch']:3d}  median "
              f"{entry['latency_ms']['median']:8.3f} ms  speedup {entry.get('speedup') or 1.0:5.2f}x")
PY
fi
echo "gpu_check finished in $(elapsed)s with status $status"
exit $status
