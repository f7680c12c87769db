"""What a recipe run reports: summary.json (token schedule, validation verdict, speedup per batch size, stage
timings) and what it prints at the end (the bench table, the validation report, one speedup line per batch)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from tcexport.recipes.schema import Recipe


def build(recipe: Recipe, final: Path, export_check, tokens, report, builds: dict, bench: dict | None,
          timings: dict[str, float], extra_inputs: list[str]) -> dict:
    """The summary of a run whose files lie in FINAL (the paths it names are relative to it)."""
    from tcexport import __version__

    validation = None
    if report is not None:
        data = report.to_json()
        validation = {key: data[key] for key in ("passed", "atol", "rtol", "max_abs", "max_rel",
                                                 "numeric_failures", "discrete_divergences")}
        validation["samples"] = len(report.samples)
        validation["fidelity"] = _mean_fidelity(report.samples)
    speedup = []
    if bench:
        by_key = {(e["artifact"], e["batch"]): e for e in bench["results"]}
        for batch in bench["settings"]["batches"]:
            base = by_key.get(("baseline", batch))
            comp = by_key.get(("compressed", batch))
            if base and comp:
                speedup.append({"batch": batch, "baseline_median_ms": base["latency_ms"]["median"],
                                "compressed_median_ms": comp["latency_ms"]["median"],
                                "speedup": comp["speedup"]})
    token_summary = None
    if tokens:
        by_method: dict[str, dict] = {}
        for entry in tokens:
            if entry["method"]:
                found = by_method.setdefault(entry["method"], {"blocks": [], "removed": 0})
                found["blocks"].append(entry["block"])
                found["removed"] += entry["in"] - entry["out"]
        token_summary = {"in": tokens[0]["in"], "out": tokens[-1]["out"], "path": token_path(tokens),
                         "by_method": by_method,
                         "per_block": [{k: s[k] for k in ("block", "method", "in", "out")} for s in tokens]}
    return {
        "tool": f"tcexport {__version__}",
        "name": recipe.name,
        "recipe": "recipe.yaml",
        "recipe_source": str(recipe.path.resolve()) if recipe.path else None,
        "recipe_sha256": hashlib.sha256(recipe.path.read_bytes()).hexdigest() if recipe.path else None,
        "model": recipe.model.spec,
        "output_dir": str(final),
        "export_check": export_check,
        "compression": None if not recipe.compress else {
            **recipe.compress.model_dump(mode="json"),
            "plan": recipe.compress.describe(),
            **({"extra_inputs": extra_inputs} if extra_inputs else {})},
        "tokens": token_summary,
        "validation": validation,
        "builds": {name: {"dir": f"{name}/", "provider": s["provider"], "nodes_before": s["nodes_before"],
                          "nodes_after": s["nodes_after"]} for name, s in builds.items()},
        "bench": None if not bench else {"file": "bench.json", "plot": "bench.png", **bench["settings"]},
        "speedup": speedup,
        "timings_s": timings,
    }


def write(summary: dict, path: Path) -> None:
    """summary.json (NaN and inf written as null)."""
    path.write_text(json.dumps(_finite(summary), indent=2) + "\n")


def print_results(summary: dict, bench: dict | None, report, echo: Callable[[str], None], work: Path, final: Path,
                  out_dir: Path) -> None:
    """The end of a run's output: the bench table, the validation report (naming FINAL, not the temporary WORK
    directory) and one speedup line per batch size, naming the builds under OUT_DIR as the user wrote it."""
    if bench:
        from tcexport.bench import report as bench_report

        bench_report.print_table(bench)
    if report is not None:
        from tcexport.validate import equality as validate_mod

        echo(validate_mod.format_report(report).replace(str(work), str(final)))
    for entry in summary["speedup"]:
        echo(f"speedup at batch {entry['batch']}: {entry['speedup']:.2f}x, {out_dir / 'compressed'} "
             f"vs {out_dir / 'baseline'} (median {entry['compressed_median_ms']:.3f} ms vs "
             f"{entry['baseline_median_ms']:.3f} ms)")


def token_path(schedule: list[dict]) -> str:
    """'197 -> 189 -> 181 ...': the tokens into the first block, then out of each."""
    return " -> ".join([str(schedule[0]["in"])] + [str(s["out"]) for s in schedule]) if schedule else ""


def _mean_fidelity(samples: list[dict]) -> dict:
    values: dict[str, list[float]] = {}
    for sample in samples:
        for output, fidelity in sample["fidelity"].items():
            for key, value in fidelity.items():
                if isinstance(value, float):
                    values.setdefault(f"{output}.{key}", []).append(value)
    return {key: sum(v) / len(v) for key, v in values.items()}


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
