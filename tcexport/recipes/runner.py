"""Running a recipe: export -> compress -> validate -> build -> bench, stage by stage, into an output directory.

    tcexport build recipes/minilm_tome.yaml -o out/minilm

`run(recipe, out_dir)` executes it into a temporary directory beside OUT_DIR and renames it into place at the
end, so a failed stage (or a failed validation: exit 1) leaves no OUT_DIR. The directory holds:

    model.onnx        the export (tcexport.source provenance)
    model.tc.onnx     the compressed model (absent when the recipe has no compress section)
    validate.json     the validation report (absent with validate: false)
    baseline/         ONNX Runtime build of model.onnx      (each with tcexport-build.json)
    compressed/       ONNX Runtime build of model.tc.onnx
    bench.json        baseline vs compressed, interleaved runs (absent with bench: false)
    bench.png
    recipe.yaml       the resolved recipe (defaults filled in, paths absolute): runs again as is
    summary.json      token schedule, validation verdict, speedup per batch size, stage timings (recipes.summary)

check_output refuses an OUT_DIR whose replacement would destroy something this recipe did not write (--force).
A stage's error names the recipe's fields instead of the CLI flags the stage's own message uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

from tcexport.core import progress
from tcexport.core.errors import UsageError, ValidationFailed
from tcexport.core.overwrite import SUMMARY
from tcexport.recipes import summary as summary_mod
from tcexport.recipes.fields import recipe_terms
from tcexport.recipes.loading import load
from tcexport.recipes.schema import Recipe

Echo = Callable[[str], None]

_FLAG_FIELDS = {
    "export": {"--opset": "export.opset", "--exporter": "export.exporter", "--batch": "export.batch",
               "--checkpoint": "model.checkpoint", "--pretrained": "model.pretrained", "--seed": "model.seed",
               "--input-shape": "model.input_shape", "--seq-len": "model.seq_len", "--model-arg": "model.model_args"},
    "compress": {"--r": "compress.r", "--layers": "compress.layers", "--schedule": "compress.schedule",
                 "--impl": "compress.impl", "--protected": "compress.protected"},
}


_STAGES_FLAG_FIELDS = {"--stage": "compress.stages", "--layers": "layers", "--r": "r"}


def _in_stage(recipe: Recipe, stage: str, exc: UsageError) -> UsageError:
    """A stage's error, said in the recipe's terms (its field names instead of CLI flags)."""
    text = str(exc)
    flags = _FLAG_FIELDS.get(stage, {})
    if stage == "compress" and recipe.compress and recipe.compress.stages is not None:
        flags = {**flags, **_STAGES_FLAG_FIELDS}
    for flag, field in flags.items():
        text = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", field, text)
    if stage == "compress":
        text = recipe_terms(text)  # a method's --keep-count is its parameter keep_count
    return UsageError(f"{recipe.path or 'recipe'}: {stage}: {text}")


def check_output(recipe: Recipe, out_dir: Path, force: bool = False) -> str | None:
    """Refuse an OUT_DIR whose replacement would destroy something this recipe did not write (see
    tcexport.core.overwrite; --force replaces it anyway). Returns the note to show when an earlier output goes."""
    from tcexport.core import overwrite

    out = out_dir.resolve()
    if recipe.path is not None and out in recipe.path.resolve().parents:
        raise UsageError(f"{out_dir}: holds the recipe itself and would be replaced; choose another -o")
    return overwrite.check_recipe_dir(out_dir, recipe.path, force)


def run(recipe: Recipe, out_dir: str | Path, echo: Echo | None = None, force: bool = False) -> dict:
    """Run every stage into OUT_DIR (atomically); return the summary (also written as summary.json)."""
    from tcexport.core.atomic import atomic_dir

    echo = echo or _echo
    out_dir = Path(out_dir)
    replacing = check_output(recipe, out_dir, force)
    if replacing:
        echo(replacing)
    stages = ["export", "compress" if recipe.compress else None, "validate" if recipe.validation else None,
              "build", "bench" if recipe.bench else None]
    runner = _Runner(recipe, echo, [s for s in stages if s], out_dir)
    echo(f"recipe {recipe.name} ({recipe.path or 'in memory'}) -> {out_dir}")
    with atomic_dir(out_dir) as tmp:
        summary = runner.run(tmp.resolve(), out_dir.resolve())
    echo(f"summary: {out_dir / SUMMARY}")
    return summary


def _echo(text: str) -> None:
    import click

    click.echo(text)


class _Runner:
    def __init__(self, recipe: Recipe, echo: Echo, stages: list[str], out_dir: Path):
        self.recipe = recipe
        self.out_dir = out_dir
        self.echo = echo
        self.stages = stages
        self.timings: dict[str, float] = {}
        self.extra_inputs: list[str] = []

    @contextlib.contextmanager
    def stage(self, stage: str, text: str) -> Iterator[progress.Step]:
        """One stage under a progress line on stderr ('[2/5] compress  ...: what it found (12.3 s)')."""
        with progress.step(f"[{self.stages.index(stage) + 1}/{len(self.stages)}] {stage:<9} {text}") as item:
            yield item
            self.timings[stage] = round(item.elapsed, 3)

    def run(self, work: Path, final: Path) -> dict:
        recipe = self.recipe
        exported = work / "model.onnx"
        export_check = self.export(exported)
        model = exported
        tokens = None
        if recipe.compress:
            model = work / "model.tc.onnx"
            tokens = self.compress(exported, model)
        report = self.validate(model, work / "validate.json") if recipe.validation else None
        builds = self.build(exported, model if recipe.compress else None, work)
        bench = self.bench(work, list(builds)) if recipe.bench else None
        (work / "recipe.yaml").write_text(
            f"# resolved from {recipe.path or 'an in-memory recipe'} by tcexport (defaults filled in)\n"
            + recipe.to_yaml())
        summary = summary_mod.build(recipe, final, export_check, tokens, report, builds, bench, self.timings,
                                    self.extra_inputs)
        summary_mod.write(summary, work / SUMMARY)
        _repoint(work, final)
        summary_mod.print_results(summary, bench, report, self.echo, work, final, self.out_dir)
        return summary

    # ------------------------------------------------------------------ stages

    def export(self, output: Path) -> dict | None:
        recipe, model = self.recipe, self.recipe.model
        if model.spec.endswith(".onnx"):
            with self.stage("export", f"{model.spec} (already exported) -> model.onnx") as item:
                shutil.copyfile(model.spec, output)
                item.note("copied")
            return None
        from tcexport.export import exporter as export_mod
        from tcexport.models import sources

        options = dict(pretrained=model.pretrained, checkpoint=model.checkpoint, seed=model.seed,
                       input_shape=model.input_shape, seq_len=model.seq_len, model_args=model.model_args)
        described = ", ".join(f"{k} {v}" for k, v in options.items() if v not in (None, False))
        with self.stage("export", f"{model.spec}{f' ({described})' if described else ''}, opset "
                                  f"{recipe.export.opset}, batch {recipe.export.batch} -> model.onnx") as item:
            try:
                source = sources.load(model.spec, **options)
                check = export_mod.export_to_file(source, output, opset=recipe.export.opset,
                                                  batch=export_mod.parse_batch(recipe.export.batch),
                                                  check=recipe.export.check, atol=recipe.export.atol,
                                                  exporter=recipe.export.exporter)
            except UsageError as exc:
                raise _in_stage(recipe, "export", exc) from None
            if check:
                item.note(check.summary())
        return {"passed": check.passed, "max_abs": check.max_abs, "atol": check.atol} if check else None

    def compress(self, exported: Path, output: Path) -> list[dict]:
        from tcexport.compress import rewrite as compress_mod
        from tcexport.core import metadata
        from tcexport.core import onnxfile

        c = self.recipe.compress
        with self.stage("compress", f"{c.describe()} -> model.tc.onnx") as item:
            try:
                schedule = compress_mod.compress_file(exported, output, **c.plan())
            except UsageError as exc:
                raise _in_stage(self.recipe, "compress", exc) from None
            item.note("tokens per block: " + summary_mod.token_path(schedule))
        # Which method ran at which block (the token schedule alone does not say), and inputs a method added.
        record = metadata.read(onnxfile.load(output, load_external_data=False), metadata.COMPRESSION) or {}
        by_block = dict(zip(record.get("layers", []), record.get("methods", [])))
        schedule = [{**entry, "method": by_block.get(entry["block"])} for entry in schedule]
        self.extra_inputs = [spec["name"] for spec in record.get("extra_inputs", [])]
        if self.extra_inputs:
            self.echo(f"compress: the compressed model takes the extra input(s) {', '.join(self.extra_inputs)}")
        return schedule

    def validate(self, model: Path, json_path: Path):
        from tcexport.validate import equality as validate_mod

        v = self.recipe.validation
        samples = f"{v.samples} sample{'s' if v.samples > 1 else ''}"
        with self.stage("validate", f"{model.name} vs PyTorch: {samples}, batch {','.join(map(str, v.batch))}, "
                                    f"atol {v.atol:g}, rtol {v.rtol:g}") as item:
            try:
                report = validate_mod.run(model, json_path=json_path, samples=v.samples, seed=v.seed, atol=v.atol,
                                          rtol=v.rtol, batches=tuple(v.batch), threads=v.threads)
            except UsageError as exc:
                raise _in_stage(self.recipe, "validate", exc) from None
            except ValidationFailed as exc:
                # The report names the temporary directory, which is about to vanish: name the file alone.
                text = str(exc).replace(f"{model.parent}{os.sep}", "")
                raise ValidationFailed(f"{text}\n{self.recipe.path or 'recipe'}: nothing written to {self.out_dir}; "
                                       "loosen validate.atol/rtol or compress less", exc.report) from None
            item.note(f"passed: max abs {report.worst('max_abs'):.2e}, {len(report.diverged)} discrete divergence(s)")
        return report

    def build(self, exported: Path, compressed: Path | None, work: Path) -> dict[str, dict]:
        from tcexport.backends import ort as ort_backend

        b = self.recipe.build
        targets = {"baseline": exported, **({"compressed": compressed} if compressed else {})}
        builds = {}
        with self.stage("build", f"{b.backend} {b.provider}, opt level {b.opt_level}: "
                                 + ", ".join(f"{src.name} -> {name}/" for name, src in targets.items())) as item:
            try:
                for name, source in targets.items():
                    builds[name] = ort_backend.build(source, work / name, provider=b.provider, threads=b.threads,
                                                     opt_level=b.opt_level)
            except UsageError as exc:
                raise _in_stage(self.recipe, "build", exc) from None
            item.note(", ".join(f"{name}: {s['nodes_before']} -> {s['nodes_after']} nodes" for name, s in builds.items()))
        return builds

    def bench(self, work: Path, names: list[str]) -> dict:
        from tcexport.bench import report as bench_report
        from tcexport.bench import session as bench_session
        from tcexport.bench import timing as bench_timing

        b = self.recipe.bench
        amount = f"{b.duration:g} s" if b.duration else f"{b.iters or bench_timing.DEFAULT_ITERS} iters"
        with self.stage("bench", f"{' vs '.join(names)}: batch {','.join(map(str, b.batch))}, {amount} "
                                 f"after {b.warmup} warm-up (interleaved)") as item:
            try:
                results = bench_session.run([work / name for name in names], batches=b.batch, threads=b.threads,
                                            warmup=b.warmup, iters=b.iters, duration=b.duration)
                bench_report.write_json(results, work / "bench.json")
                bench_report.write_plot(results, work / "bench.png")
            except UsageError as exc:
                raise _in_stage(self.recipe, "bench", exc) from None
            item.note("bench.json, bench.png")
        return results


def _repoint(work: Path, final: Path) -> None:
    """Paths recorded while building point into the temporary directory; point them at OUT_DIR instead."""
    old, new = str(work), str(final)

    def fix(value: Any) -> Any:
        if isinstance(value, str) and old in value:
            return value.replace(old, new)
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    for path in work.rglob("*.json"):
        text = path.read_text()
        if old in text:
            path.write_text(json.dumps(fix(json.loads(text)), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- CLI entry


def build_from_file(path: str | Path, output: str | Path, echo: Echo | None = None, force: bool = False) -> dict:
    """`tcexport build RECIPE.yaml -o DIR`: load, run, and return the main build's sidecar (for the CLI's line)."""
    from tcexport.core import overwrite

    overwrite.check_recipe_dir(output, Path(path), force)  # before load: the schema's checks import torch
    recipe = load(path)
    summary = run(recipe, output, echo=echo, force=force)
    main = "compressed" if recipe.compress else "baseline"
    from tcexport.core.artifacts import SIDECAR

    sidecar = json.loads((Path(output) / main / SIDECAR).read_text())
    sidecar["summary"] = summary
    return sidecar
