#!/usr/bin/env python
"""The latency-budget acceptance run of `tcexport tune` on ViT-B/16 (BENCHMARKS.md, "Tuned schedules").

    python scripts/tune_vitb_latency.py [--budget 0.70] [--trials 8] [--out out/tune_vitb]

1. exports timm:vit_base_patch16_224 (seeded random weights; latency does not depend on them) unless
   OUT/base.onnx exists, and writes 8 seeded random images as the calibration .npz;
2. runs `tcexport tune OUT/base.onnx --budget latency=B` on ONNX Runtime CPU at batch 1;
3. builds the best plan's recipe (`tcexport build OUT/tune/best.yaml`) and runs a fresh `tcexport bench` of the
   uncompressed build against it at batch 1, and reports whether the measured speedup meets 1 / B.
Exit status 0 when it does, 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def tcexport(*args: str) -> None:
    command = [sys.executable, "-m", "tcexport.cli", *args]
    print("$ tcexport", " ".join(args), flush=True)
    subprocess.run(command, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.70)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--methods", default="tome,topk")
    parser.add_argument("--iters", type=int, default=30, help="timed runs per model in the fresh bench")
    parser.add_argument("--out", type=Path, default=Path("out/tune_vitb"))
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = out / "base.onnx"
    if not base.exists():
        tcexport("export", "timm:vit_base_patch16_224", "-o", str(base))
    calib = out / "calib.npz"
    images = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
    np.savez(calib, pixel_values=images)
    tune_dir = out / "tune"
    tcexport("tune", str(base), "--budget", f"latency={args.budget:g}", "--data", str(calib), "--methods",
             args.methods, "--trials", str(args.trials), "--holdout", "0.25", "-o", str(tune_dir), "--force")
    summary = json.loads((tune_dir / "tune.json").read_text())
    tcexport("build", str(base), "-o", str(out / "base-ort"), "--force")
    tcexport("build", str(tune_dir / "best.yaml"), "-o", str(out / "tuned-ort"), "--force")
    bench_json = out / "bench.json"
    # The recipe's output holds baseline/ and compressed/ builds; the fresh bench times our own baseline build
    # against its compressed one.
    tcexport("bench", str(out / "base-ort"), str(out / "tuned-ort" / "compressed"), "--batch", "1", "--iters",
             str(args.iters), "--json", str(bench_json))
    results = json.loads(bench_json.read_text())["results"]
    speedup = next(r["speedup"] for r in results if r["artifact"] != results[0]["artifact"])
    needed = 1 / args.budget
    best = summary["best"]
    print(f"\ntuned plan: {' + '.join(best['stages'])}")
    print(f"tune's measured latency ratio (upper quartile of rounds): {best['cost']:.3f} (budget {args.budget:g}); "
          f"trials {summary['trials']}, {summary['seconds'] / 60:.1f} min")
    print(f"fresh bench: speedup {speedup:.2f}x, budget needs >= {needed:.2f}x: "
          f"{'met' if speedup >= needed else 'NOT met'}")
    return 0 if speedup >= needed else 1


if __name__ == "__main__":
    sys.exit(main())
