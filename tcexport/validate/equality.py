"""`tcexport validate`: compare an ONNX model (or ONNX Runtime build) with its PyTorch reference.

The reference is rebuilt from the file alone: tcexport.source says how to recreate the PyTorch model (spec and
weights, checked by hash) and tcexport.compression says which methods run at which blocks, applied in eager
PyTorch (tcexport.reference). Both run on the same random inputs (text models get random padding), and the
report gives, per output, max abs/rel error and cosine against the reference, plus fidelity against the
uncompressed model (cosine; top-1 agreement for classifiers).

Values agreeing is not enough when both sides could share a mistake, so every validate also checks dependence
(validate/dependence.py): perturbing late input tokens at batch 1, no output row of the compressed model may
start (or stop) depending on tokens its uncompressed counterpart did not (did). A dependence that appeared or
vanished fails the check (exit 1) whatever the values say.

Token choices are discrete: when a near-tie between two candidate merges falls the other way in fp32, the two
sides legitimately pick different tokens and their outputs differ by more than rounding. Such samples are
detected (each stage's token sizes, exposed from the ONNX graph, differ from the reference's) and reported as
discrete divergence, apart from numeric error. The check fails (exit 1) when a sample without divergence
exceeds the tolerance, or when every sample diverged.

A TensorRT build directory (sidecar backend "trt") runs through tcexport.backends.trt_engine.TrtRunner instead of ONNX
Runtime, which needs tensorrt and a GPU (else one UsageError line naming what is missing). Its tolerances follow
its precision (tolerances_for) unless --atol/--rtol/--min-cosine are given, and the report says which were used
and why. Divergence detection needs the per-stage size tensors that only an ONNX Runtime session can expose, so
for engines it is reported as unavailable: a near-tie flip there counts as a numeric failure (validate the ONNX
file the engine was built from to tell the two apart).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from tcexport import methods
from tcexport.core import artifacts
from tcexport.core import metadata
from tcexport.core import onnxfile
from tcexport.core import progress
from tcexport.reference import coverage
from tcexport.core.atomic import atomic_file, check_writable
from tcexport.core.errors import UsageError, ValidationFailed
from tcexport.models.inputs import ATTENTION_MASK, TOKEN_IDS, InputSpec, load_npz_feeds, random_feeds
from tcexport.validate import dependence as dependence_mod

SIZE_OUTPUT = re.compile(r"^tc_blk(\d+)_[a-z_-]+_size_out$")
# What each stage decided on, as named in the graph: the keys metric, or the CLS attention (graph/insert.py).
DECISION_OUTPUTS = ("tc_blk{}_metric", "tc_blk{}_cls_attention")

DEFAULT_ATOL = 1e-4
DEFAULT_RTOL = 1e-4
# (atol, rtol, min_cosine) per engine precision; fp32 keeps the defaults and no cosine floor. A sample passes
# when every output is within atol + rtol * |reference| elementwise and, where a floor is set, its per-row
# cosine similarity to the reference is at least min_cosine.
PRECISION_TOLERANCES: dict[str, tuple[float, float, float | None]] = {
    "fp32": (DEFAULT_ATOL, DEFAULT_RTOL, None),
    "fp16": (1e-2, 1e-2, 0.999),
    "bf16": (5e-2, 5e-2, 0.995),
}
PRECISION_WHY = {
    "fp32": "float32 arithmetic, so only summation-order rounding differs",
    "fp16": "float16 keeps about 3 significant digits (unit roundoff 4.9e-4) and errors add up across layers",
    "bf16": "bfloat16 keeps about 2 significant digits (unit roundoff 3.9e-3) and errors add up across layers",
}
ENGINE_DIVERGENCE_NOTE = ("not checked for TensorRT engines (it needs the per-stage size tensors only an ONNX "
                          "Runtime session exposes); a near-tie flip counts as a numeric failure here: validate "
                          "the ONNX file the engine was built from to tell them apart")


def tolerances_for(precision: str, atol: float | None = None, rtol: float | None = None,
                   min_cosine: float | None = None) -> tuple[float, float, float | None]:
    """(atol, rtol, min_cosine) for outputs computed at `precision`; values given explicitly win."""
    if precision not in PRECISION_TOLERANCES:
        raise UsageError(f"unknown precision '{precision}' in the sidecar; expected one of "
                         f"{', '.join(PRECISION_TOLERANCES)}; rebuild with 'tcexport build'")
    default_atol, default_rtol, default_cosine = PRECISION_TOLERANCES[precision]
    return (default_atol if atol is None else float(atol), default_rtol if rtol is None else float(rtol),
            default_cosine if min_cosine is None else float(min_cosine))


def tolerance_reason(precision: str, engine: bool, atol: float | None = None, rtol: float | None = None,
                     min_cosine: float | None = None) -> str:
    """Why the tolerances are what they are, for the report: given on the command line, or this precision's."""
    given = [name for name, value in (("--atol", atol), ("--rtol", rtol), ("--min-cosine", min_cosine))
             if value is not None]
    what = f"{precision} engine" if engine else f"{precision} ONNX Runtime run"
    if len(given) == 3:
        return "all given on the command line"
    defaults = f"defaults for a {what}: {PRECISION_WHY[precision]}"
    if given:
        return f"{', '.join(given)} given, the rest {defaults}"
    return defaults


@dataclass
class ValidationReport:
    model: str
    atol: float
    rtol: float
    samples: list[dict] = field(default_factory=list)
    min_cosine: float | None = None
    backend: str = "ort"
    precision: str = "fp32"
    tolerance_reason: str = ""
    dependence: dependence_mod.DependenceReport | None = None  # which inputs each output depends on

    @property
    def diverged(self) -> list[dict]:
        return [s for s in self.samples if s["discrete_divergence"]]

    @property
    def numeric_failures(self) -> list[dict]:
        return [s for s in self.samples if not s["discrete_divergence"] and not s["within_tolerance"]]

    @property
    def passed(self) -> bool:
        dependence_failed = self.dependence is not None and self.dependence.failed
        return not self.numeric_failures and len(self.diverged) < len(self.samples) and not dependence_failed

    def worst(self, key: str) -> float:
        values = [o[key] for s in self.samples if not s["discrete_divergence"] for o in s["outputs"].values()]
        return max(values) if values else float("nan")

    @property
    def divergence_check(self) -> str:
        return "ONNX Runtime size tensors" if self.backend == "ort" else ENGINE_DIVERGENCE_NOTE

    def to_json(self) -> dict:
        return {"model": self.model, "atol": self.atol, "rtol": self.rtol, "passed": self.passed,
                "samples": self.samples, "discrete_divergences": len(self.diverged),
                "numeric_failures": len(self.numeric_failures),
                "max_abs": self.worst("max_abs"), "max_rel": self.worst("max_rel"),
                "backend": self.backend, "precision": self.precision, "min_cosine": self.min_cosine,
                "tolerances": {"atol": self.atol, "rtol": self.rtol, "min_cosine": self.min_cosine,
                               "reason": self.tolerance_reason},
                "divergence_check": self.divergence_check,
                "dependence": self.dependence.to_json() if self.dependence is not None else None}


def compare(reference: np.ndarray, actual: np.ndarray, atol: float, rtol: float,
            min_cosine: float | None = None) -> dict:
    """Max abs/rel error and the lowest per-row cosine; within_tolerance needs every element within
    atol + rtol * |reference| and, when min_cosine is set, every row's cosine at least min_cosine (rows that are
    zero on both sides count as matching)."""
    if reference.shape != actual.shape:
        return {"shape_mismatch": [list(reference.shape), list(actual.shape)], "max_abs": float("inf"),
                "max_rel": float("inf"), "cosine": float("nan"), "within_tolerance": False}
    ref = reference.astype(np.float64)
    act = actual.astype(np.float64)
    diff = np.abs(ref - act)
    flat_ref, flat_act = ref.reshape(ref.shape[0], -1), act.reshape(act.shape[0], -1)
    norm_ref, norm_act = np.linalg.norm(flat_ref, axis=1), np.linalg.norm(flat_act, axis=1)
    cosine = np.sum(flat_ref * flat_act, axis=1) / np.maximum(norm_ref * norm_act, 1e-30)
    allowed = atol + rtol * np.abs(ref)
    within = bool(np.all(diff <= allowed))
    if min_cosine is not None:
        both_zero = (norm_ref == 0) & (norm_act == 0)
        within = within and bool(np.all((cosine >= min_cosine) | both_zero))
    # The elementwise criterion's own measure: the worst |err| / (atol + rtol*|ref|); <= 1 passes. max_rel alone
    # can exceed rtol on a passing sample (near-zero references are covered by atol).
    exact = diff == 0
    ratio = np.divide(diff, allowed, out=np.where(exact, 0.0, np.inf), where=allowed > 0)
    return {"max_abs": float(diff.max()), "max_rel": float((diff / np.maximum(np.abs(ref), 1e-6)).max()),
            "cosine": float(cosine.min()), "worst_ratio": float(ratio.max()), "within_tolerance": within}


def plan_from_record(record: dict | None) -> tuple[dict, bool]:
    """{block: Method} and prop_attn from a tcexport.compression record (empty plan when uncompressed)."""
    if not record:
        return {}, True
    names = record.get("methods") or [record["method"]] * len(record["layers"])
    plan = {int(block): methods.get(name)(**params)
            for block, name, params in zip(record["layers"], names, record["params"])}
    return plan, bool(record.get("prop_attn", True))


def sample_feeds(specs, batch: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs; text inputs get a random real length per row (padding at the end) so masks matter."""
    feeds = random_feeds(specs, batch, seed)
    rng = np.random.default_rng(seed + 10_000)
    masks = [s for s in specs if s.kind == ATTENTION_MASK]
    ids = [s for s in specs if s.kind == TOKEN_IDS]
    for spec in masks:
        mask = feeds[spec.name]
        seq = mask.shape[1]
        for row in range(batch):
            length = int(rng.integers(max(2, seq // 4), seq + 1))
            mask[row, length:] = 0
        for id_spec in ids:
            feeds[id_spec.name] = np.where(mask > 0, feeds[id_spec.name], 0).astype(feeds[id_spec.name].dtype)
    return feeds


def _records(artifact: artifacts.Artifact) -> tuple[dict | None, dict | None]:
    if artifact.sidecar:
        records = artifact.sidecar.get("records", {})
        return records.get(metadata.SOURCE), records.get(metadata.COMPRESSION)
    model = onnxfile.load(artifact.model_path, load_external_data=False)
    return metadata.read(model, metadata.SOURCE), metadata.read(model, metadata.COMPRESSION)


def _session_with_sizes(artifact: artifacts.Artifact, threads: int | None):
    """An ORT session that also returns each stage's size tensor (when the graph still names them)."""
    from tcexport.backends import ort as ort_backend

    model = onnxfile.load(artifact.model_path)
    known = {o.name for o in model.graph.output}
    produced = {out for node in model.graph.node for out in node.output}
    sizes = sorted({out for out in produced if SIZE_OUTPUT.match(out)} - known,
                   key=lambda name: int(SIZE_OUTPUT.match(name).group(1)))
    decisions = [pattern.format(SIZE_OUTPUT.match(name).group(1)) for name in sizes for pattern in DECISION_OUTPUTS]
    extra = sizes + [m for m in decisions if m in produced]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in extra)
    provider = "cpu"
    if artifact.sidecar.get("provider"):
        provider = {v: k for k, v in ort_backend.PROVIDERS.items()}.get(artifact.sidecar["provider"], "cpu")
    options = ort_backend.session_options(threads, model=model, where=artifact.path)
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=[ort_backend.provider_name(provider)])
    except Exception as exc:  # noqa: BLE001 - ORT raises several types; the user needs one line
        raise UsageError(f"{artifact.path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None
    return session, sizes


def validate(path: Path, samples: int = 4, seed: int = 0, atol: float | None = None, rtol: float | None = None,
             batches: tuple[int, ...] = (1, 3), threads: int | None = None,
             min_cosine: float | None = None, user_inputs: Path | None = None) -> ValidationReport:
    """Compare `path` with its PyTorch reference. atol/rtol/min_cosine left as None follow the precision the
    outputs are computed at (tolerances_for): 1e-4, 1e-4 and no cosine floor for ONNX Runtime and fp32 engines."""
    artifact = artifacts.resolve(path)
    if artifact.backend not in ("ort", "trt"):
        raise UsageError(f"{path}: unknown backend '{artifact.backend}' in the sidecar; rebuild with 'tcexport build'")
    engine = artifact.backend == "trt"
    if not engine:  # before the slow reference: --impl plugin nodes need tcexport's ONNX Runtime op library
        from tcexport.plugins import ort_library

        ort_library.require(onnxfile.load(artifact.model_path, load_external_data=False), path)
    precision = str(artifact.sidecar.get("precision") or "fp32") if engine else "fp32"
    reason = tolerance_reason(precision, engine, atol, rtol, min_cosine)
    atol, rtol, min_cosine = tolerances_for(precision, atol, rtol, min_cosine)
    runner = None
    if engine:
        from tcexport.backends import trt_engine

        trt_engine.require_engine_runtime(path)  # before anything slow: the one line saying what is missing
        for batch in dict.fromkeys(batches[:samples]):
            trt_engine.check_batch_in_profile(artifact.sidecar.get("profile"), batch, str(path))
    source_record, compression_record = _records(artifact)
    if not source_record:
        raise UsageError(f"{path} has no tcexport.source record, so there is no PyTorch reference to rebuild; for a "
                         "model exported elsewhere, compare it with its uncompressed ONNX instead: tcexport validate "
                         f"{path} --reference-onnx UNCOMPRESSED.onnx")
    # The user's own inputs are checked against the recorded input specs before the slow rebuild of the reference.
    user_feeds = None
    if user_inputs is not None:
        recorded = [InputSpec.from_json(s) for s in [*source_record.get("inputs", []),
                                                     *(compression_record or {}).get("extra_inputs", [])]]
        user_feeds = load_user_inputs(user_inputs, recorded)
    with progress.step(f"rebuild the PyTorch reference of {Path(path).name}"):
        source = coverage.cached_source(source_record)
        plan, prop_attn = plan_from_record(compression_record)
        if plan:
            from tcexport.reference import compressed_reference

            reference = compressed_reference(source, plan, prop_attn=prop_attn,
                                             protected=compression_record.get("protected"))
        else:
            reference = source.model
    if engine:
        runner = trt_engine.open_engine_runner(artifact)
        session, size_names = None, []
    else:
        session, size_names = _session_with_sizes(artifact, threads)
    # Inputs compression added (the query method's "query"): fed after the source's, by name to the reference.
    extra_specs = [InputSpec.from_json(s) for s in (compression_record or {}).get("extra_inputs", [])]
    report = ValidationReport(str(path), atol, rtol, min_cosine=min_cosine, backend=artifact.backend,
                              precision=precision, tolerance_reason=reason)
    cases = [(seed + i, sample_feeds([*source.inputs, *extra_specs], batches[i % len(batches)], seed + i))
             for i in range(samples)]
    if user_feeds is not None:
        cases.append((None, user_feeds))
    with progress.step(f"compare {len(cases)} samples with the reference", total=len(cases)) as step:
        for index, (sample_seed, feeds) in enumerate(cases):
            report.samples.append(_sample(index, sample_seed, feeds, source, reference, plan, extra_specs, runner,
                                          session, size_names, user_inputs, path, atol, rtol, min_cosine))
            progress.advance(step, 1)
    protected = int((compression_record or {}).get("protected") or source.info.get("num_prefix_tokens", 1))
    with progress.step("check which input tokens each output depends on"):
        report.dependence = _dependence(source, reference, plan, extra_specs, runner, session, protected,
                                        batch=batches[0] if engine else 1, seed=seed)
    return report


def _dependence(source, reference, plan, extra_specs, runner, session, protected: int, batch: int,
                seed: int) -> dependence_mod.DependenceReport:
    """validate/dependence.py on this artifact: the source model is the uncompressed side, the artifact the
    compressed one, and the reference says where each compressed token stands (its original position)."""

    def tensors(feeds):
        return [torch.from_numpy(feeds[spec.name]) for spec in source.inputs]

    def uncompressed(feeds):
        with torch.no_grad():
            return {name: out.numpy() for name, out in zip(source.outputs, _as_tuple(source.model(*tensors(feeds))))}

    def compressed(feeds):
        if runner is not None:
            return runner.infer(feeds)
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))

    def positions(feeds):
        if not plan:
            return None
        extra = {spec.name: torch.from_numpy(feeds[spec.name]) for spec in extra_specs}
        with torch.no_grad():
            reference(*tensors(feeds), **extra)
        try:
            return reference.flow.positions()[0].numpy()
        except UsageError:  # a method whose choices cannot be probed (query): only the protected rows match
            return None

    extra = random_feeds(extra_specs, batch, seed)
    return dependence_mod.check(source.inputs, source.outputs, uncompressed, compressed, positions, protected,
                                extra, batch=batch, seed=seed)


def _sample(index, sample_seed, feeds, source, reference, plan, extra_specs, runner, session, size_names,
            user_inputs, path, atol, rtol, min_cosine) -> dict:
    """One sample: run both sides on `feeds` and compare every output."""
    outputs = source.outputs
    batch = next(iter(feeds.values())).shape[0]
    tensors = [torch.from_numpy(feeds[spec.name]) for spec in source.inputs]
    extra = {spec.name: torch.from_numpy(feeds[spec.name]) for spec in extra_specs}
    with torch.no_grad():
        expected = _as_tuple(reference(*tensors, **extra))
        baseline = _as_tuple(source.model(*tensors)) if plan else expected
    if runner is not None:
        actual = runner.infer(feeds)
        missing = [name for name in outputs if name not in actual]
        if missing:
            raise UsageError(f"{path}: the engine has no output {', '.join(repr(m) for m in missing)} (it has "
                             f"{', '.join(actual) or 'none'}); rebuild it from the exported ONNX file")
    else:
        results = session.run(None, feeds)
        actual = dict(zip([o.name for o in session.get_outputs()], results))
    sample = {"index": index, "batch": batch, "seed": sample_seed, "outputs": {}, "fidelity": {}}
    if sample_seed is None:
        sample["inputs"] = str(user_inputs)
    for name, ref, base in zip(outputs, expected, baseline):
        sample["outputs"][name] = compare(ref.numpy(), actual[name], atol, rtol, min_cosine)
        sample["fidelity"][name] = _fidelity(name, base.numpy(), actual[name])
    sample["within_tolerance"] = all(o["within_tolerance"] for o in sample["outputs"].values())
    if runner is not None:
        sample["discrete_divergence"] = None  # unknown: see ENGINE_DIVERGENCE_NOTE
    else:
        sample["discrete_divergence"] = not sample["within_tolerance"] and _diverged(reference, actual,
                                                                                      size_names)
    return sample


def load_user_inputs(path: Path, specs) -> dict[str, np.ndarray]:
    """Inputs from an .npz file with one array per model input, named as the inputs (any batch size)."""
    return load_npz_feeds(path, specs, "--inputs")


def _as_tuple(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _fidelity(name: str, uncompressed: np.ndarray, actual: np.ndarray) -> dict:
    """How close the compressed output stays to the uncompressed model's."""
    if uncompressed.shape != actual.shape:
        return {"note": f"shape {list(actual.shape)} vs uncompressed {list(uncompressed.shape)}"}
    base = uncompressed.reshape(uncompressed.shape[0], -1).astype(np.float64)
    act = actual.reshape(actual.shape[0], -1).astype(np.float64)
    cosine = np.sum(base * act, axis=1) / np.maximum(np.linalg.norm(base, axis=1) * np.linalg.norm(act, axis=1), 1e-30)
    result = {"cosine_vs_uncompressed": float(cosine.mean())}
    if "logit" in name and uncompressed.ndim == 2 and uncompressed.shape[1] > 1:  # classifiers only
        result["top1_agreement"] = float(np.mean(uncompressed.argmax(1) == actual.argmax(1)))
    return result


def _diverged(reference, actual: dict, size_names: list[str], tolerance: float = 1e-4) -> bool:
    """True when the two sides merged different tokens from (numerically) the same inputs: a near-tie flip.

    Each stage's size tensor fingerprints its token choices. At the first stage whose sizes differ, the
    metric the method decided on must still agree; if it does not, an error upstream changed the choice, and
    that is a numeric failure, not a divergence.
    """
    flow = getattr(reference, "flow", None)
    stage_sizes = getattr(flow, "stage_sizes", None)
    stage_metrics = getattr(flow, "stage_metrics", None)
    if not size_names or not stage_sizes:
        return False
    for stage, (name, expected) in enumerate(zip(size_names, stage_sizes)):
        got = actual.get(name)
        if got is not None and got.shape == tuple(expected.shape) and np.array_equal(got, expected.numpy()):
            continue
        block = SIZE_OUTPUT.match(name).group(1)
        found = [actual[p.format(block)] for p in DECISION_OUTPUTS if p.format(block) in actual]
        if stage_metrics is None or not found or stage >= len(stage_metrics) or stage_metrics[stage] is None:
            return False
        want, have = stage_metrics[stage].numpy(), found[0]
        if want.shape != have.shape:
            return False
        scale = max(float(np.abs(want).max()), 1e-6)
        return float(np.abs(want - have).max()) <= tolerance * scale
    return False


def format_report(report: ValidationReport) -> str:
    what = f" (TensorRT {report.precision} engine)" if report.backend == "trt" else ""
    cosine = f", min cosine {report.min_cosine:g}" if report.min_cosine is not None else ""
    lines = [f"validate {report.model}{what}: {len(report.samples)} samples, atol {report.atol:g}, "
             f"rtol {report.rtol:g}{cosine}",
             "  a sample is ok when every element has |err| <= atol + rtol*|ref| (worst ratio <= 1"
             f"{', and every row cosine >= min cosine' if report.min_cosine is not None else ''}); max rel alone may "
             "exceed rtol where |ref| is near 0"]
    if report.backend == "trt":
        lines.append(f"  tolerances: {report.tolerance_reason}")
        lines.append(f"  discrete divergence: {ENGINE_DIVERGENCE_NOTE}")
    for sample in report.samples:
        flag = "DIVERGED (different tokens chosen)" if sample["discrete_divergence"] else (
            "ok" if sample["within_tolerance"] else "EXCEEDS TOLERANCE")
        parts = []
        for name, o in sample["outputs"].items():
            fid = sample["fidelity"][name]
            figures = ", ".join(f"{k} {v:.4f}" for k, v in fid.items() if isinstance(v, float))
            info = f"; fidelity vs uncompressed (information, not checked): {figures}" if figures else ""
            ratio = f", worst ratio {o['worst_ratio']:.2f}" if "worst_ratio" in o else ""
            parts.append(f"{name}: max abs {o['max_abs']:.2e}, max rel {o['max_rel']:.2e}{ratio}, "
                         f"cosine {o['cosine']:.6f}{info}")
        # The verdict first: at the end of the line it would read as the verdict on the fidelity figures.
        lines.append(f"  sample {sample['index']} (batch {sample['batch']}) [{flag}]: {'; '.join(parts)}")
    if report.dependence is not None:
        lines.extend(dependence_mod.format_lines(report.dependence))
    verdict = "PASSED" if report.passed else "FAILED"
    divergences = ("discrete divergence not checked" if report.backend == "trt"
                   else f"{len(report.diverged)} discrete divergence(s)")
    dependence = f", dependence {report.dependence.status}" if report.dependence is not None else ""
    lines.append(f"{verdict}: {len(report.numeric_failures)} numeric failure(s), {divergences}{dependence}")
    return "\n".join(lines)


def write_json(report: ValidationReport, path: Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(report.to_json(), indent=2) + "\n")


def run(path: Path, json_path: Path | None = None, **options) -> ValidationReport:
    from tcexport.validate import decoder

    if decoder.is_decoder_file(Path(path)):
        return decoder.run(Path(path), json_path, samples=options.get("samples", 3), seed=options.get("seed", 0),
                           atol=options.get("atol"))
    if json_path:
        check_writable(json_path, "--json")  # before the run, not after it
    report = validate(path, **options)
    if json_path:
        write_json(report, json_path)
    if not report.passed:
        raise ValidationFailed(format_report(report), report.to_json())
    return report
