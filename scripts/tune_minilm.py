"""The `tcexport tune` acceptance run on all-MiniLM-L6-v2 (BENCHMARKS.md, "Tuned schedules").

    python scripts/tune_minilm.py --onnx minilm.onnx --out out/tune_minilm [--trials 24]

Calibration texts: 104 runs of 6 sentences of the project's paragraphs, in four different sentence orders
(write_texts), one per blank-line-separated block; each fills all 128 tokens. `tcexport tune` holds a third of
them out. For each FLOP budget (25 % and 40 % fewer) this runs `tcexport tune`, then scores the hand configs of
section 5 and the tuned plan on the SAME held-out texts with the same code (tune's evaluator), each with its FLOP
reduction measured on its own compressed graph, and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
from pathlib import Path

# BENCHMARKS.md section 5, the MiniLM configs per target.
HAND = {
    0.75: {"tome": ["tome:r=11@all"], "topk": ["topk:keep=0.76@1,3"],
           "prune-merge": ["prune-merge:dominant=75,contextual=10@1"], "pool": ["pool:kernel=3@3"],
           "adjacent": ["adjacent:r=11@all"]},
    0.60: {"tome": ["tome:r=17@all"], "topk": ["topk:keep=0.59@1,3"],
           "prune-merge": ["prune-merge:dominant=52,contextual=7@1"], "pool": ["pool:kernel=3@2"],
           "adjacent": ["adjacent:r=17@all"]},
}


WINDOW = 6  # sentences per calibration text (~140 tokens: every text fills the 128)
STRIDES = (1, 3, 5, 7)  # 4 orders x 26 starts = 104 texts

# The hand configs' layouts as tune shapes (method, first and last block, step), so their amount can be sized to
# the measured FLOP budget exactly as tune sizes its own trials (pool moves in whole layers: not sized).
HAND_LAYOUTS = {"tome": (("tome",), 0, 5, 1), "topk": (("topk",), 1, 3, 2),
                "prune-merge": (("prune-merge",), 1, 1, 1), "adjacent": (("adjacent",), 0, 5, 1)}


def sized_to_budget(onnx_path: Path, texts: Path, holdout_index: list[int], layout: tuple, ratio: float) -> list[str]:
    from tcexport.tune import budget, search, space

    evaluator = holdout_evaluator(onnx_path, texts, tuple(holdout_index))
    methods, start, stop, every = layout
    record = search.Sizer(evaluator, budget.Budget("flops", ratio)).fit(space.Shape(methods, start, stop, every),
                                                                        ratio)
    return record["stages"]


def write_texts(path: Path) -> None:
    """Calibration texts from the shipped paragraphs: runs of WINDOW sentences, taken from the 26 sentences in
    orders of stride 1, 3, 5, 7 (cyclic), so each text mixes topics differently and fills the 128 tokens."""
    import re

    from tcexport import data

    sentences = [s for paragraph in data.paragraphs() for s in re.split(r"(?<=[.!?])\s+", paragraph.strip())]
    n = len(sentences)
    texts = [" ".join(sentences[(start + stride * k) % n] for k in range(WINDOW))
             for stride in STRIDES for start in range(n)]
    path.write_text("\n\n".join(texts) + "\n", encoding="utf-8")


@functools.lru_cache(maxsize=2)
def holdout_evaluator(onnx_path: Path, texts: Path, holdout_index: tuple[int, ...]):
    """Tune's evaluator on the held-out texts only (the uncompressed outputs computed once)."""
    from tcexport.models import inputs
    from tcexport.core import metadata
    from tcexport.core import onnxfile
    from tcexport.tune import calibration, objective

    model = onnxfile.load(onnx_path)
    feeds = calibration.load(texts, inputs.specs_from_graph(model), metadata.read(model, metadata.SOURCE))
    return objective.Evaluator(model, {k: v[list(holdout_index)] for k, v in feeds.items()})


def score_on_holdout(onnx_path: Path, texts: Path, holdout_index: list[int], stages: list[str]) -> dict:
    """FLOPs (measured) and held-out cosine of one plan, with tune's own evaluator."""
    evaluator = holdout_evaluator(onnx_path, texts, tuple(holdout_index))
    compressed, schedule = evaluator.compress(stages)
    value, compared = evaluator.fidelity(compressed)
    output = compared["sentence_embedding"]
    return {"flops_reduction": 1 - evaluator.flops_ratio(compressed), "cosine_mean": output["cosine_mean"],
            "cosine_min": output["cosine_min"],
            "tokens": [schedule[0]["in"]] + [s["out"] for s in schedule]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, required=True, help="st:all-MiniLM-L6-v2 exported at --seq-len 128")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--budgets", default="0.75,0.60")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    texts = args.out / "texts.txt"
    write_texts(texts)
    rows = []
    for ratio in (float(b) for b in args.budgets.split(",")):
        run_dir = args.out / f"flops{ratio:g}"
        command = [sys.executable, "-m", "tcexport.cli", "tune", str(args.onnx), "--budget", f"flops={ratio:g}",
                   "--data", str(texts), "--holdout", "0.33", "--trials", str(args.trials), "-o", str(run_dir),
                   "--force"]
        print("$", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True)
        summary = json.loads((run_dir / "tune.json").read_text())
        held = summary["samples"]["holdout"]
        best = summary["best"]
        tuned = score_on_holdout(args.onnx, texts, held, best["stages"])
        rows.append({"budget": ratio, "plan": "tuned", "stages": best["stages"], **tuned,
                     "trials": summary["trials"], "seconds": summary["seconds"]})
        for name, stages in HAND[ratio].items():
            rows.append({"budget": ratio, "plan": f"hand {name}", "stages": stages,
                         **score_on_holdout(args.onnx, texts, held, stages)})
            layout = HAND_LAYOUTS.get(name)
            if layout is not None:  # the same method and blocks, amount sized to the same measured FLOPs
                sized = sized_to_budget(args.onnx, texts, held, layout, ratio)
                rows.append({"budget": ratio, "plan": f"hand {name}, sized", "stages": sized,
                             **score_on_holdout(args.onnx, texts, held, sized)})
    (args.out / "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("| target | plan | measured FLOP reduction | held-out cosine mean / min | trials, time | plan |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        effort = f"{row['trials']}, {row['seconds'] / 60:.1f} min" if "trials" in row else "—"
        print(f"| {1 - row['budget']:.0%} | {row['plan']} | {row['flops_reduction']:.1%} | "
              f"{row['cosine_mean']:.4f} / {row['cosine_min']:.4f} | {effort} | `{' + '.join(row['stages'])}` |")


if __name__ == "__main__":
    main()
