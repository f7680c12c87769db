"""Benchmark artifacts side by side: interleaved timed runs, trtexec-style latency statistics, table, JSON, plot.

Every artifact (an .onnx file or a build directory) gets a Runner. For each batch size the runners are warmed
up, then timed in rounds: one run of each artifact per round, in an order that rotates every round, so machine
drift (thermal throttling, a noisy neighbour) lands on all artifacts alike and none always runs first.

Results are plain dicts and lists, ready for json.dumps:

    {"tool", "environment": {...}, "settings": {...},
     "artifacts": [{"label", "path", "model_path", "backend", "provider", "opt_level", "threads", ...}],
     "results": [{"artifact", "batch", "iters", "latency_ms": {min, max, mean, median, p90, p95, p99, std},
                  "throughput_qps", "throughput_samples_per_s", "speedup",
                  ["gpu_compute_ms", "h2d_ms", "d2h_ms"]: {same statistics}}]}

latency_ms is host wall time around each run, for every backend (an engine run waits for its stream, so it
covers the same work as a synchronous ONNX Runtime run); speedup is the median latency of the first artifact at
the same batch size divided by this one's median, and throughput comes from the mean of latency_ms.

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

import contextlib
import datetime
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from tcexport import __version__, inputs, onnxfile
from tcexport.artifacts import Artifact, resolve
from tcexport.atomic import atomic_file
from tcexport.errors import UsageError

DEFAULT_ITERS = 50
MIN_ROUNDS_WITH_DURATION = 3  # a duration budget still yields a few samples per artifact, even for slow models
PROGRESS_MIN_RUNS = 200  # below this a run is over too quickly for a progress bar to help
PROGRESS_MIN_SECONDS = 2.0  # the same threshold for --duration budgets
PROGRESS_REFRESH_S = 0.25  # redraw the bar at most this often
PERCENTILES = {"p90": 90, "p95": 95, "p99": 99}


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

    options = ort_backend.session_options(threads, opt_level)
    # Idle ORT worker threads spin for a while after each run; with sessions interleaved, one artifact's spinning
    # pool would steal cores from the next artifact's run. Sleeping pools make the comparison fair.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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


def time_interleaved(runners: Sequence[Runner], feeds: Sequence[dict], warmup: int, iters: int | None = None,
                     duration: float | None = None,
                     on_round: Callable[[int], None] | None = None) -> list[list[int]]:
    """Latencies in ns, one list per runner. Stops after `iters` rounds, or once `duration` seconds of rounds
    (after warm-up) have passed and at least MIN_ROUNDS_WITH_DURATION rounds are done. on_round(runs) is called
    after every round, outside the timed region."""
    if iters is None and duration is None:
        iters = DEFAULT_ITERS
    for runner, feed in zip(runners, feeds):
        stage = getattr(runner, "stage", None)
        if stage is not None:
            stage(feed)
        for _ in range(warmup):
            runner.run(feed)
        pop_device_times(runner)  # warm-up runs are not samples
    latencies_ns: list[list[int]] = [[] for _ in runners]
    deadline_ns = None if duration is None else time.perf_counter_ns() + int(duration * 1e9)
    round_index = 0
    while True:
        if deadline_ns is None:
            if round_index >= iters:
                break
        elif round_index >= MIN_ROUNDS_WITH_DURATION and time.perf_counter_ns() >= deadline_ns:
            break
        for i in round_order(len(runners), round_index):
            runner, feed = runners[i], feeds[i]
            start = time.perf_counter_ns()
            runner.run(feed)
            latencies_ns[i].append(time.perf_counter_ns() - start)
        round_index += 1
        if on_round is not None:
            on_round(len(runners))
    return latencies_ns


@contextlib.contextmanager
def progress_bar(total: float, show: bool, description: str = "timing runs") -> Iterator[Callable[[float], None]]:
    """Yield advance(amount). A rich bar on stderr when `show` and stderr is a terminal; a no-op otherwise."""
    if not show:
        yield lambda amount: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    # disable= on a non-terminal: no control codes in a log file. transient: the table that follows is not pushed
    # down by a finished bar. auto_refresh=False: no render thread competing with a timed run for the GIL; the
    # bar is redrawn from advance(), which the timing loop calls between rounds.
    with Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                  console=console, transient=True, auto_refresh=False, disable=not console.is_terminal,
                  redirect_stdout=False, redirect_stderr=False) as progress:
        task = progress.add_task(description, total=total)
        last_refresh = [0.0]

        def advance(amount: float) -> None:
            progress.advance(task, amount)
            now = time.monotonic()
            if now - last_refresh[0] >= PROGRESS_REFRESH_S:
                progress.refresh()
                last_refresh[0] = now

        yield advance


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


def summarize(label: str, batch: int, latencies_ns: Sequence[int],
              device_times: dict[str, Sequence[float]] | None = None) -> dict:
    """One result entry (speedup is filled in by add_speedups once every artifact at this batch is known).

    device_times ({field: [ms per run]}) adds device statistics for runners that measure them.
    """
    if not latencies_ns:
        raise ValueError(f"{label}: no timed runs at batch {batch}")
    latency_ms = latency_stats(np.asarray(latencies_ns, dtype=np.float64) / 1e6)
    runs_per_s = 1000.0 / latency_ms["mean"] if latency_ms["mean"] > 0 else float("inf")
    entry = {
        "artifact": label,
        "batch": batch,
        "iters": len(latencies_ns),
        "latency_ms": latency_ms,
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


def run(paths: Sequence[str | Path], batches: Sequence[int] = (1,), threads: int | None = None, warmup: int = 10,
        iters: int | None = None, duration: float | None = None, include_copies: bool = False,
        cuda_graph: bool = False) -> dict:
    """Time every artifact at every batch size, interleaved; return the results structure (see module doc).

    include_copies / cuda_graph apply to TensorRT engines: time H2D/D2H copies every run, replay a CUDA graph.
    """
    if iters is not None and duration is not None:
        raise UsageError("give iters or duration, not both")
    if iters is not None and iters < 1:
        raise UsageError(f"iters must be at least 1, got {iters}")
    if duration is not None and duration <= 0:
        raise UsageError(f"duration must be positive, got {duration}")
    if warmup < 0:
        raise UsageError(f"warmup must be 0 or more, got {warmup}")
    batches = list(dict.fromkeys(batches))  # a repeated batch size would only repeat rows
    if not batches or any(b < 1 for b in batches):
        raise UsageError(f"batch sizes must be positive integers, got {batches}")
    if not paths:
        raise UsageError("no artifacts to bench; pass .onnx files or build directories")
    if iters is None and duration is None:
        iters = DEFAULT_ITERS

    # Resolve every path before loading anything, so a typo in the last one fails at once.
    artifacts = [resolve(p) for p in paths]
    check_engine_options(artifacts, include_copies, cuda_graph)
    labels = unique_labels(artifacts)
    prepared = [prepare(a, label, threads, include_copies, cuda_graph) for a, label in zip(artifacts, labels)]
    runners = [p.runner for p in prepared]

    if duration is None:
        progress_total = iters * len(prepared) * len(batches)  # timed runs
        show_progress = progress_total > PROGRESS_MIN_RUNS
    else:
        progress_total = duration * len(batches)  # seconds of budget
        show_progress = progress_total >= PROGRESS_MIN_SECONDS

    entries = []
    with progress_bar(progress_total, show_progress) as advance:
        for batch in batches:
            # Feeds are made once per (artifact, batch), outside the timed region; artifacts may differ in inputs.
            feeds = [feeds_for_batch(p, batch) for p in prepared]
            if duration is None:
                on_round = advance
            else:
                round_start = [time.perf_counter()]

                def on_round(_runs, start=round_start):  # a duration bar advances in seconds, not runs
                    now = time.perf_counter()
                    advance(min(now - start[0], duration))
                    start[0] = now
            latencies = time_interleaved(runners, feeds, warmup, iters=iters, duration=duration, on_round=on_round)
            entries.extend(summarize(p.label, batch, lat, pop_device_times(p.runner))
                           for p, lat in zip(prepared, latencies))
    add_speedups(entries)

    settings = {"batches": batches, "warmup": warmup, "iters": iters, "duration_s": duration,
                "threads": threads, "interleaved": True, "ort_intra_op_spinning": False}
    if any(p.artifact.backend == "trt" for p in prepared):
        settings.update(include_copies=include_copies, cuda_graph=cuda_graph,
                        device_timing="CUDA events on the engine's stream, one sample per timed run")
    return {
        "tool": f"tcexport {__version__}",
        "environment": environment(threads),
        "settings": settings,
        "artifacts": [artifact_entry(p, threads) for p in prepared],
        "results": entries,
    }


# ---------------------------------------------------------------------------------------------- output


def _stdout_console():
    from rich.console import Console

    console = Console()
    # Piped into a file, rich assumes 80 columns and would squeeze eleven columns into unreadable wraps.
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=160)
    return console


def _fmt_ms(value: float) -> str:
    # Tiny models run in microseconds: keep a fourth decimal below 1 ms so they do not all read 0.005.
    if value < 1:
        return f"{value:.4f}"
    return f"{value:.3f}" if value < 1000 else f"{value:,.0f}"


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}"


TABLE_COLUMNS = ("artifact", "batch", "min", "median", "mean", "p90", "p95", "p99", "qps", "samples/s", "speedup")
# Device columns (median of each device field), shown only when some entry has that field; placed after p99.
DEVICE_COLUMNS = {"gpu_compute_ms": "gpu", "h2d_ms": "h2d", "d2h_ms": "d2h"}
MISSING_CELL = "-"


def table_columns(results: dict) -> tuple[str, ...]:
    """The table's columns: the host ones always, plus a device column per field any entry reports.

    A mixed run (ONNX Runtime next to TensorRT) shows the device columns, with MISSING_CELL in ORT rows.
    """
    present = [column for name, column in DEVICE_COLUMNS.items()
               if any(name in entry for entry in results["results"])]
    split = TABLE_COLUMNS.index("p99") + 1
    return TABLE_COLUMNS[:split] + tuple(present) + TABLE_COLUMNS[split:]


def table_row(entry: dict, columns: Sequence[str]) -> list[str]:
    """The cells of one result entry under `columns` (see table_columns)."""
    latency = entry["latency_ms"]
    field_by_column = {column: name for name, column in DEVICE_COLUMNS.items()}
    cells = []
    for column in columns:
        if column == "artifact":
            cells.append(entry["artifact"])
        elif column == "batch":
            cells.append(str(entry["batch"]))
        elif column in ("min", "median", "mean", "p90", "p95", "p99"):
            cells.append(_fmt_ms(latency[column]))
        elif column in field_by_column:
            stats = entry.get(field_by_column[column])
            cells.append(_fmt_ms(stats["median"]) if stats else MISSING_CELL)
        elif column == "qps":
            cells.append(_fmt_rate(entry["throughput_qps"]))
        elif column == "samples/s":
            cells.append(_fmt_rate(entry["throughput_samples_per_s"]))
        elif column == "speedup":
            cells.append(f"{entry['speedup']:.2f}x")
        else:
            raise ValueError(f"unknown table column {column!r}")
    return cells


def table_caption(columns: Sequence[str]) -> str:
    caption = "speedup = first artifact's median / median, same batch"
    device = [c for c in columns if c in DEVICE_COLUMNS.values()]
    if device:
        caption += (f"; {'/'.join(device)} = median device time (CUDA events, TensorRT engines; "
                    f"{MISSING_CELL} = not measured)")
    return caption


def results_table(results: dict, compact: bool = False):
    """The results as a rich Table; compact drops the borders and padding so it fits an 80-column terminal."""
    from rich import box
    from rich.table import Table

    style = dict(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0)) if compact else {}
    columns = table_columns(results)
    table = Table(title="latency in ms (interleaved runs)", caption=table_caption(columns), **style)
    table.add_column(columns[0], overflow="fold")
    for name in columns[1:]:
        table.add_column(name, justify="right", no_wrap=True)
    for entry in results["results"]:
        table.add_row(*table_row(entry, columns))
    return table


def print_table(results: dict) -> None:
    console = _stdout_console()
    table = results_table(results)
    # Eleven columns overflow a narrow terminal, and rich would then cut every number short: go compact first.
    natural_width = console.measure(table, options=console.options.update_width(10_000)).maximum
    if natural_width > console.width:
        table = results_table(results, compact=True)
    console.print(table)


def write_json(results: dict, path: str | Path) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")


def write_plot(results: dict, path: str | Path) -> None:
    """A grouped bar chart: one group per batch size, one bar per artifact at its median, whisker up to p90."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UsageError(f"{path}: the plot is written as PNG; give a path ending in .png")
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and no GUI backend picked up from the environment
    import matplotlib.pyplot as plt

    entries = results["results"]
    labels = list(dict.fromkeys(e["artifact"] for e in entries))
    batches = list(dict.fromkeys(e["batch"] for e in entries))
    by_key = {(e["artifact"], e["batch"]): e["latency_ms"] for e in entries}
    group_x = np.arange(len(batches))
    bar_width = 0.8 / max(len(labels), 1)

    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.6 * len(batches) * len(labels)), 4.5))
    try:
        for i, label in enumerate(labels):
            medians = [by_key.get((label, b), {}).get("median", np.nan) for b in batches]
            p90_above = [max(by_key.get((label, b), {}).get("p90", np.nan) - m, 0.0) if not np.isnan(m) else 0.0
                         for m, b in zip(medians, batches)]
            offsets = group_x - 0.4 + bar_width * (i + 0.5)
            ax.bar(offsets, medians, bar_width, label=label,
                   yerr=[np.zeros(len(batches)), p90_above], capsize=3)
        ax.set_xticks(group_x)
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_ylabel("latency (ms): median, whisker to p90")
        ax.set_title("tcexport bench")
        ax.legend(fontsize="small")
        fig.tight_layout()
        with atomic_file(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120)  # tmp ends in .tmp, so the format must be explicit
    finally:
        plt.close(fig)
