"""`tcexport inspect`: show an ONNX model (inputs/outputs, op histogram, provenance, estimated GFLOPs)."""

from __future__ import annotations

from pathlib import Path

import click



@click.command(name="inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size for GFLOPs.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_cmd(model, batch, as_json):
    """Show an ONNX model: inputs/outputs, op histogram, provenance, estimated GFLOPs."""
    from tcexport.graph import inspection

    report = inspection.inspect_model(model, batch=batch)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2))
    else:
        inspection.print_report(report)
