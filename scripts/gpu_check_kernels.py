"""gpu_check.sh part 1: tcexport's Triton plugin kernels on the GPU against the PyTorch references, and timed.

Correctness: ViT-B/16-sized token states (N = 197, C = 768, Ck = 64) and small odd/even cases, batch 1/8/64,
with ties; sizes are small integers, so equal sizes mean equal decisions. Timing (CUDA events, median of 50):
the Triton kernel vs the method's eager PyTorch reference, which runs the same steps as the ONNX subgraph
(norm, score MatMul, max/argmax, sort, gathers, size-weighted sums) op by op. Exit 1 on a mismatch.
"""

from __future__ import annotations

import json
import os
import sys

# --smoke: the same checks on the CPU under the Triton interpreter, small cases only, untimed (tests the script).
SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cpu" if SMOKE else "cuda"

import torch  # noqa: E402

from tcexport.methods.tome import ToMe  # noqa: E402
from tcexport.methods.topk import TopK  # noqa: E402
from tcexport.plugins import kernels  # noqa: E402


def _state(batch, n, c, ck, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(batch, n, c, device=DEVICE, generator=g)
    metric = torch.randint(0, 2, (batch, n, ck), device=DEVICE, generator=g).float() if seed % 2 else \
        torch.randn(batch, n, ck, device=DEVICE, generator=g)
    size = torch.randint(1, 4, (batch, n, 1), device=DEVICE, generator=g).float()
    score = torch.softmax(torch.randn(batch, n, device=DEVICE, generator=g), dim=-1)
    return x, metric, size, score


def _median_ms(fn, iters=50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> int:
    failures, rows = [], []
    cases = ((197, 768, 64, 16, 137, 1), (33, 64, 16, 7, 10, 2), (20, 48, 8, 9, 5, 0))
    for batch in ((1, 3) if SMOKE else (1, 8, 64)):
        for n, c, ck, r, k, protected in (cases[1:] if SMOKE else cases):
            x, metric, size, score = _state(batch, n, c, ck, seed=batch + n)
            tome, prune = ToMe(r=r), TopK(keep_count=k, fuse=True)
            checks = {
                "tome": (lambda: kernels.tome_merge(x, metric, size, None, r, protected),
                         lambda: tome.reference(x, metric, size, None, protected)),
                "topk": (lambda: kernels.token_prune(x, score, size, None, k, protected, True, False),
                         lambda: prune.reference(x, None, size, None, protected, {"cls_attention": score})),
            }
            for name, (kernel, reference) in checks.items():
                got, want = kernel(), reference()
                same = torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
                if not same:
                    failures.append(f"{name} B={batch} N={n} C={c}")
                row = {"op": name, "batch": batch, "n": n, "c": c, "equal": same}
                if n == 197:
                    row["triton_ms"] = round(_median_ms(kernel), 4)
                    row["torch_reference_ms"] = round(_median_ms(reference), 4)
                rows.append(row)
    for row in rows:
        print(json.dumps(row))
    if failures:
        print("MISMATCH: " + "; ".join(failures), file=sys.stderr)
        return 1
    where = "the CPU (Triton interpreter)" if SMOKE else torch.cuda.get_device_name()
    print(f"part 1: {len(rows)} Triton kernel checks equal the references on {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
