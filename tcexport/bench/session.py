"""Benchmark artifacts side by side: interleaved timed runs, trtexec-style latency statistics, table, JSON, plot.

Every artifact (an .onnx file or a build directory) gets a Runner. For each batch size the runners are warmed
up, then timed in rounds: one run of each artifact per round, in an order that rotates every round, so machine
drift (thermal throttling, a noisy neighbour) lands on all artifacts alike and none always runs first.

Results are plain dicts and lists, ready for json.dumps:

    {"tool", "environment": {...}, "settings": {...},
     "artifacts": [{"label", "path", "model_path", "backend", "provider", "opt_level", "threads", ...}],
     "results": [{"artifact", "batch", "iters", "warmup_runs",
                  "latency_ms": {min, max, mean, median, p90, p95, p99, std}, "wall_s",
                  "throughput_qps", "throughput_samples_per_s", "speedup",
                  ["gpu_compute_ms", "h2d_ms", "d2h_ms"]: {same statistics}}],
     "warnings": [why some numbers should not be trusted: p99 > 3x median, too few runs for a percentile]}

latency_ms is host wall time around each run, for every backend (an engine run waits for its stream, so it
covers the same work as a synchronous ONNX Runtime run); speedup is the median latency of the first artifact at
the same batch size divided by this one's median, and throughput is timed runs over the wall-clock they held (wall_s:
from each run's start to the next run's start, so loop overhead counts, as in trtexec's host walltime; not
1 / mean latency).

TensorRT engine directories (sidecar backend "trt") run through tcexport.backends.trt_engine.TrtRunner, which also
reports device times measured with CUDA events on its stream, per run, so they sit next to latency_ms:
gpu_compute_ms is trtexec's "GPU Compute Time" (execute_async_v3 or the CUDA graph replaying it), and with
include_copies h2d_ms / d2h_ms are its "H2D Latency" / "D2H Latency" (trtexec's "Host Latency" is their sum with
gpu_compute_ms; its "Throughput" is runs over host wall time, as throughput_qps here). Without include_copies the
inputs stay on the GPU between runs, like trtexec --noDataTransfers. ONNX Runtime entries keep only the host
fields. Engine artifacts add "precision", "tensorrt_version", "gpu_name", "include_copies", "cuda_graph" and
"cuda_graph_note" to their artifact entry.
"""

from __future__ import annotations

import datetime
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from tcexport import __version__
from tcexport.bench.stats import add_speedups, noise_warnings, summarize
from tcexport.bench.timing import (DEFAULT_ITERS, OrtRunner, Runner, device_fields_of, pop_device_times,
                                   time_interleaved)
from tcexport.models import inputs
from tcexport.core import onnxfile
from tcexport.core import progress
from tcexport.core.artifacts import Artifact, resolve
from tcexport.core.errors import UsageError


@dataclass
class Prepared:
    """An artifact ready to time: its runner, the inputs it takes, and how it was opened (for the report)."""

    artifact: Artifact
    label: str
    runner: Runner
    specs: list[inputs.InputSpec]
    provider: str | None
    opt_level: str | None
    info: dict = field(default_factory=dict)  # backend-specific facts for the artifact entry


# ---------------------------------------------------------------------------------------------- opening artifacts


def unique_labels(artifacts: Sequence[Artifact]) -> list[str]:
    """Short labels (file stem / directory name); fall back to the path as given when two would collide."""
    short = [a.label or a.path.resolve().name or str(a.path) for a in artifacts]
    labels = [s if short.count(s) == 1 else str(a.path) for s, a in zip(short, artifacts)]
    # The same path given twice still needs two distinct labels for the table and the speedup lookup.
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if labels.count(label) == 1 else f"{label}#{seen[label]}")
    return unique


def ort_provider_and_opt_level(artifact: Artifact) -> tuple[str, str]:
    """How to open an ORT artifact: a build replays its sidecar's provider and level; a plain .onnx uses cpu, all."""
    from tcexport.backends import ort as ort_backend

    if not artifact.sidecar:
        return "cpu", "all"
    short_by_full = {full: short for short, full in ort_backend.PROVIDERS.items()}
    recorded_provider = artifact.sidecar.get("provider", "CPUExecutionProvider")
    provider = short_by_full.get(recorded_provider)
    if provider is None:
        raise UsageError(f"{artifact.path}: the sidecar names provider '{recorded_provider}', which tcexport cannot "
                         f"open; rebuild with 'tcexport build --provider {'|'.join(ort_backend.PROVIDERS)}'")
    try:
        ort_backend.provider_name(provider)  # fail here, naming the build, if this machine lacks the provider
    except UsageError as exc:
        raise UsageError(f"{artifact.path}: built for {recorded_provider}: {exc}") from None
    # The saved model is already optimized at this level; optimizing again at the same level is harmless and
    # keeps provider-specific fused nodes loadable.
    opt_level = (artifact.sidecar.get("options") or {}).get("graph_optimization_level") or "all"
    if opt_level not in ort_backend.OPT_LEVELS:
        raise UsageError(f"{artifact.path}: the sidecar records graph_optimization_level '{opt_level}', expected one "
                         f"of {', '.join(ort_backend.OPT_LEVELS)}; rebuild with 'tcexport build'")
    return provider, opt_level


def open_ort_runner(artifact: Artifact, label: str, provider: str, opt_level: str, threads: int | None) -> OrtRunner:
    from tcexport.backends import ort as ort_backend

    options = ort_backend.session_options(threads, opt_level, interleaved=True)
    session = ort_backend.open_session(artifact.model_path, provider, options=options)
    return OrtRunner(label, session)


def input_specs(artifact: Artifact) -> list[inputs.InputSpec]:
    """A build records its inputs in the sidecar (the optimized graph may drop metadata); an .onnx carries its own."""
    if artifact.sidecar.get("inputs"):
        try:
            return [inputs.InputSpec.from_json(s) for s in artifact.sidecar["inputs"]]
        except TypeError:
            raise UsageError(f"{artifact.path}: the sidecar's 'inputs' are malformed; rebuild with 'tcexport build'") from None
    return inputs.specs_from_graph(onnxfile.load(artifact.model_path, load_external_data=False))


def check_engine_options(artifacts: Sequence[Artifact], include_copies: bool, cuda_graph: bool) -> None:
    """--include-copies/--cuda-graph shape how TensorRT engines are timed; with no engine to time they are a mistake."""
    given = [name for name, on in (("--include-copies", include_copies), ("--cuda-graph", cuda_graph)) if on]
    if given and not any(a.backend == "trt" for a in artifacts):
        verb = "applies" if len(given) == 1 else "apply"
        raise UsageError(f"{'/'.join(given)} {verb} to TensorRT engine directories ('tcexport build --backend trt') "
                         "and none of the artifacts is one; drop the option or add an engine")


def prepare(artifact: Artifact, label: str, threads: int | None, include_copies: bool = False,
            cuda_graph: bool = False) -> Prepared:
    if artifact.backend == "trt":
        from tcexport.backends import trt_engine

        runner = trt_engine.open_engine_runner(artifact, label, include_copies=include_copies, cuda_graph=cuda_graph)
        sidecar = artifact.sidecar
        info = {"precision": sidecar.get("precision"), "tensorrt_version": sidecar.get("tensorrt_version"),
                "gpu_name": sidecar.get("gpu_name"), "include_copies": include_copies}
        return Prepared(artifact, label, runner, input_specs(artifact), None, None, info)
    if artifact.backend != "ort":
        raise UsageError(f"{artifact.path}: unknown backend '{artifact.backend}' in the sidecar; rebuild with 'tcexport build'")
    specs = input_specs(artifact)  # before opening the session: a broken .onnx fails with onnxfile's clear message
    provider, opt_level = ort_provider_and_opt_level(artifact)
    runner = open_ort_runner(artifact, label, provider, opt_level, threads)
    return Prepared(artifact, label, runner, specs, provider, opt_level)


def feeds_for_batch(prepared: Prepared, batch: int) -> dict[str, np.ndarray]:
    """Random feeds at `batch`; refuses a static-batch model at another batch (its samples/s would be a lie)."""
    has_dynamic_batch = any(spec.shape and not (isinstance(spec.shape[0], int) and spec.shape[0] > 0)
                            for spec in prepared.specs)
    static_batches = {spec.shape[0] for spec in prepared.specs if spec.shape}
    if not has_dynamic_batch and static_batches and batch not in static_batches:
        fixed = min(static_batches)
        raise UsageError(f"{prepared.label}: the model has a fixed batch size of {fixed}, cannot bench it at batch "
                         f"{batch}; use --batch {fixed} or re-export with '--batch dynamic'")
    if prepared.artifact.backend == "trt":
        from tcexport.backends import trt_engine

        trt_engine.check_batch_in_profile(prepared.artifact.sidecar.get("profile"), batch, prepared.label)
    return inputs.random_feeds(prepared.specs, batch, seed=0)


# ---------------------------------------------------------------------------------------------- the run


def artifact_entry(prepared: Prepared, threads: int | None) -> dict:
    """The report's description of one artifact: how it was opened, plus engine facts for TensorRT."""
    artifact = prepared.artifact
    entry = {"label": prepared.label, "path": str(artifact.path), "model_path": str(artifact.model_path),
             "backend": artifact.backend, "provider": prepared.provider, "opt_level": prepared.opt_level,
             "threads": threads if artifact.backend == "ort" else None}
    if artifact.backend == "trt":
        entry.update(prepared.info)
        runner = prepared.runner
        entry["cuda_graph"] = bool(getattr(runner, "cuda_graph_used", False))
        entry["cuda_graph_note"] = getattr(runner, "cuda_graph_note", "off")
        entry["device_fields"] = list(device_fields_of(runner))
    return entry


def environment(threads: int | None) -> dict:
    import onnxruntime

    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable_cpus = os.cpu_count()
    return {
        "onnxruntime_version": onnxruntime.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "threads": threads,  # None: ONNX Runtime's default
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@dataclass
class FeedPlan:
    """Where the inputs come from: random at each batch size, random at --shapes, or the arrays of --load-inputs."""

    batches: list[int]
    shapes: dict[str, tuple[int, ...]] | None = None
    arrays: dict[str, np.ndarray] | None = None
    origin: str = ""  # the option that gave them, for errors

    def feeds(self, prepared: Prepared, batch: int) -> dict[str, np.ndarray]:
        if self.arrays is not None:
            return inputs.feeds_from_arrays(self.arrays, prepared.specs, f"{self.origin} ({prepared.label})")
        if self.shapes is not None:
            shaped = inputs.with_shapes(prepared.specs, self.shapes, prepared.label)
            return feeds_for_batch(Prepared(prepared.artifact, prepared.label, prepared.runner, shaped,
                                            prepared.provider, prepared.opt_level, prepared.info), batch)
        return feeds_for_batch(prepared, batch)

    def check_names(self, prepared: Sequence[Prepared]) -> None:
        """A name no artifact takes is a typo, not something to ignore."""
        given = self.arrays if self.arrays is not None else self.shapes
        known = {spec.name for p in prepared for spec in p.specs}
        unknown = sorted(set(given or {}) - known)
        if unknown:
            raise UsageError(f"{self.origin}: no artifact takes an input named {', '.join(unknown)} (inputs: "
                             f"{', '.join(sorted(known))})")


def feed_plan(batches: Sequence[int] | None, shapes: str | dict | None, load_inputs: str | Path | None) -> FeedPlan:
    """Check how the inputs are chosen; the batch comes from --shapes or --load-inputs when one is given."""
    if shapes is not None and load_inputs is not None:
        raise UsageError("give --shapes or --load-inputs, not both (the loaded arrays have their own shapes)")
    if (shapes is not None or load_inputs is not None) and batches:
        raise UsageError(f"{'--shapes' if shapes is not None else '--load-inputs'} sets the batch size (the first "
                         "dimension); drop --batch")
    if shapes is not None:
        parsed = inputs.parse_shapes(shapes) if isinstance(shapes, str) else dict(shapes)
        return FeedPlan([inputs.shapes_batch(parsed)], shapes=parsed, origin="--shapes")
    if load_inputs is not None:
        path = Path(load_inputs)
        if not path.is_file():
            raise UsageError(f"--load-inputs {path}: no such file; save one with numpy.savez(path, input_name=array)")
        arrays = inputs.read_npz(path, "--load-inputs")
        first_dims = {a.shape[0] for a in arrays.values() if a.ndim}
        if len(first_dims) != 1:
            raise UsageError(f"--load-inputs {path}: the arrays disagree on the batch size ({sorted(first_dims)})")
        return FeedPlan([first_dims.pop()], arrays=arrays, origin=f"--load-inputs {path}")
    batches = list(dict.fromkeys(batches or [1]))  # a repeated batch size would only repeat rows
    if any(b < 1 for b in batches):
        raise UsageError(f"batch sizes must be positive integers, got {batches}")
    return FeedPlan(batches)


def run(paths: Sequence[str | Path], batches: Sequence[int] | None = None, threads: int | None = None,
        warmup: int = 10, iters: int | None = None, duration: float | None = None, include_copies: bool = False,
        cuda_graph: bool = False, warmup_ms: float | None = None, shapes: str | dict | None = None,
        load_inputs: str | Path | None = None) -> dict:
    """Time every artifact at every batch size, interleaved; return the results structure (see module doc).

    warmup_ms replaces the warm-up run count with a time budget per artifact (trtexec's --warmUp). shapes
    ('name:1x3x224x224,...', trtexec's --shapes) or load_inputs (an .npz of arrays named as the inputs) fix the
    inputs, and with them the one batch size (pass batches=None). include_copies / cuda_graph apply to TensorRT
    engines: time H2D/D2H copies every run, replay a CUDA graph.
    """
    if iters is not None and duration is not None:
        raise UsageError("give iters or duration, not both")
    if iters is not None and iters < 1:
        raise UsageError(f"iters must be at least 1, got {iters}")
    if duration is not None and duration <= 0:
        raise UsageError(f"duration must be positive, got {duration}")
    if warmup < 0:
        raise UsageError(f"warmup must be 0 or more, got {warmup}")
    if warmup_ms is not None and warmup_ms <= 0:
        raise UsageError(f"--warmup-ms must be positive, got {warmup_ms}")
    if not paths:
        raise UsageError("no artifacts to bench; pass .onnx files or build directories")
    plan = feed_plan(batches, shapes, load_inputs)
    if iters is None and duration is None:
        iters = DEFAULT_ITERS

    # Resolve every path before loading anything, so a typo in the last one fails at once.
    artifacts = [resolve(p) for p in paths]
    check_engine_options(artifacts, include_copies, cuda_graph)
    labels = unique_labels(artifacts)
    with progress.step(f"open {len(artifacts)} artifact{'s' if len(artifacts) > 1 else ''}"):
        prepared = [prepare(a, label, threads, include_copies, cuda_graph) for a, label in zip(artifacts, labels)]
    plan.check_names(prepared)
    runners = [p.runner for p in prepared]

    entries = []
    for batch in plan.batches:
        # Feeds are made once per (artifact, batch), outside the timed region; artifacts may differ in inputs.
        feeds = [plan.feeds(p, batch) for p in prepared]
        amount = f"{duration:g} s" if duration is not None else f"{iters} rounds"
        total = duration if duration is not None else iters * len(prepared)
        with progress.step(f"time {len(prepared)} artifact{'s' if len(prepared) > 1 else ''} at batch {batch}: "
                           f"{amount}, interleaved", total=total) as step:
            if duration is None:
                def on_round(runs):
                    progress.advance(step, runs)
            else:
                round_start = [time.perf_counter()]

                def on_round(_runs, start=round_start):  # a duration bar advances in seconds, not runs
                    now = time.perf_counter()
                    progress.advance(step, min(now - start[0], duration))
                    start[0] = now
            timing = time_interleaved(runners, feeds, warmup, iters=iters, duration=duration, on_round=on_round,
                                      warmup_ms=warmup_ms)
            step.note(f"{len(timing.latencies_ns[0])} timed runs each")
        entries.extend(summarize(p.label, batch, lat, wall, pop_device_times(p.runner), warm)
                       for p, lat, wall, warm in zip(prepared, timing.latencies_ns, timing.wall_ns,
                                                     timing.warmup_runs))
    add_speedups(entries)

    settings = {"batches": plan.batches, "warmup": warmup, "warmup_ms": warmup_ms, "iters": iters,
                "duration_s": duration, "threads": threads, "interleaved": True, "ort_intra_op_spinning": False,
                "inputs": ("random" if plan.shapes is None and plan.arrays is None else plan.origin),
                "throughput": "timed runs / wall-clock they held (run start to next run start)"}
    if plan.shapes is not None:
        settings["shapes"] = {name: list(dims) for name, dims in plan.shapes.items()}
    if any(p.artifact.backend == "trt" for p in prepared):
        settings.update(include_copies=include_copies, cuda_graph=cuda_graph,
                        device_timing="CUDA events on the engine's stream, one sample per timed run")
    return {
        "tool": f"tcexport {__version__}",
        "environment": environment(threads),
        "settings": settings,
        "artifacts": [artifact_entry(p, threads) for p in prepared],
        "results": entries,
        "warnings": noise_warnings(entries),
    }
