"""`tcexport build`: build an optimized engine from an .onnx file, a model spec, or a YAML recipe."""

from __future__ import annotations

from pathlib import Path

import click

from tcexport.cli.options import model_spec_options
from tcexport.core.errors import UsageError


@click.command()
@click.argument("source_arg", metavar="INPUT")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory (written atomically).")
@click.option("--backend", type=click.Choice(["ort", "trt"]), default="ort", show_default=True)
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
              help="ONNX Runtime execution provider (cuda/tensorrt need tcexport[gpu]).")
@click.option("--opt-level", type=click.Choice(["disable", "basic", "extended", "all"]), default="all",
              show_default=True, help="ONNX Runtime graph optimization level.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads recorded with the build.")
@click.option("--opset", type=click.IntRange(min=17, max=23), default=18, show_default=True,
              help="Opset when INPUT is a model spec.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="trt: engine precision (the graph is converted first and built strongly typed, so "
                   "token decisions stay fp32 on 10.x and 11.x alike).")
@click.option("--batch", "batch_range", metavar="MIN,OPT,MAX", default=None,
              help="trt: batch range of the optimization profile, e.g. 1,1,8 (default 1,1,8; a fixed-batch model: "
                   "its batch).")
@click.option("--workspace", "workspace_mb", type=click.IntRange(min=1), default=None, metavar="MB",
              help="trt: workspace memory pool limit in MB (MiB; default: TensorRT's).")
@click.option("--timing-cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="trt: timing cache file, read if it exists and written back after the build.")
@click.option("--plugins", default="auto", show_default=True, metavar="auto|none|python|PATH.so",
              help="trt: TensorRT plugins loaded before parsing (auto: only for --impl plugin graphs; the C++ "
                   "library when found, else the Python plugins). Recorded for validate/bench.")
@click.option("--force", is_flag=True,
              help="Replace OUT_DIR even when it holds files tcexport did not write (a recipe: another recipe's).")
@model_spec_options
def build(source_arg, output, backend, provider, opt_level, threads, opset, precision, batch_range, workspace_mb,
          timing_cache, plugins, force, pretrained, checkpoint, seed, input_shape, seq_len, model_args):
    """Build an optimized engine from an .onnx file, a model spec, or a YAML recipe.

    \b
    ONNX Runtime (default): saves the graph-optimized model and a sidecar JSON
    (tcexport-build.json: backend, provider, versions, options, input shapes, source hash).

    \b
    A recipe (.yaml) runs the whole pipeline: export -> compress -> validate -> build -> bench
    against the uncompressed model. OUT_DIR gets model.onnx, model.tc.onnx, validate.json,
    baseline/ and compressed/ builds, bench.json, bench.png, the resolved recipe.yaml and
    summary.json. The recipe holds every option; a failed stage or validation leaves no OUT_DIR.

    \b
    Example:
      tcexport build vit.onnx -o build/vit-ort
      tcexport build timm:vit_tiny_patch16_224 -o build/vit-ort
      tcexport build recipes/minilm_tome.yaml -o out/minilm_tome
    """
    from tcexport import pipeline
    from tcexport.core import overwrite
    from tcexport.models import spec_check

    if backend == "trt":
        import tempfile

        from tcexport.backends import trt_build, trt_device

        trt_device.require_tensorrt()  # fail before exporting or writing anything
        trt_device.require_gpu()
        if source_arg.endswith(".onnx"):
            pipeline.check_onnx_input(source_arg)
        else:
            spec_check.check(source_arg, pretrained=pretrained, checkpoint=checkpoint, seed=seed,
                             input_shape=input_shape, seq_len=seq_len)
        overwrite.check_build_dir(output, force)
        options = dict(precision=precision, batch=batch_range, workspace_mb=workspace_mb, timing_cache=timing_cache,
                       plugins=plugins)
        if source_arg.endswith(".onnx"):
            sidecar = trt_build.build(source_arg, output, **options)
        else:
            from tcexport.export import exporter as export_mod
            from tcexport.models import sources

            source = sources.load(source_arg, pretrained=pretrained, checkpoint=checkpoint, seed=seed,
                                  input_shape=input_shape, seq_len=seq_len, model_args=model_args)
            with tempfile.TemporaryDirectory(prefix="tcexport-") as tmp:
                exported = Path(tmp) / "model.onnx"
                export_mod.export_to_file(source, exported, opset=opset)
                sidecar = trt_build.build(exported, output, **options)
        click.echo(f"wrote {output} (trt {sidecar['tensorrt_version']}, {sidecar['precision']}, "
                   f"{sidecar['gpu_name']}, {sidecar['engine_bytes'] / 1e6:.1f} MB)")
        return
    if precision != "fp32" or batch_range or workspace_mb or timing_cache or plugins != "auto":
        raise UsageError("--precision/--batch/--workspace/--timing-cache/--plugins apply to --backend trt; the ONNX "
                         "Runtime build runs the float32 graph as exported")
    sidecar = pipeline.build(source_arg, output, provider=provider, opt_level=opt_level, threads=threads,
                             opset=opset, force=force, pretrained=pretrained, checkpoint=checkpoint, seed=seed,
                             input_shape=input_shape, seq_len=seq_len, model_args=model_args)
    click.echo(f"wrote {output} ({sidecar['backend']}, {sidecar['provider']}, "
               f"{sidecar['nodes_before']} -> {sidecar['nodes_after']} nodes)")
