#!/usr/bin/env python
"""Wall-clock cost of the inserted ops of two compressed models, A and B, measured in alternation.

    python scripts/compare_inserted_cost.py A.onnx B.onnx [--batch 1] [--reps 4] [--iters 24]

Each rep measures A then B (B then A on odd reps) with tcexport.bench.inserted_cost (the inserted ops cut out of the
model and fed what the model feeds them, threads asleep between runs as `tcexport bench` runs sessions), so a slow
spell of a shared machine falls on both. Prints every rep and the medians. For comparing two graph forms of the
same compression (e.g. a build of an older commit against the current one) on the same model.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from tcexport.bench import inserted_cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--iters", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    measured: dict[str, list[float]] = {"a": [], "b": []}
    nodes = {}
    for rep in range(args.reps):
        for key in ("a", "b") if rep % 2 == 0 else ("b", "a"):
            result = inserted_cost.inserted_wall_time(getattr(args, key), args.batch, iters=args.iters,
                                                      threads=args.threads)
            measured[key].append(result["inserted_ms"])
            nodes[key] = result["inserted_nodes"]
    summary = {key: {"model": getattr(args, key), "inserted_nodes": nodes[key],
                     "inserted_ms_per_rep": [round(v, 3) for v in values],
                     "inserted_ms_median": round(float(np.median(values)), 3)} for key, values in measured.items()}
    summary["b_over_a"] = round(summary["b"]["inserted_ms_median"] / summary["a"]["inserted_ms_median"], 3)
    summary["batch"] = args.batch
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
