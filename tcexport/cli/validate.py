"""`tcexport validate`: compare an ONNX model, ORT build or TensorRT engine directory with the PyTorch reference."""

from __future__ import annotations

from pathlib import Path

import click

from tcexport.cli.options import positive_int_list
from tcexport.core.errors import UsageError


@click.command()
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
@click.option("--text-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Decoders with --reference-onnx: score on this text (paragraphs; default: tcexport's bundled ones).")
@click.option("--prompt-len", type=click.IntRange(min=2), default=None,
              help="Decoders with --reference-onnx: prompt tokens before each scored continuation.")
@click.option("--min-agreement", type=click.FloatRange(min=0, max=1), default=None,
              help="Decoders with --reference-onnx: exit 1 below this next-token agreement.")
def validate(model, samples, seed, atol, rtol, min_cosine, batch_text, user_inputs, reference_onnx, json_path,
             text_file, prompt_len, min_agreement):
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

    from tcexport.core.atomic import check_writable

    batches = tuple(positive_int_list(batch_text, "--batch"))
    if json_path is not None:
        check_writable(json_path, "--json")  # before reading the model: it decides which validation runs
    if user_inputs is not None and not user_inputs.is_file():
        raise UsageError(f"--inputs {user_inputs}: no such file; save one with numpy.savez(path, input_name=array)")
    if artifacts.resolve(model).backend == "trt":  # say what is missing before the slow PyTorch import
        from tcexport.backends import trt_engine

        trt_engine.require_engine_runtime(model)
    from tcexport.bench.decoder import is_decoder

    if reference_onnx is not None and is_decoder(model):
        from tcexport.validate import decoder_fidelity

        report = decoder_fidelity.run(model, reference_onnx, text_file=text_file, prompt_len=prompt_len,
                                      json_path=json_path, min_agreement=min_agreement)
        click.echo(decoder_fidelity.format_report(report))
        return
    if text_file is not None or prompt_len is not None or min_agreement is not None:
        raise UsageError("--text-file/--prompt-len/--min-agreement apply to decoders with --reference-onnx")
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
    click.echo(report_text(report))


def report_text(report) -> str:
    from tcexport.validate import decoder, equality

    if isinstance(report, decoder.DecoderReport):
        return decoder.format_report(report)
    return equality.format_report(report)
