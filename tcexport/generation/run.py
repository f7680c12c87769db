"""`tcexport generate`: prompts in, tokens out, on a decoder graph, its ONNX Runtime build or its TensorRT engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tcexport.core import artifacts, metadata, onnxfile, progress
from tcexport.core.atomic import atomic_file, check_writable
from tcexport.core.errors import UsageError
from tcexport.generation import loop, policies, prompts


def decoder_records(model: str | Path, backends: tuple[str, ...] = ("ort",)
                    ) -> tuple[artifacts.Artifact, dict, dict | None]:
    """The artifact, its tcexport.source record and its compression record; a UsageError if not a decoder (or a
    build for a backend not in `backends`)."""
    artifact = artifacts.resolve(model)
    if artifact.backend not in backends:
        raise UsageError(f"{model} is a {artifact.backend} build; here decoders run as graphs or ONNX Runtime builds "
                         "(tcexport generate also runs their TensorRT engines)")
    if artifact.sidecar:
        records = artifact.sidecar.get("records", {})
    else:
        records = metadata.all_records(onnxfile.load(artifact.model_path, load_external_data=False))
    source = records.get(metadata.SOURCE) or {}
    if source.get("info", {}).get("kind") != "decoder":
        raise UsageError(f"{model}: not a decoder graph exported by tcexport (export a causal LM with "
                         "'tcexport export hf:DIR -o model.onnx')")
    return artifact, source, records.get(metadata.COMPRESSION)


def refuse_embeds_input(model: str | Path, source: dict) -> None:
    """A decoder graph that takes inputs_embeds runs behind an embedding graph; on its own it cannot generate."""
    if source.get("info", {}).get("token_input") == "inputs_embeds":
        raise UsageError(f"{model} takes inputs_embeds, which something outside it must compute (an embedding "
                         "table or graph); generate, bench and fidelity run decoders exported with input_ids (the "
                         "default of 'tcexport export')")


def is_decoder_artifact(path: str | Path) -> bool:
    """Whether `path` is a decoder graph exported by tcexport, or its ORT build."""
    try:
        decoder_records(path)
    except UsageError:
        return False
    return True


def run(model: str | Path, texts: tuple[str, ...] = (), ids_texts: tuple[str, ...] = (), chat: bool = False,
        max_new_tokens: int = 32, sampling: loop.Sampling | None = None, threads: int | None = None,
        json_path: Path | None = None, stream: bool = True) -> dict:
    """Generate for every prompt; stream the first prompt's text to stdout; return (and write) the JSON report."""
    if json_path is not None:
        check_writable(json_path, "--json")
    artifact, source, compression = decoder_records(model, backends=("ort", "trt"))
    refuse_embeds_input(model, source)
    if artifact.backend == "trt":  # say what is missing before the tokenizer and the prompts
        from tcexport.backends import trt_engine

        trt_engine.require_engine_runtime(model)
    shape = source["info"]["decoder"]
    tokenizer = prompts.tokenizer_for(source) if texts else None
    ids = prompts.prompt_ids(source, shape["vocab_size"], texts, ids_texts, chat, tokenizer)
    from tcexport.compress.decoder import stages_of

    stages, _, cache_methods = stages_of(compression)
    for method in [s.method for s in stages] + cache_methods:
        method.check_prompt(min(len(p) for p in ids))  # an empty span, a budget not smaller than the prompt
    longest = max(len(p) for p in ids)
    if longest + max_new_tokens > shape["context"]:
        raise UsageError(f"the prompt ({longest} tokens) plus --max-new-tokens {max_new_tokens} is longer than the "
                         f"model's context ({shape['context']}); shorten the prompt or generate fewer tokens")
    from tcexport.generation.runners import OrtRunner, TrtDecoderRunner

    if artifact.backend == "trt":
        with progress.step(f"load {artifact.model_path.name} in TensorRT"):
            runner = TrtDecoderRunner.open(artifact)
    else:
        with progress.step(f"load {artifact.model_path.name} in ONNX Runtime"):
            runner = OrtRunner(artifact.model_path, threads=threads)
    printer = _Printer(tokenizer) if stream and tokenizer is not None and len(ids) == 1 else None
    pad = shape.get("pad_token_id")
    result = loop.generate(runner, ids, max_new_tokens, tuple(shape["eos_token_ids"]),
                           pad_id=pad if pad is not None else 0, sampling=sampling,
                           policy=policies.from_record(compression),
                           on_token=printer.on_token if printer else None)
    if printer:
        printer.finish()
    text = [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens] if tokenizer is not None else None
    report = result.to_json(text)
    if json_path is not None:
        with atomic_file(json_path) as tmp:
            Path(tmp).write_text(json.dumps(report, indent=2) + "\n")
    return report


class _Printer:
    """Streams decoded text to stdout as tokens arrive (the whole decode, so multi-token characters come out
    right)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.shown = tokenizer, ""

    def on_token(self, row: int, tokens: list[int]) -> None:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if text.startswith(self.shown) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text

    def finish(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()
