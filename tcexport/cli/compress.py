"""`tcexport compress`: insert token compression into an ONNX graph at chosen blocks."""

from __future__ import annotations

from pathlib import Path

import click

from tcexport.cli.method_options import MethodOptionsCommand, method_params
from tcexport.core.errors import UsageError


@click.command(cls=MethodOptionsCommand)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output .onnx file.")
@click.option("--method", default="tome", show_default=True,
              help="Compression method (see the method options below; `tcexport compress --help` lists every "
                   "registered one). query keeps the tokens most like an external vector: the output model takes "
                   "an extra input 'query' [batch, hidden width].")
@click.option("--stage", "stages", multiple=True, metavar="METHOD:k=v,...@LAYERS",
              help="Several methods in one model, applied in layer order, e.g. --stage tome:r=8@0-5 "
                   "--stage topk:keep=0.7@6,9 (replaces --method/--r/--layers).")
@click.option("--layers", default="all", show_default=True, help="Blocks to compress: all, 5, 0-5 or 3,6,9.")
@click.option("--schedule", type=click.Choice(["constant", "decreasing"]), default="constant", show_default=True,
              help="ToMe schedule; decreasing spreads r as ToMe's (r, -1): 2r at the first chosen layer to 0.")
@click.option("--prop-attn/--no-prop-attn", default=True, show_default=True,
              help="Proportional attention: add log(size) to later blocks' attention logits.")
@click.option("--impl", type=click.Choice(["subgraph", "function", "plugin"]), default="subgraph", show_default=True,
              help="Inline standard ONNX ops, one model-local ONNX function per op, or one plugin node per op "
                   "(plugin: TensorRT plugins, or tcexport's ONNX Runtime op library on the CPU).")
@click.option("--protected", type=click.IntRange(min=0), default=None,
              help="Leading tokens never merged (default: from the export's provenance, else 1 for CLS).")
def compress(model, output, stages, layers, schedule, prop_attn, impl, protected, method, **given):
    """Insert token compression into an ONNX graph at chosen blocks.

    Finds the transformer blocks (module scopes when present, graph structure otherwise), inserts the method
    between attention and MLP, follows the token axis downstream to fix every shape constant, and records
    tcexport.compression and tcexport.tokens in the output's metadata.

    \b
    Example:
      tcexport compress vit.onnx --method tome --r 8 -o vit_tome.onnx
      tcexport compress vit.onnx --r 16 --schedule decreasing --layers 0-5 -o vit_tome.onnx
      tcexport compress minilm.onnx --r 4,4,8 --layers 1,2,3 -o minilm_tome.onnx
    """
    from tcexport import pipeline
    from tcexport.core import progress

    params = method_params(given)
    r = params.pop("r", None)
    if stages and (params or r is not None):
        raise UsageError("--stage carries each method's parameters; drop --r/--keep/... when using --stage")
    pipeline.check_onnx_input(model)  # a missing or corrupt input is named before any work
    from tcexport.compress import rewrite as compress_mod

    with progress.step(f"compress {model} ({' + '.join(stages) or method}) -> {output}"):
        schedule_out = compress_mod.compress_file(model, output, method=method, r=r, layers=layers,
                                                  schedule=schedule, prop_attn=prop_attn, impl=impl,
                                                  protected=protected, params=params, stages=list(stages))
    if schedule_out and "in" not in schedule_out[0]:  # a decoder: counts depend on the prompt
        what = ", ".join(f"{s['method']} at layer {s['layer'] - 1}: layers from {s['layer']} see the kept tokens"
                         if "layer" in s else
                         f"{s['policy']} " + ", ".join(f"{k}={v}" for k, v in s.items() if k != "policy")
                         for s in schedule_out)
        click.echo(f"wrote {output} ({what})")
        return
    counts = " -> ".join([str(schedule_out[0]["in"])] + [str(s["out"]) for s in schedule_out])
    click.echo(f"wrote {output} (tokens per block: {counts})")
