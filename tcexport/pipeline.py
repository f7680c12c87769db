"""Whole-pipeline entry points that chain stages (export -> build), used by the CLI and recipes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tcexport import export, sources
from tcexport.backends import ort as ort_backend
from tcexport.errors import UsageError


def build(source_arg: str, output: Path, provider: str = "cpu", opt_level: str = "all", threads: int | None = None,
          opset: int = 18, **load_options) -> dict:
    """Build an ONNX Runtime artifact from an .onnx file, or export a model spec first and build that."""
    if source_arg.endswith((".yaml", ".yml")):
        return build_recipe(source_arg, output, provider=provider, opt_level=opt_level, threads=threads, opset=opset,
                            **load_options)
    if source_arg.endswith(".onnx"):
        return ort_backend.build(source_arg, output, provider=provider, threads=threads, opt_level=opt_level)
    source = sources.load(source_arg, **load_options)
    with tempfile.TemporaryDirectory(prefix="tcexport-") as tmp:
        exported = Path(tmp) / "model.onnx"
        export.export_to_file(source, exported, opset=opset)
        return ort_backend.build(exported, output, provider=provider, threads=threads, opt_level=opt_level)


def build_recipe(recipe_path: str, output: Path, provider: str = "cpu", opt_level: str = "all",
                 threads: int | None = None, opset: int = 18, **load_options) -> dict:
    """Run a YAML recipe (export -> compress -> validate -> build -> bench) into OUTPUT; see tcexport.recipes.

    The recipe is the whole configuration: build/export options given beside it would silently compete with
    the file's, so they are refused.
    """
    from tcexport import recipes

    given = {"--provider": provider != "cpu", "--opt-level": opt_level != "all", "--threads": threads is not None,
             "--opset": opset != 18, **{f"--{k.replace('_', '-')}": bool(v) or (k == "seed" and v is not None)
                                        for k, v in load_options.items()}}
    clashing = [flag for flag, set_ in given.items() if set_]
    if clashing:
        raise UsageError(f"{', '.join(clashing)} cannot be combined with a recipe; set "
                         f"{'it' if len(clashing) == 1 else 'them'} in {recipe_path} (sections model, export, build, "
                         "bench)")
    return recipes.build_from_file(recipe_path, output)
