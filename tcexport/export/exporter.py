"""PyTorch -> ONNX with provenance, then a check that ONNX Runtime agrees with PyTorch.

The dynamo exporter is the default because it writes `pkg.torch.onnx.name_scopes` on every node, which is how
the rewriter finds block k. The TorchScript exporter stays available for graphs the rewriter must find
structurally. Dynamic batch uses an example batch of 2: torch.export specialises dims of size 0 and 1.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from tcexport import __version__
from tcexport.core import metadata
from tcexport.core import onnxfile
from tcexport.core import progress
from tcexport.core.atomic import atomic_file, check_writable
from tcexport.core.errors import UsageError, ValidationFailed
from tcexport.export import decoder as decoder_export
from tcexport.models.sources import Source
from tcexport.models.spec_check import parse_batch  # noqa: F401 - checked up front, kept importable here

EXPORTERS = ("dynamo", "torchscript")
EXAMPLE_BATCH = 2
MAX_BATCH = 4096


@dataclass
class CheckReport:
    """How far ONNX Runtime is from PyTorch on random inputs, per batch size and output."""

    rows: list[dict]
    atol: float

    @property
    def max_abs(self) -> float:
        return max(r["max_abs"] for r in self.rows)

    @property
    def passed(self) -> bool:
        return all(r["max_abs"] <= self.atol for r in self.rows)

    def summary(self) -> str:
        parts = [f"batch {r['batch']} {r['output']}: max abs {r['max_abs']:.2e}, cosine {r['cosine']:.6f}"
                 for r in self.rows]
        verdict = "ok" if self.passed else f"exceeds atol {self.atol:g}"
        return f"ONNX Runtime vs PyTorch ({verdict}): " + "; ".join(parts)


def versions() -> dict:
    import onnxruntime

    found = {"tcexport": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
             "onnxruntime": onnxruntime.__version__}
    for name in ("timm", "transformers", "sentence_transformers"):
        module = _imported(name)
        if module is not None:
            found[name] = getattr(module, "__version__", "?")
    return found


def _imported(name: str):
    import sys

    return sys.modules.get(name)


class _MutedInThisThread:
    """sys.stderr that drops what this thread writes and passes on other threads' writes (the live progress line
    keeps ticking from its own thread)."""

    def __init__(self, stream):
        self._stream, self._owner = stream, threading.get_ident()

    def write(self, text: str) -> int:
        return len(text) if threading.get_ident() == self._owner else self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings meant for their developers (and torch.export prints the whole
    partial graph to stderr when it fails); keep our output readable: the failure becomes one line."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(_MutedInThisThread(sys.stderr)):
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


def export_model(source: Source, opset: int = 18, batch: int | None = None, exporter: str = "dynamo") -> onnx.ModelProto:
    """Export `source` to an in-memory ONNX model carrying tcexport.source provenance."""
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}")
    decoder = is_decoder(source)
    if decoder and (exporter != "dynamo" or batch is not None):
        raise UsageError(f"{source.spec} is a causal LM: its decoder graph exports with the dynamo exporter and a "
                         "dynamic batch (drop --exporter torchscript / --batch)")
    example = None if decoder else source.example_inputs(batch or EXAMPLE_BATCH)
    input_names = [spec.name for spec in source.inputs]
    try:
        with _quiet(), torch.no_grad():
            if decoder:
                model = decoder_export.export_program(source.model, decoder_shape(source), opset).model_proto
            elif exporter == "dynamo":
                model = _export_dynamo(source, example, input_names, opset, batch)
            else:
                model = _export_torchscript(source, example, input_names, opset, batch)
    except UsageError:
        raise
    except Exception as exc:  # exporter failures come in many types; the user needs the first line
        raise UsageError(f"export of {source.spec} failed ({_reason(exc)}); try another --opset or --exporter") from None
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if written != opset:  # the dynamo exporter writes opset 18 at least when it cannot convert down
        raise UsageError(f"the {exporter} exporter wrote opset {written} for {source.spec}, not the {opset} asked "
                         f"for; use --opset {written}" + (" or --exporter torchscript" if exporter == "dynamo" else ""))
    record = source.record()
    record.update({"opset": opset, "batch": "dynamic" if batch is None else batch, "exporter": exporter,
                   "versions": versions()})
    if batch is not None:
        for spec in record["inputs"]:
            spec["shape"] = [batch, *spec["shape"][1:]]
    metadata.write(model, metadata.SOURCE, record)
    model.producer_name = "tcexport"
    model.producer_version = __version__
    return model


def _reason(exc: BaseException) -> str:
    """`Type: first line` of what went wrong. torch.onnx wraps the real failure (a torch.export guard, a missing
    decomposition) in an error whose first line only names the exporter's step: name the failure itself."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen and type(exc).__module__.startswith("torch.onnx"):
        exc = exc.__cause__
        seen.add(id(exc))
    text = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _export_dynamo(source, example, input_names, opset, batch) -> onnx.ModelProto:
    dynamic_shapes = None
    if batch is None:
        dim = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        dynamic_shapes = tuple({0: dim} for _ in example)
    program = torch.onnx.export(source.model, example, dynamo=True, opset_version=opset, input_names=input_names,
                                output_names=source.outputs, dynamic_shapes=dynamic_shapes, verbose=False)
    return program.model_proto


def _export_torchscript(source, example, input_names, opset, batch) -> onnx.ModelProto:
    buffer = io.BytesIO()
    dynamic_axes = None if batch is not None else {name: {0: "batch"} for name in [*input_names, *source.outputs]}
    torch.onnx.export(source.model, example, buffer, dynamo=False, opset_version=opset, input_names=input_names,
                      output_names=source.outputs, dynamic_axes=dynamic_axes)
    return onnx.load_from_string(buffer.getvalue())


def compare_outputs(expected: np.ndarray, actual: np.ndarray) -> dict:
    expected = expected.astype(np.float64).reshape(expected.shape[0], -1)
    actual = actual.astype(np.float64).reshape(actual.shape[0], -1)
    diff = np.abs(expected - actual)
    norms = np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1)
    cosine = np.sum(expected * actual, axis=1) / np.maximum(norms, 1e-30)
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "max_rel": float((diff / np.maximum(np.abs(expected), 1e-6)).max()), "cosine": float(cosine.min())}


def is_decoder(source: Source) -> bool:
    return source.info.get("kind") == "decoder"


def decoder_shape(source: Source):
    from tcexport.models.causal import DecoderShape

    return DecoderShape.from_json(source.info["decoder"])


DECODER_ATOL = 1e-3  # logits of a deep LM in fp32: ORT and PyTorch sum in different orders over 30+ layers


def check_decoder(source: Source, model_path: Path, atol: float, seed: int = 0) -> CheckReport:
    """A prefill (left padding in one row), then a decode step on the cache that prefill made: ORT vs PyTorch."""
    from tcexport.backends import ort as ort_backend

    shape = decoder_shape(source)
    session = ort_backend.open_session(model_path)
    rows = []
    embed = decoder_export.embedder(source.model)
    prefill = decoder_export.example_inputs(shape, batch=3, seq=7, past=0, seed=seed, left_padding=2, embed=embed)
    with torch.no_grad():
        expected = source.model(*prefill)
    cases = [("prefill", prefill, expected)]
    ids, mask, positions, _ = prefill
    new = torch.randint(0, shape.vocab_size, (3, 1), generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        new = new if embed is None else embed(new).detach()
    step = (new,
            torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1), positions[:, -1:] + 1,
            tuple(expected[1:]))
    with torch.no_grad():
        cases.append(("decode", step, source.model(*step)))
    for label, example, reference in cases:
        actual = ort_backend.run(session, decoder_export.feeds_of(example, shape.layers))
        worst: dict[str, dict] = {}
        for name, value in zip(source.outputs, reference):
            kind = "logits" if name == "logits" else "present.*." + name.rsplit(".", 1)[-1]
            row = compare_outputs(value.numpy(), actual[name])
            if kind not in worst or row["max_abs"] > worst[kind]["max_abs"]:
                worst[kind] = {"batch": 3, "output": f"{label} {kind}", "past": int(example[3][0].shape[2]), **row}
        rows.extend(worst.values())
    return CheckReport(rows, atol)


def check_against_torch(source: Source, model_path: Path, batches: list[int], atol: float, seed: int = 0) -> CheckReport:
    """Run ONNX Runtime and PyTorch on the same random inputs; report the worst disagreement per output."""
    from tcexport.backends import ort as ort_backend

    if is_decoder(source):
        return check_decoder(source, model_path, atol, seed)
    session = ort_backend.open_session(model_path)
    rows = []
    for batch in batches:
        example = source.example_inputs(batch, seed=seed)
        with torch.no_grad():
            expected = source.model(*example)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        feeds = {spec.name: tensor.numpy() for spec, tensor in zip(source.inputs, example)}
        try:
            actual = ort_backend.run(session, feeds)
        except Exception as exc:  # onnxruntime's errors: the exported graph does not run at this batch
            raise UsageError(f"the exported graph of {source.spec} fails in ONNX Runtime at batch {batch} "
                             f"({_reason(exc)}){_fixed_shapes_hint(model_path)}; nothing written") from None
        for name, reference in zip(source.outputs, expected):
            rows.append({"batch": batch, "output": name, **compare_outputs(reference.numpy(), actual[name])})
    return CheckReport(rows, atol)


def _fixed_shapes_hint(model_path: Path) -> str:
    """What to try when a graph fails at a batch it was not traced at: TorchScript traces keep the example's shapes
    wherever the model computes with them."""
    record = metadata.read(onnxfile.load(model_path, load_external_data=False), metadata.SOURCE) or {}
    if record.get("exporter") == "torchscript" and record.get("batch") == "dynamic":
        return (f": the TorchScript trace keeps shapes of its example batch ({EXAMPLE_BATCH}) where the model "
                "computes with them; export with a fixed --batch N")
    return ""


def export_to_file(source: Source, output: Path, opset: int = 18, batch: int | None = None, check: bool = True,
                   atol: float | None = None, exporter: str = "dynamo") -> CheckReport | None:
    """Export, save atomically, and (by default) check against PyTorch before the file appears."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise UsageError(f"output {output} must end with .onnx")
    check_writable(output, "-o")  # before the export, which takes seconds to minutes
    if atol is None:
        atol = DECODER_ATOL if is_decoder(source) else 1e-4
    with progress.step(f"export {source.spec} ({exporter}, opset {opset}, batch {batch or 'dynamic'})"):
        model = export_model(source, opset=opset, batch=batch, exporter=exporter)
    with atomic_file(output) as tmp:
        onnxfile.save(model, tmp)
        report = None
        if check:
            batches = [1, 3] if batch is None else [batch]
            with progress.step(f"check ONNX Runtime vs PyTorch at batch {', '.join(map(str, batches))}"):
                report = check_against_torch(source, tmp, batches, atol)
            if not report.passed:
                raise ValidationFailed(f"{report.summary()}; nothing written (use --no-check to keep the file)",
                                       {"rows": report.rows})
    if is_decoder(source) and source.info.get("token_input", "input_ids") == "input_ids":
        # onnxruntime-genai's config and tokenizer files beside the checked graph (a graph fed inputs_embeds runs
        # behind an embedding graph, which a model directory names)
        from tcexport.export import genai_config

        genai_config.write_for(source, output)
    return report
