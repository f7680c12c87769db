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

TensorRT engine directories (sidecar backend "trt") run through tcexport.backends.trt.TrtRunner, which also
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
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np

from tcexport import __version__
from tcexport.models import inputs
from tcexport.core import onnxfile
from tcexport.core import progress
from tcexport.core.artifacts import Artifact, resolve
from tcexport.core.atomic import atomic_file
from tcexport.core.errors import UsageError

DEFAULT_ITERS = 50
MIN_ROUNDS_WITH_DURATION = 3  # a duration budget still yields a few samples per artifact, even for slow models
PERCENTILES = {"p90": 90, "p95": 95, "p99": 99}
NOISY_P99_OVER_MEDIAN = 3.0  # a p99 beyond this many medians: the machine interfered, the numbers do not describe the model


class Runner(Protocol):
    """One loaded artifact that can be run on a feed.

    Optional extras, looked up with getattr so ONNX Runtime's runner needs none of them:
    stage(feeds) prepares runs on a feed outside the timed region (called before the warm-up of each batch);
    device_fields names the device times each run records (e.g. ("gpu_compute_ms",)), and pop_device_times()
    returns {field: [ms per run]} for the runs since the last call. TrtRunner provides all three.
    """

    name: str

    def run(self, feeds: dict[str, np.ndarray]) -> object: ...


class OrtRunner:
    """An ONNX Runtime session. run() does nothing but session.run so the timed region holds only inference."""

    def __init__(self, name: str, session) -> None:
        self.name = name
        self.session = session

    def run(self, feeds: dict[str, np.ndarray]) -> object:
        try:
            return self.session.run(None, feeds)
        except Exception as exc:  # ORT raises its own pybind11 types; any of them means this feed cannot run
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise UsageError(f"{self.name}: ONNX Runtime failed to run it: {first_line}") from None


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
        from tcexport.backends import trt as trt_backend

        runner = trt_backend.open_engine_runner(artifact, label, include_copies=include_copies, cuda_graph=cuda_graph)
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
        from tcexport.backends import trt as trt_backend

        trt_backend.check_batch_in_profile(prepared.artifact.sidecar.get("profile"), batch, prepared.label)
    return inputs.random_feeds(prepared.specs, batch, seed=0)


# ---------------------------------------------------------------------------------------------- timing


def round_order(n_artifacts: int, round_index: int) -> list[int]:
    """Artifact indices for one round, rotated by the round number so each artifact leads equally often."""
    return [(round_index + k) % n_artifacts for k in range(n_artifacts)]


@dataclass
class Timing:
    """What one interleaved timing produced, per runner (in the runners' order)."""

    latencies_ns: list[list[int]]  # each timed run, start to end
    wall_ns: list[int]  # the wall-clock each runner held: from each of its runs' start to the next run's start
    warmup_runs: list[int]  # warm-up runs done (a --warmup-ms budget turns into a count)


def warm_up(runner: Runner, feed: dict, runs: int, ms: float | None = None) -> int:
    """Run `runs` times, or for at least `ms` milliseconds (and at least once) when ms is given; return the count."""
    if ms is None:
        for _ in range(runs):
            runner.run(feed)
        return runs
    done, deadline = 0, time.perf_counter_ns() + int(ms * 1e6)
    while done == 0 or time.perf_counter_ns() < deadline:
        runner.run(feed)
        done += 1
    return done


def time_interleaved(runners: Sequence[Runner], feeds: Sequence[dict], warmup: int, iters: int | None = None,
                     duration: float | None = None, on_round: Callable[[int], None] | None = None,
                     warmup_ms: float | None = None) -> Timing:
    """Time the runners in rotating rounds. Stops after `iters` rounds, or once `duration` seconds of rounds (after
    warm-up) have passed and at least MIN_ROUNDS_WITH_DURATION rounds are done. on_round(runs) is called after
    every round, outside the timed region.

    Each run's wall-clock slice lasts from its start to the start of the next run (the last of a round: to the
    round's end), so the slices hold the loop's own overhead too and add up to the timed wall-clock, less the
    pauses between rounds where the progress bar is drawn: throughput comes from them, as trtexec's comes from
    the host wall time of its runs.
    """
    if iters is None and duration is None:
        iters = DEFAULT_ITERS
    warmup_runs = []
    for runner, feed in zip(runners, feeds):
        stage = getattr(runner, "stage", None)
        if stage is not None:
            stage(feed)
        warmup_runs.append(warm_up(runner, feed, warmup, warmup_ms))
        pop_device_times(runner)  # warm-up runs are not samples
    latencies_ns: list[list[int]] = [[] for _ in runners]
    wall_ns = [0] * len(runners)
    deadline_ns = None if duration is None else time.perf_counter_ns() + int(duration * 1e9)
    round_index = 0
    while True:
        if deadline_ns is None:
            if round_index >= iters:
                break
        elif round_index >= MIN_ROUNDS_WITH_DURATION and time.perf_counter_ns() >= deadline_ns:
            break
        previous = None  # (runner index, its start) of the run before this one in the round
        for i in round_order(len(runners), round_index):
            runner, feed = runners[i], feeds[i]
            start = time.perf_counter_ns()
            if previous is not None:
                wall_ns[previous[0]] += start - previous[1]
            runner.run(feed)
            latencies_ns[i].append(time.perf_counter_ns() - start)
            previous = (i, start)
        wall_ns[previous[0]] += time.perf_counter_ns() - previous[1]
        round_index += 1
        if on_round is not None:
            on_round(len(runners))
    return Timing(latencies_ns, wall_ns, warmup_runs)


# ---------------------------------------------------------------------------------------------- statistics


def latency_stats(latencies_ms: Sequence[float]) -> dict[str, float]:
    values = np.asarray(latencies_ms, dtype=np.float64)
    stats = {
        "min": float(values.min()),
        "max": float(values.max()),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
    }
    for name, q in PERCENTILES.items():
        stats[name] = float(np.percentile(values, q))
    stats["std"] = float(values.std())
    return stats


# Device-time fields a runner may report, in table/report order. Each one is a latency_stats dict in a result.
DEVICE_FIELDS = ("gpu_compute_ms", "h2d_ms", "d2h_ms")


def device_fields_of(runner: Runner) -> tuple[str, ...]:
    """The device times `runner` reports per run (none for ONNX Runtime)."""
    fields = tuple(getattr(runner, "device_fields", ()) or ())
    unknown = [f for f in fields if f not in DEVICE_FIELDS]
    if unknown:
        raise ValueError(f"{getattr(runner, 'name', runner)}: unknown device time fields {unknown}")
    return fields


def pop_device_times(runner: Runner) -> dict[str, list[float]]:
    """Device times recorded by `runner` since the last call, limited to its declared fields ({} when none)."""
    fields = device_fields_of(runner)
    if not fields:
        return {}
    recorded = runner.pop_device_times()  # type: ignore[attr-defined]
    return {f: list(recorded.get(f, [])) for f in fields}


def merge_device_stats(entry: dict, device_times: dict[str, Sequence[float]] | None) -> dict:
    """Add one latency_stats dict per device field to `entry`, next to its host latency_ms.

    Each field must hold exactly one time per timed run (entry["iters"]), so host and device statistics describe
    the same runs; a runner that reports fewer or more is a bug, not something to average over.
    """
    for name in DEVICE_FIELDS:
        values = (device_times or {}).get(name)
        if values is None:
            continue
        if len(values) != entry["iters"]:
            raise ValueError(f"{entry['artifact']}: {len(values)} {name} samples for {entry['iters']} timed runs "
                             f"at batch {entry['batch']}")
        entry[name] = latency_stats(values)
    return entry


def summarize(label: str, batch: int, latencies_ns: Sequence[int], wall_ns: int,
              device_times: dict[str, Sequence[float]] | None = None, warmup_runs: int | None = None) -> dict:
    """One result entry (speedup is filled in by add_speedups once every artifact at this batch is known).

    Throughput is timed runs over wall_ns, the wall-clock those runs held (see time_interleaved), not 1 / mean
    latency. device_times ({field: [ms per run]}) adds device statistics for runners that measure them.
    """
    if not latencies_ns:
        raise ValueError(f"{label}: no timed runs at batch {batch}")
    latency_ms = latency_stats(np.asarray(latencies_ns, dtype=np.float64) / 1e6)
    wall_s = wall_ns / 1e9
    runs_per_s = len(latencies_ns) / wall_s if wall_s > 0 else float("inf")
    entry = {
        "artifact": label,
        "batch": batch,
        "iters": len(latencies_ns),
        "warmup_runs": warmup_runs,
        "latency_ms": latency_ms,
        "wall_s": wall_s,
        "throughput_qps": runs_per_s,
        "throughput_samples_per_s": batch * runs_per_s,
        "speedup": None,
    }
    return merge_device_stats(entry, device_times)


def add_speedups(entries: list[dict]) -> list[dict]:
    """speedup = baseline median / own median, the baseline being the first entry seen at each batch size."""
    baseline_median: dict[int, float] = {}
    for entry in entries:
        baseline_median.setdefault(entry["batch"], entry["latency_ms"]["median"])
    for entry in entries:
        median = entry["latency_ms"]["median"]
        entry["speedup"] = baseline_median[entry["batch"]] / median if median > 0 else float("inf")
    return entries


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


def noise_warnings(entries: Sequence[dict]) -> list[str]:
    """Why some numbers should not be trusted: a long tail (p99 > 3x median), or too few runs for a percentile."""
    warnings = []
    for entry in entries:
        latency = entry["latency_ms"]
        if latency["median"] > 0 and latency["p99"] > NOISY_P99_OVER_MEDIAN * latency["median"]:
            warnings.append(f"{entry['artifact']} at batch {entry['batch']}: p99 {latency['p99']:.3g} ms is "
                            f"{latency['p99'] / latency['median']:.1f}x the median {latency['median']:.3g} ms: too "
                            "noisy to trust; stop other work on the machine, pin --threads, or time longer")
    fewest = min((e["iters"] for e in entries), default=0)
    short = [name for name, q in PERCENTILES.items() if fewest < runs_needed(q)]
    if short:
        need = runs_needed(PERCENTILES[short[-1]])
        warnings.append(f"{fewest} timed runs are too few for {', '.join(short)}: a {short[-1]} needs at least "
                        f"{need} runs to be more than the slowest run interpolated; use --iters {need} or more")
    return warnings


def runs_needed(percentile: float) -> int:
    """Runs for a percentile to rest on at least one run beyond it: p99 needs 100, p95 20, p90 10."""
    return math.ceil(100 / (100 - percentile))


# ---------------------------------------------------------------------------------------------- output


def _stdout_console():
    from rich.console import Console

    console = Console()
    # Piped into a file, rich assumes 80 columns and would squeeze eleven columns into unreadable wraps.
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    return console


TABLE_COLUMNS = ("artifact", "batch", "runs", "min", "median", "mean", "p90", "p95", "p99", "qps", "samples/s",
                 "speedup")
LATENCY_COLUMNS = ("min", "median", "mean", "p90", "p95", "p99")
# Device columns (median of each device field), shown only when some entry has that field; placed after p99.
DEVICE_COLUMNS = {"gpu_compute_ms": "gpu", "h2d_ms": "h2d", "d2h_ms": "d2h"}
MISSING_CELL = "-"
SIGNIFICANT_DIGITS = 3  # a column's smallest value keeps this many; every cell of the column has its decimals


def table_columns(results: dict) -> tuple[str, ...]:
    """The table's columns: the host ones always, plus a device column per field any entry reports.

    A mixed run (ONNX Runtime next to TensorRT) shows the device columns, with MISSING_CELL in ORT rows.
    """
    present = [column for name, column in DEVICE_COLUMNS.items()
               if any(name in entry for entry in results["results"])]
    split = TABLE_COLUMNS.index("p99") + 1
    return TABLE_COLUMNS[:split] + tuple(present) + TABLE_COLUMNS[split:]


def cell_value(entry: dict, column: str) -> float | None:
    """The number behind a numeric cell (None where not measured)."""
    field_by_column = {column: name for name, column in DEVICE_COLUMNS.items()}
    if column in LATENCY_COLUMNS:
        return entry["latency_ms"][column]
    if column in field_by_column:
        stats = entry.get(field_by_column[column])
        return stats["median"] if stats else None
    if column == "qps":
        return entry["throughput_qps"]
    if column == "samples/s":
        return entry["throughput_samples_per_s"]
    raise ValueError(f"unknown table column {column!r}")


def column_decimals(values: Sequence[float | None]) -> int:
    """One format per column: enough decimals for its smallest value to keep SIGNIFICANT_DIGITS (0 to 4)."""
    finite = [abs(v) for v in values if v is not None and math.isfinite(v) and v != 0]
    if not finite:
        return 2
    return max(0, min(4, SIGNIFICANT_DIGITS - 1 - math.floor(math.log10(min(finite)))))


def column_formats(entries: Sequence[dict], columns: Sequence[str]) -> dict[str, int]:
    numeric = [c for c in columns if c not in ("artifact", "batch", "runs", "speedup")]
    return {c: column_decimals([cell_value(e, c) for e in entries]) for c in numeric}


def table_row(entry: dict, columns: Sequence[str], decimals: dict[str, int] | None = None) -> list[str]:
    """The cells of one result entry under `columns` (see table_columns), numbers at the column's `decimals`."""
    decimals = decimals if decimals is not None else column_formats([entry], columns)
    cells = []
    for column in columns:
        if column == "artifact":
            cells.append(entry["artifact"])
        elif column in ("batch", "runs"):
            cells.append(str(entry["batch"] if column == "batch" else entry["iters"]))
        elif column == "speedup":
            cells.append(f"{entry['speedup']:.2f}x")
        else:
            value = cell_value(entry, column)
            cells.append(MISSING_CELL if value is None else f"{value:.{decimals[column]}f}")
    return cells


def table_caption(columns: Sequence[str], settings: dict | None = None) -> str:
    caption = "speedup = first artifact's median / median, same batch"
    device = [c for c in columns if c in DEVICE_COLUMNS.values()]
    if device:
        caption += (f"; {'/'.join(device)} = median device time (CUDA events, TensorRT engines; "
                    f"{MISSING_CELL} = not measured)")
    if settings:
        caption += f"\nruns = timed runs per artifact, after {warmup_text(settings)}; qps = runs / wall-clock they took"
    return caption


def warmup_text(settings: dict) -> str:
    if settings.get("warmup_ms") is not None:
        return f"{settings['warmup_ms']:g} ms of warm-up"
    runs = settings.get("warmup", 0)
    return f"{runs} warm-up run{'s' if runs != 1 else ''}"


def results_table(results: dict, compact: bool = False):
    """The results as a rich Table; compact drops the borders and padding so it fits an 80-column terminal."""
    from rich import box
    from rich.table import Table

    style = dict(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0)) if compact else {}
    columns = table_columns(results)
    decimals = column_formats(results["results"], columns)
    table = Table(title="latency in ms (interleaved runs)", caption=table_caption(columns, results.get("settings")),
                  **style)
    table.add_column(columns[0], overflow="fold")
    for name in columns[1:]:
        table.add_column(name, justify="right", no_wrap=True)
    for entry in results["results"]:
        table.add_row(*table_row(entry, columns, decimals))
    return table


def print_table(results: dict) -> None:
    console = _stdout_console()
    table = results_table(results)
    # Twelve columns overflow a narrow terminal, and rich would then cut every number short: go compact first.
    natural_width = console.measure(table, options=console.options.update_width(10_000)).maximum
    if natural_width > console.width:
        table = results_table(results, compact=True)
    console.print(table)


def summary_lines(results: dict) -> list[str]:
    """The closing lines: each artifact against the first, naming both, at every batch size."""
    artifacts = results.get("artifacts") or []
    path_of = {a["label"]: a.get("path", a["label"]) for a in artifacts}
    entries = results["results"]
    labels = list(dict.fromkeys(e["artifact"] for e in entries))
    if len(labels) < 2:
        return []
    base = labels[0]
    lines = []
    for label in labels[1:]:
        speedups = ", ".join(f"{e['speedup']:.2f}x at batch {e['batch']}" for e in entries if e["artifact"] == label)
        lines.append(f"{label} ({path_of.get(label, label)}) vs {base} ({path_of.get(base, base)}): {speedups} "
                     "(median latency)")
    return lines


def print_warnings(results: dict) -> None:
    import sys

    for text in results.get("warnings", []):
        print(f"warning: {text}", file=sys.stderr)


def write_json(results: dict, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")


def plot_caption(results: dict) -> str:
    """Machine and settings, so a printed plot says what it measured."""
    env, settings = results.get("environment") or {}, results.get("settings") or {}
    machine = ", ".join(filter(None, [env.get("processor"), f"{env['usable_cpus']} usable CPUs"
                                      if env.get("usable_cpus") else None, env.get("platform")]))
    if settings.get("duration_s") is not None:
        amount = f"{settings['duration_s']:g} s per batch size"
    else:
        amount = f"{settings.get('iters', '?')} timed runs per artifact"
    threads = settings.get("threads") or "ONNX Runtime default"
    lines = [machine or "machine not recorded",
             f"onnxruntime {env.get('onnxruntime_version', '?')}, threads {threads}, {amount} after "
             f"{warmup_text(settings)}, interleaved; bars: median, whisker to p90; label: speedup vs the first",
             f"{results.get('tool', 'tcexport')}, {env.get('timestamp', '')}"]
    return "\n".join(lines)


def write_plot(results: dict, path: str | Path) -> None:
    """One panel per batch size (latencies differ by orders of magnitude between them): a bar per artifact at
    its median, a whisker up to p90, its speedup written on the bar, machine and settings in the caption."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UsageError(f"{path}: the plot is written as PNG; give a path ending in .png")
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and no GUI backend picked up from the environment
    import matplotlib.pyplot as plt

    entries = results["results"]
    labels = list(dict.fromkeys(e["artifact"] for e in entries))
    batches = list(dict.fromkeys(e["batch"] for e in entries))
    by_key = {(e["artifact"], e["batch"]): e for e in entries}
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(labels))]
    width = max(6.0, 1.2 + len(batches) * (0.9 + 0.75 * len(labels)))
    fig, axes = plt.subplots(1, len(batches), figsize=(width, 5.2), squeeze=False)
    try:
        for ax, batch in zip(axes[0], batches):
            shown = [label for label in labels if (label, batch) in by_key]
            medians = [by_key[(label, batch)]["latency_ms"]["median"] for label in shown]
            above = [max(by_key[(label, batch)]["latency_ms"]["p90"] - m, 0.0) for label, m in zip(shown, medians)]
            x = np.arange(len(shown))
            bars = ax.bar(x, medians, 0.7, color=[colors[labels.index(label)] for label in shown],
                          yerr=[np.zeros(len(shown)), above], capsize=4, edgecolor="black", linewidth=0.6)
            for bar, label in zip(bars, shown):
                speedup = by_key[(label, batch)]["speedup"]
                ax.annotate(f"{speedup:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height() / 2),
                            ha="center", va="center", fontsize=12, fontweight="bold", color="white",
                            bbox=dict(boxstyle="round,pad=0.2", facecolor="black", alpha=0.55, linewidth=0))
            ax.set_xticks(x)
            ax.set_xticklabels(shown, rotation=20 if max(map(len, shown)) > 10 else 0, ha="right"
                               if max(map(len, shown)) > 10 else "center", fontsize=11)
            ax.set_title(f"batch {batch}", fontsize=13)
            ax.set_ylim(0, max(m + a for m, a in zip(medians, above)) * 1.12)
            ax.tick_params(axis="y", labelsize=10)
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set_ylabel("latency (ms)", fontsize=12)
        fig.suptitle("tcexport bench: median latency per batch size", fontsize=14)
        import textwrap

        caption = plot_caption(results).splitlines()
        caption = [wrapped for line in caption for wrapped in textwrap.wrap(line, int(width * 13))]  # 8.5 pt mono
        fig.text(0.01, 0.01, "\n".join(caption), fontsize=8.5, ha="left", va="bottom", family="monospace")
        fig.tight_layout(rect=(0, 0.035 * len(caption) + 0.02, 1, 0.95))
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=150)  # tmp ends in .tmp, so the format must be explicit
    finally:
        plt.close(fig)
