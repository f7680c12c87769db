"""`tcexport tune MODEL.onnx --budget ... --data CALIB -o OUT_DIR`: check the request, search, write the outputs.

Cheap checks come first (paths, budget, counts, the data's kind, Ray's presence, the output directory), so bad
input is one line before torch or onnxruntime load; then the data is read and fitted to the model's inputs
(still before anything is written).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from tcexport.core.atomic import check_writable
from tcexport.core.errors import UsageError, ValidationFailed
from tcexport.tune import budget as budget_mod
from tcexport.tune import calibration, outputs


def check_out_dir(path: Path, force: bool) -> None:
    path = check_writable(path, "-o", directory=True)
    if path.exists() and not path.is_dir():
        raise UsageError(f"-o {path}: exists and is not a directory; choose another -o")
    if path.is_dir() and any(path.iterdir()) and not (path / outputs.SUMMARY).exists() and not force:
        raise UsageError(f"{path}: exists and holds files tcexport tune did not write; pass --force to replace it, "
                         "or choose another -o")


def _constant(shape: dict, depth: int) -> bool:
    """A structured start's constant plan: every block, the same amount (the usual hand config)."""
    return shape["start"] == 0 and shape["stop"] == depth - 1 and shape["every"] == 1 and shape["slope"] == 0


def check_request(model: Path, budget_text: str, data: Path, out_dir: Path, trials: int | None,
                  time_limit: float | None, holdout: float, ray: str | None, force: bool) -> budget_mod.Budget:
    from tcexport import pipeline

    pipeline.check_onnx_input(model)
    budget = budget_mod.parse(budget_text)
    if trials is not None and trials < 1:
        raise UsageError(f"--trials must be >= 1; got {trials}")
    if time_limit is not None and time_limit <= 0:
        raise UsageError(f"--time must be a positive number of seconds; got {time_limit:g}")
    if not 0 < holdout < 1:
        raise UsageError(f"--holdout must be a fraction between 0 and 1 (e.g. 0.25); got {holdout:g}")
    calibration.kind_of(data)
    if importlib.util.find_spec("optuna") is None:
        raise UsageError("tcexport tune needs optuna, which is not installed; pip install 'tcexport[tune]'")
    if ray is not None and importlib.util.find_spec("ray") is None:
        raise UsageError("--ray needs Ray, which is not installed; pip install 'tcexport[ray]'")
    check_out_dir(out_dir, force)
    return budget


def tune(model_path: Path, budget_text: str, data: Path, out_dir: Path, methods_text: str | None = None,
         trials: int | None = None, time_limit: float | None = None, holdout: float = 0.25,
         metric: str | None = None, ray: str | None = None, seed: int = 0, threads: int | None = None,
         protected: int | None = None, force: bool = False) -> dict:
    if trials is None and time_limit is None:
        trials = 24
    budget = check_request(model_path, budget_text, data, out_dir, trials, time_limit, holdout, ray, force)
    from tcexport.models import inputs
    from tcexport.core import metadata
    from tcexport.core import onnxfile
    from tcexport.core import progress
    from tcexport.tune import objective, search, space

    names = space.parse_methods(methods_text)
    metric_fn = objective.load_metric(metric)
    model = onnxfile.load(model_path)
    if metadata.read(model, metadata.COMPRESSION):
        raise UsageError(f"{model_path} is already compressed; tune the uncompressed export")
    specs = inputs.specs_from_graph(model)
    feeds = calibration.load(data, specs, metadata.read(model, metadata.SOURCE))
    split = calibration.split(feeds, holdout, str(data))
    started = time.perf_counter()
    with progress.step(f"tune: uncompressed model on {calibration.count(split.search)} search samples "
                       f"({calibration.count(split.holdout)} held out)") as item:
        evaluator = objective.Evaluator(model, split.search, metric_fn, threads, protected)
        s = evaluator.structure
        item.note(f"{s.depth} blocks, {s.tokens} tokens, {s.protected} protected")
    latency = None
    if budget.kind == "latency":
        from tcexport.tune.latency import LatencyMeter

        latency = LatencyMeter(evaluator.model, {k: v[:1] for k, v in split.search.items()}, threads)
    remote = None
    if ray is not None:
        from tcexport.tune.remote import RayPool

        with progress.step(f"tune: Ray at {ray}") as item:
            remote = RayPool(ray, evaluator, metric)
            item.note(f"{remote.parallel} CPUs")
    try:
        result = search.run(evaluator, budget, names, trials, time_limit, seed=seed, latency=latency, remote=remote)
    finally:
        if remote is not None:
            remote.close()
    best = result.best()
    summary = {"model": str(model_path), "budget": budget.text(), "methods": list(names), "data": str(data),
               "samples": {"search": split.search_index, "holdout": split.holdout_index},
               "trials": sum(1 for r in result.records if r["role"] in ("start", "search")),
               "polished": sum(1 for r in result.records if r["role"] == "polish"), "interrupted": result.interrupted,
               "search_seconds": result.seconds, "ray": ray, "best": None}
    recipe = None
    if best is not None:
        holdout_reference = objective.run_all(objective.session(evaluator.model, threads), split.holdout)

        def held_out(stages: list[str]) -> float:
            compressed, _ = evaluator.compress(stages)
            return evaluator.fidelity(compressed, split.holdout, holdout_reference)[0]

        summary["best"] = {"stages": best["stages"], "describe": best["describe"], "cost": best["cost"],
                           "costs": best["costs"], "tokens": best["tokens"], "fidelity_search": best["fidelity"],
                           "fidelity_holdout": held_out(best["stages"])}
        summary["constant_plans"] = [{"describe": r["describe"], "stages": r["stages"], "cost": r["cost"],
                                      "fidelity_search": r["fidelity"], "fidelity_holdout": held_out(r["stages"])}
                                     for r in result.feasible() if r["role"] == "start"
                                     and _constant(r["shape"], evaluator.structure.depth) and not r.get("repeat")]
        recipe = outputs.recipe_for(model_path, best["stages"], evaluator.protected)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    outputs.write(Path(out_dir), summary, result.records, recipe, budget)
    if best is None:
        raise ValidationFailed(f"no plan met --budget {budget.text()} in {summary['trials']} trials; the trials are "
                               f"in {out_dir}/trials.jsonl", summary)
    return summary
