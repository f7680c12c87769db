"""Running TensorRT engines: whether one fits here, and TrtRunner.

- plain decision functions, testable without TensorRT or a GPU: whether an engine fits this TensorRT and GPU
  (engine_mismatch), whether a batch fits its profile (check_batch_in_profile), which device times a runner
  reports (device_fields, TRTEXEC_FIELDS) and the CUDA graph note;
- TrtRunner, a thin wrapper over the TensorRT Python API (deserialize, set_input_shape / set_tensor_address /
  execute_async_v3 on torch CUDA tensors, CUDA-event timing of compute and optional H2D/D2H copies, optional
  CUDA graph replay), with its CUDA work in TorchCuda. TrtRunner is the bench Runner for engine directories and
  what `tcexport validate` runs an engine through; open_engine_runner opens one for a build directory, with the
  plugins it was built with (trt_plugins.py) loaded before deserializing.

Without the tensorrt package, an NVIDIA GPU or PyTorch with CUDA, they raise UsageError with one line saying what
is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tcexport.backends import trt_device, trt_plugins
from tcexport.backends.trt_device import DeviceInfo
from tcexport.backends.trt_versions import parse_version
from tcexport.core.errors import UsageError

# TensorRT DataType member names -> torch dtype names.
_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}

# What a TrtRunner measures per run with CUDA events on its stream, and the trtexec figure each one matches.
# gpu_compute_ms brackets execute_async_v3 (or the CUDA graph replaying it); h2d_ms/d2h_ms bracket the input and
# output copies between pinned host buffers and the engine's device buffers, measured only with include_copies.
TRTEXEC_FIELDS = {"h2d_ms": "H2D Latency", "gpu_compute_ms": "GPU Compute Time", "d2h_ms": "D2H Latency"}


def device_fields(include_copies: bool) -> tuple[str, ...]:
    """The device-time fields a TrtRunner reports per run: compute only, or copies and compute."""
    return ("h2d_ms", "gpu_compute_ms", "d2h_ms") if include_copies else ("gpu_compute_ms",)


def engine_mismatch(sidecar: dict, tensorrt_version: str, device: DeviceInfo) -> str | None:
    """Why an engine cannot run here (None when it can), from what its sidecar records.

    A serialized engine only loads in the TensorRT version that built it and runs on GPUs of the compute
    capability it was built for (tcexport builds neither version- nor hardware-compatible engines). Checking the
    sidecar first turns TensorRT's deserialization error log into one line that says what differs.
    """
    problems = []
    built_version = sidecar.get("tensorrt_version")
    if built_version:
        try:
            same = parse_version(built_version) == parse_version(tensorrt_version)
        except UsageError:
            same = str(built_version) == str(tensorrt_version)
        if not same:
            problems.append(f"TensorRT {built_version} (this machine has {tensorrt_version})")
    built_cc = sidecar.get("compute_capability")
    here_cc = f"{device.compute_capability[0]}.{device.compute_capability[1]}"
    if built_cc and str(built_cc) != here_cc:
        built_gpu = sidecar.get("gpu_name") or "another GPU"
        problems.append(f"compute capability {built_cc} ({built_gpu}; this {device.name} is {here_cc})")
    if not problems:
        return None
    return ("built with " + " and ".join(problems) + "; engines only run where they were built: rebuild it here "
            "with 'tcexport build --backend trt'")


def check_batch_in_profile(profile: dict | None, batch: int, label: str) -> None:
    """UsageError when `batch` lies outside the engine's optimization profile (min..max of axis 0)."""
    for name, shape in (profile or {}).items():
        low, high = (shape.get("min") or [None])[0], (shape.get("max") or [None])[0]
        if low is None or high is None:
            continue
        if not low <= batch <= high:
            which = f"batch {low}" if low == high else f"batches {low} to {high}"
            raise UsageError(f"{label}: batch {batch} is outside the engine's optimization profile (input '{name}' "
                             f"takes {which}); use a batch in that range or rebuild with "
                             "'tcexport build --backend trt --batch MIN,OPT,MAX'")


def cuda_graph_note(requested: bool, captured: bool, error: str | None = None) -> str:
    """One phrase for reports: whether runs replay a CUDA graph, and why not when one was asked for."""
    if not requested:
        return "off"
    if captured:
        return "on (execute_async_v3 captured once per input shape, replayed every run)"
    reason = " ".join(str(error or "unknown error").split())[:200]
    return f"unsupported for this engine, timed without it (capture failed: {reason})"


def require_engine_runtime(path: str | Path) -> tuple[Any, DeviceInfo]:
    """tensorrt and a GPU to run the engine at `path`, or one UsageError line naming what is missing."""
    try:
        trt = trt_device.require_tensorrt()
        device = trt_device.require_gpu(purpose="run")
    except UsageError as exc:
        raise UsageError(f"{path}: running a TensorRT engine needs the tensorrt package and an NVIDIA GPU: "
                         f"{exc}") from None
    return trt, device


def open_engine_runner(artifact, label: str | None = None, *, include_copies: bool = False,
                       cuda_graph: bool = False) -> "TrtRunner":
    """A TrtRunner for a build directory whose sidecar says backend "trt" (a tcexport.core.artifacts.Artifact)."""
    trt, device = require_engine_runtime(artifact.path)
    problem = engine_mismatch(artifact.sidecar, trt.__version__, device)
    if problem:
        raise UsageError(f"{artifact.path}: {problem}")
    plugins = trt_plugins.from_sidecar(artifact.sidecar)
    return TrtRunner(artifact.model_path, device.index, name=label or artifact.label, include_copies=include_copies,
                     cuda_graph=cuda_graph, plugins=plugins)


class TorchCuda:
    """The CUDA work TrtRunner needs, done through PyTorch: one stream, device and pinned host tensors, async
    copies on that stream, timing events, and CUDA graph capture/replay. Tensors are torch tensors; dtypes are
    given by torch dtype name ("float32", "int64", ...)."""

    def __init__(self, device_index: int = 0):
        try:
            import torch
        except ImportError:
            raise UsageError("running TensorRT engines needs PyTorch with CUDA; " + trt_device.INSTALL_HINT) from None
        if not torch.cuda.is_available():
            raise UsageError("running TensorRT engines needs PyTorch with CUDA (torch.cuda.is_available() is False); "
                             "on Jetson install NVIDIA's PyTorch wheel for your JetPack")
        self.torch = torch
        self.device = torch.device("cuda", device_index)
        self.stream = torch.cuda.Stream(self.device)

    @property
    def stream_handle(self) -> int:
        return self.stream.cuda_stream

    def _as_tensor(self, value):
        torch = self.torch
        if isinstance(value, torch.Tensor):
            return value
        import numpy as np

        return torch.from_numpy(np.ascontiguousarray(value))

    def to_device(self, value, dtype: str):
        """A device copy of `value` (numpy array or tensor) as `dtype`, made on the current (default) stream."""
        return self._as_tensor(value).to(self.device, getattr(self.torch, dtype)).contiguous()

    def empty(self, shape, dtype: str):
        return self.torch.empty(tuple(shape), dtype=getattr(self.torch, dtype), device=self.device)

    def pinned(self, value, dtype: str):
        """A page-locked host copy of `value`: the source of timed H2D copies (as trtexec's host buffers)."""
        return self._as_tensor(value).to(getattr(self.torch, dtype)).contiguous().pin_memory()

    def pinned_empty(self, shape, dtype: str):
        return self.torch.empty(tuple(shape), dtype=getattr(self.torch, dtype), pin_memory=True)

    @staticmethod
    def address(tensor) -> int:
        return tensor.data_ptr()

    def after_uploads(self) -> None:
        """Make the runner's stream wait for work queued on the default stream (to_device's copies)."""
        self.stream.wait_stream(self.torch.cuda.current_stream(self.device))

    def copy_async(self, dst, src) -> None:
        with self.torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def record(self, event) -> None:
        event.record(self.stream)

    @staticmethod
    def elapsed_ms(start, end) -> float:
        return float(start.elapsed_time(end))

    def synchronize(self) -> None:
        self.stream.synchronize()

    def capture(self, launch: Callable[[], None]):
        """Capture what launch() enqueues on the stream into a CUDA graph (thread-local mode, as trtexec does)."""
        graph = self.torch.cuda.CUDAGraph()
        with self.torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
            launch()
        return graph

    def replay(self, graph) -> None:
        with self.torch.cuda.stream(self.stream):  # CUDAGraph.replay launches on the current stream
            graph.replay()

    def to_numpy(self, tensor):
        if tensor.dtype == self.torch.bfloat16:
            tensor = tensor.float()
        return tensor.cpu().numpy()


class TrtRunner:
    """Run a serialized engine: feeds in, outputs out, and per-run device timing with CUDA events.

    It is a tcexport.bench.timing Runner (name, run(feeds)) that also reports device times: run() records events on its
    stream around execute_async_v3 (gpu_compute_ms) and, with include_copies, around the H2D copies of the inputs
    from pinned host buffers and the D2H copies of the outputs back (h2d_ms, d2h_ms), then waits for the stream, so
    the host wall time the bench measures around run() covers the same work. pop_device_times() hands over what
    was recorded since the last call. With cuda_graph, stage() captures execute_async_v3 once per input shape and
    run() replays the graph; an engine that cannot be captured is timed without one (see cuda_graph_note).

    CUDA work goes through `cuda` (default TorchCuda), so the control flow here runs with a fake one in tests.
    """

    def __init__(self, engine_path: str | Path, device_index: int = 0, *, name: str | None = None,
                 include_copies: bool = False, cuda_graph: bool = False, cuda: Any = None, plugins: Any = None):
        trt = trt_device.require_tensorrt()
        self.cuda = cuda if cuda is not None else TorchCuda(device_index)
        self._trt = trt
        self.name = name or Path(engine_path).parent.name or str(engine_path)
        self.include_copies = bool(include_copies)
        self.cuda_graph_requested = bool(cuda_graph)
        self.device_fields = device_fields(self.include_copies)
        self.cuda_graph_used = False
        self.cuda_graph_note = cuda_graph_note(self.cuda_graph_requested, False, "no input staged yet")
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        if plugins is not None:  # the plugins the engine was built with, before deserializing it
            trt_plugins.load(plugins, trt)
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise UsageError(f"{engine_path}: TensorRT could not deserialize it (built with another TensorRT "
                             "version or GPU?); rebuild it with 'tcexport build --backend trt' on this device")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._inputs: dict[str, Any] = {}
        self._outputs: dict[str, Any] = {}
        self._host_inputs: dict[str, Any] = {}
        self._host_outputs: dict[str, Any] = {}
        self._staged: dict | None = None
        self._graph = None
        self._events: list = []
        self._device_times: dict[str, list[float]] = {field: [] for field in self.device_fields}

    def _dtype_name(self, name: str) -> str:
        trt_name = getattr(self.engine.get_tensor_dtype(name), "name", "FLOAT")
        if trt_name not in _TORCH_DTYPES:
            raise UsageError(f"engine tensor '{name}' has type {trt_name}, which TrtRunner cannot hold in torch")
        return _TORCH_DTYPES[trt_name]

    def bind(self, feeds: dict[str, Any]) -> None:
        """Copy feeds (numpy arrays or torch tensors) to the GPU, set shapes, allocate outputs."""
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise UsageError(f"missing inputs for the engine: {', '.join(sorted(missing))}")
        self._staged, self._graph = None, None  # new addresses and shapes: a captured graph no longer applies
        self._inputs = {}
        for name in self.input_names:
            tensor = self.cuda.to_device(feeds[name], self._dtype_name(name))
            self._inputs[name] = tensor
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise UsageError(f"input '{name}' shape {tuple(tensor.shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, self.cuda.address(tensor))
        self._outputs = {}
        for name in self.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise UsageError(f"engine output '{name}' has a data-dependent shape {shape}; TrtRunner needs output "
                                 "shapes that follow from the input shapes")
            tensor = self.cuda.empty(shape, self._dtype_name(name))
            self._outputs[name] = tensor
            self.context.set_tensor_address(name, self.cuda.address(tensor))
        self.cuda.after_uploads()

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.cuda.stream_handle):
            raise UsageError("TensorRT execution failed (see the TensorRT log)")

    def stage(self, feeds: dict[str, Any]) -> None:
        """Prepare timed runs on `feeds`, outside any timed region: bind, pinned host buffers (include_copies),
        one untimed execution (TensorRT applies new input shapes on the first enqueue after them, which must not
        happen during a capture), and the CUDA graph (cuda_graph)."""
        self.bind(feeds)
        self._host_inputs, self._host_outputs = {}, {}
        if self.include_copies:
            self._host_inputs = {name: self.cuda.pinned(feeds[name], self._dtype_name(name))
                                 for name in self.input_names}
            self._host_outputs = {name: self.cuda.pinned_empty(tuple(tensor.shape), self._dtype_name(name))
                                  for name, tensor in self._outputs.items()}
        self._events = [self.cuda.event() for _ in range(4)]
        self.execute()
        self.cuda.synchronize()
        self._graph, error = None, None
        if self.cuda_graph_requested:
            try:
                graph = self.cuda.capture(self.execute)
                self.cuda.replay(graph)  # a graph that captured but cannot launch counts as unsupported too
                self.cuda.synchronize()
                self._graph = graph
            except Exception as exc:  # noqa: BLE001 - CUDA and TensorRT raise several types; all mean "no graph"
                error = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        self.cuda_graph_used = self._graph is not None
        self.cuda_graph_note = cuda_graph_note(self.cuda_graph_requested, self.cuda_graph_used, error)
        self._staged = feeds

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """One timed inference on `feeds` (staged on first use); returns the output buffers (host ones with
        include_copies, device ones otherwise)."""
        if feeds is not self._staged:
            self.stage(feeds)
        cuda, events = self.cuda, self._events
        if self.include_copies:
            cuda.record(events[0])
            for name, host in self._host_inputs.items():
                cuda.copy_async(self._inputs[name], host)
        cuda.record(events[1])
        if self._graph is not None:
            cuda.replay(self._graph)
        else:
            self.execute()
        cuda.record(events[2])
        if self.include_copies:
            for name, host in self._host_outputs.items():
                cuda.copy_async(host, self._outputs[name])
            cuda.record(events[3])
        cuda.synchronize()
        times = self._device_times
        times["gpu_compute_ms"].append(cuda.elapsed_ms(events[1], events[2]))
        if self.include_copies:
            times["h2d_ms"].append(cuda.elapsed_ms(events[0], events[1]))
            times["d2h_ms"].append(cuda.elapsed_ms(events[2], events[3]))
        return self._host_outputs if self.include_copies else self._outputs

    def pop_device_times(self) -> dict[str, list[float]]:
        """Device times (ms) of the runs since the last call, one list per field in device_fields."""
        times = {field: list(values) for field, values in self._device_times.items()}
        for values in self._device_times.values():
            values.clear()
        return times

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run once, untimed and without a graph; return outputs as numpy arrays (bfloat16 read as float32)."""
        self.bind(feeds)
        self.execute()
        self.cuda.synchronize()
        return {name: self.cuda.to_numpy(tensor) for name, tensor in self._outputs.items()}

    def run_on_device(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run once, untimed; return the output buffers on the GPU (a generation loop feeds present* back)."""
        self.bind(feeds)
        self.execute()
        self.cuda.synchronize()
        return dict(self._outputs)

    def time_ms(self, feeds: dict[str, Any], warmup: int = 10, iters: int = 50) -> list[float]:
        """Per-run GPU compute time in ms, from CUDA events around each execute_async_v3."""
        self.stage(feeds)
        for _ in range(warmup):
            self.run(feeds)
        self.pop_device_times()
        for _ in range(iters):
            self.run(feeds)
        return self.pop_device_times()["gpu_compute_ms"]


__all__ = [
    "check_batch_in_profile", "cuda_graph_note", "device_fields", "engine_mismatch", "open_engine_runner",
    "require_engine_runtime", "TorchCuda", "TrtRunner", "TRTEXEC_FIELDS",
]
