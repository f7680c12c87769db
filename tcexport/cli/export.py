"""`tcexport export`: export a model spec to ONNX with provenance metadata."""

from __future__ import annotations

from pathlib import Path

import click

from tcexport.cli.options import model_spec_options


@click.command()
@click.argument("spec")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output .onnx file.")
@click.option("--opset", type=click.IntRange(min=17, max=23), default=18, show_default=True, help="ONNX opset.")
@click.option("--batch", default="dynamic", show_default=True, help="'dynamic' or a fixed batch size.")
@click.option("--atol", type=float, default=None,
              help="Max abs error allowed between ONNX Runtime and PyTorch in the post-export check (default 1e-4; "
                   "decoders 1e-3, on logits).")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare ONNX Runtime against PyTorch on random inputs (batch 1 and 3) after export.")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="torch.onnx exporter; dynamo keeps the module scopes the rewriter uses.")
@click.option("--force", is_flag=True, help="Replace OUT.onnx even when tcexport did not write it.")
@click.option("--all-logits", is_flag=True,
              help="Causal LMs: logits at every position (for scoring), not the last position only.")
@model_spec_options
def export(spec, output, opset, batch, atol, check, exporter, force, all_logits, pretrained, checkpoint, seed,
           input_shape, seq_len, model_args):
    """Export a model spec to ONNX with provenance metadata.

    Uses the dynamo exporter (it keeps the per-node module scopes the rewriter needs), records
    tcexport.source in the model's metadata, and checks ONNX Runtime against PyTorch.

    \b
    Example:
      tcexport export timm:vit_tiny_patch16_224 --checkpoint vit.pth -o vit.onnx
      tcexport export st:all-MiniLM-L6-v2 --seq-len 128 -o minilm.onnx
    """
    from tcexport import pipeline

    report = pipeline.export(spec, output, opset=opset, batch=batch, check=check, atol=atol, exporter=exporter,
                             force=force, pretrained=pretrained, checkpoint=checkpoint, seed=seed,
                             input_shape=input_shape, seq_len=seq_len, model_args=model_args,
                             **({"all_logits": True} if all_logits else {}))
    if report:
        click.echo(report.summary())
    click.echo(f"wrote {output}")  # after the check's verdict: the file exists only because it passed
