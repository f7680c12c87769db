"""Whole-pipeline entry points that chain stages (export -> build), used by the CLI and recipes.

Each entry point checks its inputs first (paths, spec, options, whether the output may be replaced) and only then
imports torch, timm, transformers or onnxruntime: a typo costs milliseconds, not the seconds those imports take.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tcexport.core import overwrite
from tcexport.core import progress
from tcexport.models import spec_check
from tcexport.core.errors import UsageError
from tcexport.recipes.loading import RECIPE_SUFFIXES


def check_onnx_input(path: str | Path) -> Path:
    """An existing .onnx file given as a command's input."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise UsageError(f"{path}: is a directory; pass an .onnx file")
    return path


def load_source(spec: str, **load_options):
    """sources.load under a progress line (loading timm/transformers and the weights takes seconds)."""
    with progress.step(f"load {spec}"):
        from tcexport.models import sources

        return sources.load(spec, **load_options)


def export(spec: str, output: Path, opset: int = 18, batch: str | int | None = "dynamic", check: bool = True,
           atol: float | None = None, exporter: str = "dynamo", force: bool = False, **load_options):
    """`tcexport export`: check everything cheap, then load, export and check against PyTorch."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise UsageError(f"output {output} must end with .onnx")
    fixed_batch = spec_check.parse_batch(batch)
    spec_check.check(spec, **load_options)
    overwrite.check_file(output, force)
    if spec.startswith("hf:") and (fixed_batch is not None or exporter != "dynamo"):
        _refuse_decoder_options(spec, fixed_batch, exporter)
    if load_options.get("all_logits"):
        from tcexport.models import sources

        sources.refuse_all_logits_unless_decoder(spec)  # before the output path's checks pass and the load starts
    from tcexport.export import exporter as export_mod

    source = load_source(spec, **load_options)
    return export_mod.export_to_file(source, output, opset=opset, batch=fixed_batch, check=check, atol=atol,
                                     exporter=exporter)


def _refuse_decoder_options(spec: str, fixed_batch: int | None, exporter: str) -> None:
    """A causal LM exports with the dynamo exporter and a dynamic batch only; say so before it loads (the same
    line export_model says after loading, for callers that skip this entry point)."""
    from tcexport.models import causal

    if causal.locate(spec.partition(":")[2]) is not None:
        raise UsageError(f"{spec} is a causal LM: its decoder graph exports with the dynamo exporter and a "
                         "dynamic batch (drop --exporter torchscript / --batch)")


def build(source_arg: str, output: Path, provider: str = "cpu", opt_level: str = "all", threads: int | None = None,
          opset: int = 18, force: bool = False, **load_options) -> dict:
    """Build an ONNX Runtime artifact from an .onnx file, or export a model spec first and build that."""
    if source_arg.endswith(RECIPE_SUFFIXES):
        return build_recipe(source_arg, output, provider=provider, opt_level=opt_level, threads=threads, opset=opset,
                            force=force, **load_options)
    if source_arg.endswith(".onnx"):
        check_onnx_input(source_arg)
    else:
        spec_check.check(source_arg, **load_options)
    overwrite.check_build_dir(output, force)
    from tcexport.backends import ort as ort_backend

    ort_backend.provider_name(provider)  # a missing provider is said before the export, not after it
    what = f"build ONNX Runtime {provider}, opt level {opt_level} -> {output}"
    if source_arg.endswith(".onnx"):
        with progress.step(what):
            return ort_backend.build(source_arg, output, provider=provider, threads=threads, opt_level=opt_level)
    from tcexport.export import exporter as export_mod

    source = load_source(source_arg, **load_options)
    with tempfile.TemporaryDirectory(prefix="tcexport-") as tmp:
        exported = Path(tmp) / "model.onnx"
        export_mod.export_to_file(source, exported, opset=opset)
        with progress.step(what):
            # The temporary export vanishes with tmp: the sidecar names the spec the user gave instead.
            return ort_backend.build(exported, output, provider=provider, threads=threads, opt_level=opt_level,
                                     source_model=source_arg)


def build_recipe(recipe_path: str, output: Path, provider: str = "cpu", opt_level: str = "all",
                 threads: int | None = None, opset: int = 18, force: bool = False, **load_options) -> dict:
    """Run a YAML recipe (export -> compress -> validate -> build -> bench) into OUTPUT; see tcexport.recipes.runner.

    The recipe is the whole configuration: build/export options given beside it would silently compete with
    the file's, so they are refused.
    """
    given = {"--provider": provider != "cpu", "--opt-level": opt_level != "all", "--threads": threads is not None,
             "--opset": opset != 18, **{f"--{k.replace('_', '-')}": bool(v) or (k == "seed" and v is not None)
                                        for k, v in load_options.items()}}
    clashing = [flag for flag, set_ in given.items() if set_]
    if clashing:
        raise UsageError(f"{', '.join(clashing)} cannot be combined with a recipe; set "
                         f"{'it' if len(clashing) == 1 else 'them'} in {recipe_path} (sections model, export, build, "
                         "bench)")
    from tcexport.recipes import runner

    return runner.build_from_file(recipe_path, output, force=force)
