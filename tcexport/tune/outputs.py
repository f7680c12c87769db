"""What a tune run leaves in OUT_DIR (written whole, atomically):

    best.yaml      the best plan as a recipe (`tcexport build best.yaml -o DIR` runs it)
    pareto.json    every measured point (budget cost vs fidelity) and the non-dominated front
    pareto.png     the same as a plot
    trials.jsonl   one record per trial, in order
    summary.json   budget, best plan, its search and held-out fidelity, which samples were held out, timings
"""

from __future__ import annotations

import json
from pathlib import Path

from tcexport.recipes import loading
from tcexport.core.atomic import atomic_dir

SUMMARY = "tune.json"  # marks a directory as tune's own output (it may be replaced without --force)
FILES = ("best.yaml", "pareto.json", "pareto.png", "trials.jsonl", SUMMARY)


def recipe_for(model_path: Path, stages: list[str], protected: int, name: str = "tuned") -> str:
    """The plan as recipe YAML (stages in --stage form, the rest at the recipe defaults), checked by the recipe
    schema itself before it is written."""
    import yaml

    data = {"name": name, "model": {"spec": str(Path(model_path).resolve())},
            "compress": {"stages": list(stages), "protected": protected}}
    loading.parse(data, origin="tuned plan")
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


def pareto_front(points: list[dict]) -> list[dict]:
    """Points no other point beats on both cost (lower) and fidelity (higher), by increasing cost."""
    front, best = [], float("-inf")
    for point in sorted(points, key=lambda p: (p["cost"], -p["fidelity"])):
        if point["fidelity"] > best:
            front.append(point)
            best = point["fidelity"]
    return front


def points_of(records: list[dict]) -> list[dict]:
    return [{"cost": r["cost"], "fidelity": r["fidelity"], "stages": r["stages"], "role": r["role"],
             "costs": r["costs"]} for r in records if r.get("fidelity") is not None and r.get("cost") is not None]


def write_plot(points: list[dict], front: list[dict], budget, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    axes.scatter([p["cost"] for p in points], [p["fidelity"] for p in points], s=14, color="0.6", label="plans")
    axes.plot([p["cost"] for p in front], [p["fidelity"] for p in front], "o-", color="C0", label="Pareto front")
    axes.axvline(budget.ratio, color="C3", linestyle="--", label=f"budget {budget.text()}")
    axes.set_xlabel(f"{budget.kind} vs uncompressed (measured)")
    axes.set_ylabel("fidelity")
    axes.legend(loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write(out_dir: Path, summary: dict, records: list[dict], recipe: str | None, budget) -> None:
    points = points_of(records)
    front = pareto_front(points)
    with atomic_dir(out_dir) as tmp:
        if recipe is not None:
            (tmp / "best.yaml").write_text(f"# tcexport tune: best plan under {budget.text()}\n" + recipe)
        (tmp / "pareto.json").write_text(json.dumps({"budget": budget.text(), "points": points, "front": front},
                                                    indent=2) + "\n")
        if points:
            write_plot(points, front, budget, tmp / "pareto.png")
        (tmp / "trials.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
