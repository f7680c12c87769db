"""`tcexport validate MODEL --reference-onnx UNCOMPRESSED.onnx`: how close a compressed model stays to the
uncompressed one, for models tcexport did not export (no tcexport.source record, so no PyTorch reference).

This is a FIDELITY report, not an equality check: token compression changes the outputs by design, so nothing
is expected to match to rounding. Both models run on the same random inputs (specs read off the reference graph;
text inputs get random padding as in validate, token ids stay below the vocabulary), at each batch
size in turn. Per output: cosine similarity (mean and worst row), top-1 agreement for classifier-like outputs
([batch, classes]), and the max abs difference when the shapes match. The check passes unless --min-cosine is
given and some output's worst row falls below it.

MODEL may be an .onnx file, an ONNX Runtime build directory or a TensorRT engine directory; the reference an
.onnx file or an ONNX Runtime build directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tcexport.core import artifacts
from tcexport.core import onnxfile
from tcexport.core.atomic import atomic_file, check_writable
from tcexport.core.errors import UsageError, ValidationFailed
from tcexport.models.inputs import InputSpec, specs_from_graph

LABEL = "FIDELITY vs the uncompressed model (how close, not an equality check)"
# Outputs whose name says they are features, not class scores, get no top-1 agreement.
NOT_CLASSIFIER = ("embed", "hidden", "pool", "feature", "state")


@dataclass
class FidelityReport:
    model: str
    reference: str
    min_cosine: float | None = None
    samples: list[dict] = field(default_factory=list)

    def summary(self) -> dict[str, dict]:
        """Per output, over all samples: worst and mean cosine, mean top-1 agreement, max abs difference."""
        merged: dict[str, dict] = {}
        for sample in self.samples:
            for name, o in sample["outputs"].items():
                entry = merged.setdefault(name, {"cosine_min": [], "cosine_mean": [], "top1_agreement": [],
                                                 "max_abs": [], "notes": []})
                for key in ("cosine_min", "cosine_mean", "top1_agreement", "max_abs"):
                    if key in o:
                        entry[key].append(o[key])
                if "note" in o:
                    entry["notes"].append(o["note"])
        result = {}
        for name, entry in merged.items():
            result[name] = {"cosine_min": min(entry["cosine_min"]) if entry["cosine_min"] else None,
                            "cosine_mean": float(np.mean(entry["cosine_mean"])) if entry["cosine_mean"] else None}
            if entry["top1_agreement"]:
                result[name]["top1_agreement"] = float(np.mean(entry["top1_agreement"]))
            if entry["max_abs"]:
                result[name]["max_abs"] = max(entry["max_abs"])
            if entry["notes"]:
                result[name]["note"] = entry["notes"][0]
        return result

    @property
    def below_floor(self) -> list[str]:
        """Outputs whose worst row is below --min-cosine. Outputs whose shape compression changed (a hidden state
        with fewer tokens) cannot be compared and are skipped, unless no output can be: then all fail."""
        if self.min_cosine is None:
            return []
        summary = self.summary()
        comparable = {name: s for name, s in summary.items() if s["cosine_min"] is not None}
        if not comparable:
            return list(summary)
        return [name for name, s in comparable.items() if s["cosine_min"] < self.min_cosine]

    @property
    def passed(self) -> bool:
        return not self.below_floor

    def to_json(self) -> dict:
        return {"kind": "fidelity", "label": LABEL, "model": self.model, "reference_onnx": self.reference,
                "min_cosine": self.min_cosine, "passed": self.passed, "below_min_cosine": self.below_floor,
                "outputs": self.summary(), "samples": self.samples}


def classifier_like(name: str, array: np.ndarray) -> bool:
    return array.ndim == 2 and array.shape[1] > 1 and not any(word in name.lower() for word in NOT_CLASSIFIER)


def compare_output(name: str, reference: np.ndarray, actual: np.ndarray) -> dict:
    """Cosine per batch row (mean and worst), top-1 agreement for classifiers, max abs diff; shapes must match."""
    if reference.shape != actual.shape:
        return {"note": f"shape {list(actual.shape)} vs uncompressed {list(reference.shape)}: not comparable"}
    ref = reference.reshape(reference.shape[0], -1).astype(np.float64)
    act = actual.reshape(actual.shape[0], -1).astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(act, axis=1)
    cosine = np.where(norms > 0, np.sum(ref * act, axis=1) / np.maximum(norms, 1e-30),
                      np.where(np.all(ref == act, axis=1), 1.0, 0.0))  # zero rows: equal or not at all
    result = {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
              "max_abs": float(np.abs(ref - act).max()) if ref.size else 0.0}
    if classifier_like(name, reference):
        result["top1_agreement"] = float(np.mean(reference.argmax(1) == actual.argmax(1)))
    return result


class _OrtRunner:
    def __init__(self, artifact: artifacts.Artifact, threads: int | None):
        from tcexport.backends import ort as ort_backend

        provider = {v: k for k, v in ort_backend.PROVIDERS.items()}.get(artifact.sidecar.get("provider"), "cpu")
        self.session = ort_backend.open_session(artifact.model_path, provider, threads=threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.output_names, {k: v for k, v in feeds.items() if k in self.input_names})
        return dict(zip(self.output_names, results))


def _runner(artifact: artifacts.Artifact, threads: int | None):
    if artifact.backend == "trt":
        from tcexport.backends import trt_engine

        trt_engine.require_engine_runtime(artifact.path)
        return trt_engine.open_engine_runner(artifact)
    if artifact.backend != "ort":
        raise UsageError(f"{artifact.path}: unknown backend '{artifact.backend}' in the sidecar; rebuild with "
                         "'tcexport build'")
    return _OrtRunner(artifact, threads)


def _specs(artifact: artifacts.Artifact) -> list[InputSpec]:
    """Input specs of an artifact: its build sidecar's, else its graph's (token ids below the vocabulary)."""
    if artifact.sidecar.get("inputs"):
        return [InputSpec.from_json(s) for s in artifact.sidecar["inputs"]]
    return specs_from_graph(onnxfile.load(artifact.model_path, load_external_data=False))


def compare_with_reference(path: Path, reference_onnx: Path, samples: int = 4, seed: int = 0,
                           batches: tuple[int, ...] = (1, 3), threads: int | None = None,
                           min_cosine: float | None = None, user_inputs: Path | None = None) -> FidelityReport:
    from tcexport.validate.equality import load_user_inputs, sample_feeds

    compressed = artifacts.resolve(path)
    reference = artifacts.resolve(reference_onnx)
    if reference.backend != "ort":
        raise UsageError(f"--reference-onnx {reference_onnx}: pass the uncompressed .onnx file (or its ONNX "
                         "Runtime build), not a TensorRT engine")
    reference_specs = _specs(reference)
    known = {s.name for s in reference_specs}
    compressed_specs = _specs(compressed)
    _check_inputs(path, reference_onnx, reference_specs, {s.name: s for s in compressed_specs})
    # Inputs only the compressed model takes (the query method's "query") are fed to it alone.
    specs = reference_specs + [s for s in compressed_specs if s.name not in known]
    if compressed.backend == "trt":  # say so before any run: an engine takes the batches of its profile only
        from tcexport.backends import trt_engine

        trt_engine.require_engine_runtime(path)
        for batch in dict.fromkeys(batches[:samples]):
            trt_engine.check_batch_in_profile(compressed.sidecar.get("profile"), batch, str(path))
    reference_runner, compressed_runner = _runner(reference, threads), _runner(compressed, threads)
    report = FidelityReport(str(path), str(reference_onnx), min_cosine)
    cases = [(seed + i, sample_feeds(specs, batches[i % len(batches)], seed + i)) for i in range(samples)]
    if user_inputs is not None:
        cases.append((None, load_user_inputs(user_inputs, specs)))
    for index, (sample_seed, feeds) in enumerate(cases):
        expected = reference_runner.infer({s.name: feeds[s.name] for s in reference_specs})
        actual = compressed_runner.infer(feeds)
        missing = [name for name in expected if name not in actual]
        if missing:
            raise UsageError(f"{path} has no output {', '.join(repr(m) for m in missing)} that {reference_onnx} "
                             f"has (it has {', '.join(actual) or 'none'}); compare a model with its own "
                             "uncompressed export")
        sample = {"index": index, "batch": int(next(iter(feeds.values())).shape[0]), "seed": sample_seed,
                  "outputs": {name: compare_output(name, ref, np.asarray(actual[name]))
                              for name, ref in expected.items()}}
        if sample_seed is None:
            sample["inputs"] = str(user_inputs)
        report.samples.append(sample)
    return report


def _check_inputs(path, reference_onnx, reference_specs: list[InputSpec], compressed: dict[str, InputSpec]) -> None:
    for spec in reference_specs:
        theirs = compressed.get(spec.name)
        if theirs is None:
            raise UsageError(f"{path} has no input '{spec.name}' that {reference_onnx} takes; compare a model "
                             "with its own uncompressed export")
        if list(theirs.shape[1:]) != list(spec.shape[1:]) or theirs.dtype != spec.dtype:
            raise UsageError(f"input '{spec.name}' is {theirs.dtype} {theirs.shape} in {path} but {spec.dtype} "
                             f"{spec.shape} in {reference_onnx}; compare a model with its own uncompressed export")


def format_report(report: FidelityReport) -> str:
    lines = [f"{LABEL}", f"  model {report.model} vs uncompressed {report.reference}: {len(report.samples)} samples, "
                         "same inputs, ONNX Runtime"]
    for sample in report.samples:
        parts = [f"{name}: {_describe(o)}" for name, o in sample["outputs"].items()]
        lines.append(f"  sample {sample['index']} (batch {sample['batch']}): {'; '.join(parts)}")
    for name, s in report.summary().items():
        lines.append(f"  {name} overall: {_describe(s)}")
    if report.min_cosine is None:
        lines.append("PASSED: fidelity reported, not checked (give --min-cosine to set a floor)")
    elif report.passed:
        lines.append(f"PASSED: every output's worst cosine >= {report.min_cosine:g}")
    else:
        lines.append(f"FAILED: cosine below --min-cosine {report.min_cosine:g} for {', '.join(report.below_floor)}")
    return "\n".join(lines)


def _describe(o: dict) -> str:
    if o.get("cosine_min") is None:
        return o.get("note", "not comparable")
    text = f"cosine {o['cosine_mean']:.6f} (worst row {o['cosine_min']:.6f})"
    if "top1_agreement" in o:
        text += f", top-1 agreement {o['top1_agreement']:.0%}"
    if "max_abs" in o:
        text += f", max abs diff {o['max_abs']:.3e}"
    return text


def run(path: Path, reference_onnx: Path, json_path: Path | None = None, **options) -> FidelityReport:
    if json_path:
        check_writable(json_path, "--json")  # before the run, not after it
    report = compare_with_reference(path, reference_onnx, **options)
    if json_path:
        with atomic_file(json_path) as tmp:
            tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if not report.passed:
        raise ValidationFailed(format_report(report), report.to_json())
    return report
