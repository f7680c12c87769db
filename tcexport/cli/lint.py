"""`tcexport lint`: check an ONNX graph against the TensorRT ONNX parser's operator support (no GPU needed)."""

from __future__ import annotations

from pathlib import Path

import click



@click.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--trt-version", default="10.3", show_default=True, help="TensorRT version to check against.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as JSON.")
def lint(model, trt_version, as_json):
    """Check an ONNX graph against the TensorRT ONNX parser's operator support (no GPU needed).

    Checks the opset range, ops without an importer, TopK (sorted=1, K < 3840), ScatterElements/ScatterND
    reductions, the opset-23 Attention op (10.14+), data types, and custom-domain ops against tcexport's
    plugins, in the main graph, subgraphs and model-local functions. Exits 1 when any finding is an error.

    \b
    Example:
      tcexport lint vit.onnx --trt-version 10.3
      tcexport lint vit.onnx --trt-version 10.13 --json
    """
    from tcexport.backends import lint as lint_mod

    report = lint_mod.lint_file(model, trt_version)
    if as_json:
        lint_mod.print_json(report)
    else:
        lint_mod.print_report(report)
    lint_mod.raise_on_errors(report)
