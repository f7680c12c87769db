"""`tcexport bench`: time artifacts side by side (.onnx files or build directories, ONNX Runtime or TensorRT)."""

from __future__ import annotations

from pathlib import Path

import click

from tcexport.cli.options import positive_int_list
from tcexport.core.atomic import check_writable
from tcexport.core.errors import UsageError


@click.command()
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
@click.option("--prompt-len", "prompt_len_text", default=None,
              help="Decoders: prompt lengths, e.g. 512,2048 (default 128); reports TTFT and decode tokens/s.")
@click.option("--new-tokens", type=click.IntRange(min=2), default=32, show_default=True,
              help="Decoders: tokens generated per timed run.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Decoders: interleaved rounds (min TTFT, best decode speed).")
@click.option("--peer/--no-peer", default=True, show_default=True,
              help="Decoders: add onnxruntime-genai's loop over the first graph when it is installed and the graph "
                   "has a genai_config.json beside it.")
def bench(artifacts, batch_text, shapes, load_inputs, threads, warmup, warmup_ms, iters, duration, json_path, plot_path,
          include_copies, cuda_graph, prompt_len_text, new_tokens, repeats, peer):
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
    for path, option in ((json_path, "--json"), (plot_path, "--plot")):
        if path is not None:
            check_writable(path, option)  # before the runs, not after them
    from tcexport.bench import decoder as bench_decoder

    decoders = [bench_decoder.is_decoder(path) for path in artifacts]
    if any(decoders):
        if not all(decoders):
            raise UsageError("bench decoders with decoders: every artifact must be a decoder graph (or its build)")
        if batch_text or shapes or load_inputs or plot_path:
            raise UsageError("decoders are timed per prompt length: use --prompt-len/--new-tokens/--repeats, not "
                             "--batch/--shapes/--load-inputs/--plot")
        lengths = positive_int_list(prompt_len_text, "--prompt-len") or [128]
        results = bench_decoder.run(list(artifacts), lengths, new_tokens, repeats, threads, genai=peer)
        for line in bench_decoder.format_lines(results):
            click.echo(line)
        if json_path:
            bench_report.write_json(results, json_path)
            click.echo(f"wrote {json_path}")
        return
    if prompt_len_text is not None:
        raise UsageError("--prompt-len applies to decoder graphs")
    batches = positive_int_list(batch_text, "--batch")
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
