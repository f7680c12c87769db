"""Whole-pipeline entry points that chain stages (export -> build), used by the CLI and recipes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from tcexport import export, sources
from tcexport.backends import ort as ort_backend
from tcexport.errors import NotAvailableYet


def build(source_arg: str, output: Path, provider: str = "cpu", opt_level: str = "all", threads: int | None = None,
          opset: int = 18, **load_options) -> dict:
    """Build an ONNX Runtime artifact from an .onnx file, or export a model spec first and build that."""
    if source_arg.endswith((".yaml", ".yml")):
        raise NotAvailableYet("recipes are not available yet in this version; pass an .onnx file or a model spec")
    if source_arg.endswith(".onnx"):
        return ort_backend.build(source_arg, output, provider=provider, threads=threads, opt_level=opt_level)
    source = sources.load(source_arg, **load_options)
    with tempfile.TemporaryDirectory(prefix="tcexport-") as tmp:
        exported = Path(tmp) / "model.onnx"
        export.export_to_file(source, exported, opset=opset)
        return ort_backend.build(exported, output, provider=provider, threads=threads, opt_level=opt_level)
