"""TensorRT backend: the only module that imports tensorrt (lazily, inside functions).

Two layers:

- plain decision functions, testable without TensorRT or a GPU: version parsing and version switches
  (strong typing, builder flags, plugin features), optimization-profile shapes, workspace size, plugin node
  attributes, the BuildPlan that gathers every decision, and the sidecar JSON written next to an engine;
- thin wrappers over the TensorRT Python API: build_engine (Builder / OnnxParser / BuilderConfig / profile /
  timing cache / build_serialized_network, written atomically with its sidecar) and TrtRunner (deserialize,
  execute_async_v3 on torch CUDA tensors, CUDA-event timing).

Without the tensorrt package, or without an NVIDIA GPU, the wrappers raise UsageError with one line saying what
is missing, before anything is written.

Facts this encodes (see DESIGN.md §5): TensorRT 11 networks are strongly typed and the FP16/BF16/INT8 builder
flags are gone, so reduced precision there means converting the ONNX graph (tcexport.precision); TensorRT 10.x
still builds weakly typed networks with those flags. Python plugins ("quickly deployable plugins") need 10.6,
ahead-of-time plugins 10.9; the parser prefers a registered plugin over a model-local function of the same name
from 10.7 and reads the plugin namespace from the node's domain from 10.10.
"""

from __future__ import annotations

import ctypes
import json
import platform
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import onnx

from tcexport import __version__, inputs, metadata, onnxfile
from tcexport.artifacts import SIDECAR
from tcexport.errors import UsageError

ENGINE_FILE = "model.engine"
INSTALL_HINT = "pip install 'tcexport[trt]' on a machine with an NVIDIA GPU (on Jetson: JetPack's python3-libnvinfer)"
PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_DYNAMIC_BATCH = (1, 1, 8)


# --- versions ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}" + (f".{self.patch}" if self.patch else "")

    def at_least(self, major: int, minor: int = 0) -> bool:
        return (self.major, self.minor) >= (major, minor)


_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)*(?:[.+-]?[A-Za-z0-9.+-]*)?\s*$")


def parse_version(text: str | TrtVersion) -> TrtVersion:
    """'10.3' / '10.13.3' / '10.3.0.30' (tensorrt.__version__) -> TrtVersion. Only majors 10 and 11 are known."""
    if isinstance(text, TrtVersion):
        return text
    match = _VERSION_RE.match(str(text))
    if not match:
        raise UsageError(f"TensorRT version must look like 10.3 or 10.13.3, got '{text}'")
    version = TrtVersion(int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))
    if version.major not in (10, 11):
        raise UsageError(f"TensorRT {version} is outside what tcexport knows (10.x and 11.x); use one of those")
    return version


def uses_strong_typing(version: str | TrtVersion) -> bool:
    """TensorRT 11 builds strongly typed networks only; 10.x builds weakly typed ones by default."""
    return parse_version(version).major >= 11


def builder_flags(version: str | TrtVersion, precision: str) -> tuple[str, ...]:
    """Names of tensorrt.BuilderFlag members to set. 11.x: none (precision lives in the graph's types)."""
    _check_precision(precision)
    if uses_strong_typing(version) or precision == "fp32":
        return ()
    return ("FP16",) if precision == "fp16" else ("BF16",)


def converts_graph(version: str | TrtVersion, precision: str) -> bool:
    """Whether reduced precision needs the ONNX graph rewritten (tcexport.precision) before parsing."""
    return uses_strong_typing(version) and _check_precision(precision) != "fp32"


def supports_python_plugins(version: str | TrtVersion) -> bool:
    return parse_version(version).at_least(10, 6)


def supports_aot_plugins(version: str | TrtVersion) -> bool:
    return parse_version(version).at_least(10, 9)


def prefers_plugin_over_local_function(version: str | TrtVersion) -> bool:
    return parse_version(version).at_least(10, 7)


def reads_plugin_namespace_from_domain(version: str | TrtVersion) -> bool:
    return parse_version(version).at_least(10, 10)


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    return precision


# --- plugins -----------------------------------------------------------------------------------------------------


PLUGIN_DOMAIN = "tcexport"


@dataclass(frozen=True)
class PluginSpec:
    """A TensorRT plugin that stands in for a tcexport op (ONNX node op_type == name, domain == namespace)."""

    name: str
    namespace: str = PLUGIN_DOMAIN
    version: str = "1"
    description: str = ""


# tcexport's own plugins, by the (domain, op_type) their ONNX nodes carry. Methods that gain a plugin add theirs
# with register_plugin(); the lint checks custom-domain nodes against this table.
TCEXPORT_PLUGINS: dict[tuple[str, str], PluginSpec] = {}


def register_plugin(spec: PluginSpec) -> PluginSpec:
    TCEXPORT_PLUGINS[(spec.namespace, spec.name)] = spec
    return spec


for _spec in (
    PluginSpec("ToMeMerge", description="ToMe bipartite soft matching: merge r token pairs (size-weighted)"),
    PluginSpec("TokenPrune", description="keep the K tokens with the highest CLS attention (EViT)"),
    PluginSpec("TokenPool", description="average-pool the token grid"),
):
    register_plugin(_spec)


def plugin_node_attributes(spec: PluginSpec) -> dict[str, str]:
    """Attributes an ONNX node needs so TensorRT's parser maps it to `spec`'s plugin.

    The namespace goes in `plugin_namespace` as well as the node domain: before 10.10 the parser ignores the domain.
    """
    return {"plugin_namespace": spec.namespace, "plugin_version": spec.version}


# --- shapes and memory -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfileShape:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def to_json(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


def parse_batch_range(text: str | None) -> tuple[int, int, int] | None:
    """'1,1,8' -> (1, 1, 8); '4' -> (4, 4, 4); None -> None (choose from the model)."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        raise UsageError(f"--batch must be MIN,OPT,MAX (e.g. 1,1,8) or one size, got '{text}'") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or any(v < 1 for v in values) or not values[0] <= values[1] <= values[2]:
        raise UsageError(f"--batch must be MIN,OPT,MAX with 1 <= MIN <= OPT <= MAX, got '{text}'")
    return values  # type: ignore[return-value]


def profile_shapes(specs: Iterable[inputs.InputSpec],
                   batch_min_opt_max: tuple[int, int, int] | None = None) -> dict[str, ProfileShape]:
    """Min/opt/max shape per input: only a dynamic batch axis (axis 0) varies, every other axis is fixed.

    A model exported with a fixed batch gets that batch for min/opt/max; asking for another range is an error.
    """
    specs = list(specs)
    static_batches = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    dynamic = any(s.shape and not (isinstance(s.shape[0], int) and s.shape[0] > 0) for s in specs)
    if batch_min_opt_max is None:
        if dynamic:
            batch_min_opt_max = DEFAULT_DYNAMIC_BATCH
        else:
            fixed = static_batches.pop() if len(static_batches) == 1 else 1
            batch_min_opt_max = (fixed, fixed, fixed)
    low, opt, high = batch_min_opt_max
    shapes = {}
    for spec in specs:
        if not spec.shape:
            shapes[spec.name] = ProfileShape((), (), ())
            continue
        first = spec.shape[0]
        if isinstance(first, int) and first > 0 and (low, opt, high) != (first, first, first):
            raise UsageError(f"input '{spec.name}' has a fixed batch of {first}, so the profile cannot be "
                             f"{low},{opt},{high}; pass --batch {first} or re-export with a dynamic batch")
        shapes[spec.name] = ProfileShape(spec.concrete_shape(low), spec.concrete_shape(opt), spec.concrete_shape(high))
    return shapes


def workspace_bytes(megabytes: int | None) -> int | None:
    """--workspace MB -> bytes for the WORKSPACE memory pool; None keeps TensorRT's default (all device memory)."""
    if megabytes is None:
        return None
    if int(megabytes) <= 0:
        raise UsageError(f"--workspace must be a positive number of MB, got {megabytes}")
    return int(megabytes) * (1 << 20)


# --- the plan ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildPlan:
    """Everything decided before TensorRT is touched; build_engine only carries it out."""

    trt_version: TrtVersion
    precision: str
    strongly_typed: bool
    convert_graph: bool
    builder_flags: tuple[str, ...]
    profile: dict[str, ProfileShape]
    inputs: list[inputs.InputSpec]
    workspace_bytes: int | None = None
    timing_cache: Path | None = None

    def to_json(self) -> dict:
        return {
            "tensorrt_version": str(self.trt_version),
            "precision": self.precision,
            "precision_mode": ("graph types (strongly typed)" if self.convert_graph else
                               "builder flags" if self.builder_flags else "fp32"),
            "strongly_typed": self.strongly_typed,
            "builder_flags": list(self.builder_flags),
            "profile": {name: shape.to_json() for name, shape in self.profile.items()},
            "workspace_bytes": self.workspace_bytes,
            "timing_cache": str(self.timing_cache) if self.timing_cache else None,
        }


def make_plan(model: onnx.ModelProto | str | Path, trt_version: str | TrtVersion, precision: str = "fp32",
              batch: tuple[int, int, int] | str | None = None, workspace_mb: int | None = None,
              timing_cache: str | Path | None = None) -> BuildPlan:
    version = parse_version(trt_version)
    _check_precision(precision)
    if not isinstance(model, onnx.ModelProto):
        model = onnxfile.load(model, load_external_data=False)
    if isinstance(batch, str):
        batch = parse_batch_range(batch)
    specs = inputs.specs_from_graph(model)
    return BuildPlan(
        trt_version=version,
        precision=precision,
        strongly_typed=uses_strong_typing(version),
        convert_graph=converts_graph(version, precision),
        builder_flags=builder_flags(version, precision),
        profile=profile_shapes(specs, batch),
        inputs=specs,
        workspace_bytes=workspace_bytes(workspace_mb),
        timing_cache=Path(timing_cache) if timing_cache else None,
    )


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int | None = None
    index: int = 0

    def to_json(self) -> dict:
        data = asdict(self)
        data["compute_capability"] = f"{self.compute_capability[0]}.{self.compute_capability[1]}"
        return data


def check_device_precision(device: DeviceInfo, precision: str) -> None:
    """bf16 needs compute capability 8.0 (Ampere, Orin) or newer."""
    if precision == "bf16" and device.compute_capability < (8, 0):
        major, minor = device.compute_capability
        raise UsageError(f"{device.name} (compute capability {major}.{minor}) has no bf16 support; "
                         "use --precision fp16")


@dataclass
class TensorInfo:
    name: str
    shape: list  # -1 for a dynamic axis
    dtype: str

    def to_json(self) -> dict:
        return asdict(self)


def sidecar(plan: BuildPlan, *, device: DeviceInfo, tensorrt_version: str, engine_inputs: list[TensorInfo],
            engine_outputs: list[TensorInfo], source_model: str | Path, source_sha256: str,
            records: dict | None = None, engine_bytes: int | None = None, build_seconds: float | None = None,
            precision_report: dict | None = None) -> dict:
    """The tcexport-build.json written beside model.engine."""
    data: dict[str, Any] = {
        "tool": f"tcexport {__version__}",
        "backend": "trt",
        "model_file": ENGINE_FILE,
        "tensorrt_version": tensorrt_version,
        "onnx_version": onnx.__version__,
        "device": device.to_json(),
        "gpu_name": device.name,
        "compute_capability": device.to_json()["compute_capability"],
        "precision": plan.precision,
        "plan": plan.to_json(),
        "profile": {name: shape.to_json() for name, shape in plan.profile.items()},
        "inputs": [s.to_json() for s in plan.inputs],
        "engine_inputs": [t.to_json() for t in engine_inputs],
        "engine_outputs": [t.to_json() for t in engine_outputs],
        "outputs": [t.name for t in engine_outputs],
        "source_model": str(Path(source_model).resolve()),
        "source_sha256": source_sha256,
        "records": records or {},
        "host": {"machine": platform.machine(), "processor": platform.processor() or platform.machine()},
    }
    if engine_bytes is not None:
        data["engine_bytes"] = engine_bytes
    if build_seconds is not None:
        data["build_seconds"] = round(build_seconds, 3)
    if precision_report:
        data["precision_conversion"] = precision_report
    return data


# --- the thin TensorRT layer -------------------------------------------------------------------------------------


def require_tensorrt():
    """Import tensorrt, or raise UsageError naming what is missing and how to install it."""
    try:
        import tensorrt  # noqa: PLC0415

        return tensorrt
    except (ImportError, OSError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
    try:  # the bindings wheel alone (tensorrt-cuXX-bindings) names its module tensorrt_bindings
        import tensorrt_bindings  # noqa: PLC0415

        return tensorrt_bindings
    except ModuleNotFoundError:
        pass
    except (ImportError, OSError) as exc:  # bindings present, libraries (libnvinfer, libnvonnxparser) missing
        reason = " ".join(str(exc).split()) or type(exc).__name__
    raise UsageError(f"TensorRT is not available ({reason}); install it with {INSTALL_HINT}")


def require_gpu(index: int = 0) -> DeviceInfo:
    """The CUDA device TensorRT will build for, read through the CUDA driver API (no torch/cuda-python needed)."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        raise UsageError("no NVIDIA GPU driver found (libcuda.so.1 is missing); TensorRT builds engines on the GPU "
                         "that will run them: run 'tcexport build --backend trt' on that machine")
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
        raise UsageError(f"no usable NVIDIA GPU (the CUDA driver reports {count.value} device(s)); TensorRT builds "
                         "engines on the GPU that will run them: run 'tcexport build --backend trt' on that machine")
    device = ctypes.c_int(0)
    cuda.cuDeviceGet(ctypes.byref(device), index)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, device)
    major, minor, memory = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_size_t(0)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    total = getattr(cuda, "cuDeviceTotalMem_v2", None)
    if total is not None:
        total(ctypes.byref(memory), device)
    return DeviceInfo(name.value.decode(errors="replace"), (major.value, minor.value), memory.value or None, index)


def build(onnx_path: str | Path, out_dir: str | Path, precision: str = "fp32", batch: str | None = None,
          workspace_mb: int | None = None, timing_cache: str | Path | None = None) -> dict:
    """Check TensorRT and the GPU first, plan, then build. Returns the sidecar."""
    trt = require_tensorrt()
    device = require_gpu()
    check_device_precision(device, precision)
    plan = make_plan(onnx_path, trt.__version__, precision, batch, workspace_mb, timing_cache)
    return build_engine(onnx_path, out_dir, plan, device=device)


def build_engine(onnx_path: str | Path, out_dir: str | Path, plan: BuildPlan,
                 device: DeviceInfo | None = None) -> dict:
    """Parse `onnx_path`, build a serialized engine per `plan`, write OUT_DIR/{model.engine, tcexport-build.json}.

    The directory is written atomically: a failure leaves nothing behind. Returns the sidecar.
    """
    import time

    from tcexport.atomic import atomic_dir, atomic_file
    from tcexport.backends.ort import file_sha256

    trt = require_tensorrt()
    device = device or require_gpu()
    onnx_path = Path(onnx_path)
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # ScatterElements-with-reduction and other standard plugins
    builder = trt.Builder(logger)
    # 10.x: weakly typed, precision from builder flags. 11.x: every network is strongly typed (its STRONGLY_TYPED
    # creation flag is accepted but deprecated), so no creation flag is needed on either.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)

    precision_report = None
    with tempfile.TemporaryDirectory(prefix="tcexport-trt-") as scratch:
        parse_path = onnx_path
        if plan.convert_graph:
            from tcexport import precision as precision_mod

            parse_path = Path(scratch) / f"model.{plan.precision}.onnx"
            precision_report = precision_mod.convert_file(onnx_path, parse_path, plan.precision).to_json()
        if not parser.parse_from_file(str(parse_path)):
            raise UsageError(_parser_failure(parser, onnx_path, plan.trt_version))

    config = builder.create_builder_config()
    if plan.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
    for name in plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    for name, shape in plan.profile.items():
        if shape.min:
            profile.set_shape(name, shape.min, shape.opt, shape.max)
    config.add_optimization_profile(profile)
    cache = None
    if plan.timing_cache is not None:
        blob = plan.timing_cache.read_bytes() if plan.timing_cache.exists() else b""
        cache = config.create_timing_cache(blob)
        if not config.set_timing_cache(cache, ignore_mismatch=False):
            raise UsageError(f"{plan.timing_cache}: timing cache from another GPU or TensorRT version; delete it "
                             "or pass another --timing-cache file")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UsageError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above); "
                         f"run 'tcexport lint {onnx_path} --trt-version {plan.trt_version}'")
    engine_bytes = bytes(memoryview(serialized))
    data = sidecar(
        plan, device=device, tensorrt_version=trt.__version__,
        engine_inputs=[_tensor_info(network.get_input(i)) for i in range(network.num_inputs)],
        engine_outputs=[_tensor_info(network.get_output(i)) for i in range(network.num_outputs)],
        source_model=onnx_path, source_sha256=file_sha256(onnx_path),
        records=metadata.all_records(onnxfile.load(onnx_path, load_external_data=False)),
        engine_bytes=len(engine_bytes), build_seconds=time.perf_counter() - started,
        precision_report=precision_report,
    )
    with atomic_dir(out_dir) as tmp:
        (tmp / ENGINE_FILE).write_bytes(engine_bytes)
        (tmp / SIDECAR).write_text(json.dumps(data, indent=2) + "\n")
    if cache is not None:
        with atomic_file(plan.timing_cache) as tmp_cache:
            tmp_cache.write_bytes(bytes(memoryview(config.get_timing_cache().serialize())))
    return data


def _tensor_info(tensor) -> TensorInfo:
    dtype = getattr(tensor.dtype, "name", str(tensor.dtype).replace("DataType.", ""))
    return TensorInfo(tensor.name, [int(d) for d in tensor.shape], dtype.lower())


def _parser_failure(parser, path: Path, version: TrtVersion) -> str:
    details = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        where = ""
        node_name = getattr(error, "node_name", None)
        node_op = getattr(error, "node_operator", None)
        if callable(node_name) and node_name():
            where = f"node {node_name()}" + (f" ({node_op()})" if callable(node_op) and node_op() else "") + ": "
        details.append(where + " ".join(str(error.desc()).split()))
    first = details[0] if details else "no details"
    more = f" (+{len(details) - 1} more)" if len(details) > 1 else ""
    return (f"TensorRT's ONNX parser rejected {path}: {first}{more}; "
            f"run 'tcexport lint {path} --trt-version {version.major}.{version.minor}'")


# --- running engines ---------------------------------------------------------------------------------------------


# TensorRT DataType member names -> torch dtype names.
_TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32", "INT64": "int64",
                 "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


class TrtRunner:
    """Run a serialized engine on torch CUDA tensors: feeds in, outputs out, and CUDA-event timing."""

    def __init__(self, engine_path: str | Path, device_index: int = 0):
        trt = require_tensorrt()
        try:
            import torch
        except ImportError:
            raise UsageError("running TensorRT engines needs PyTorch with CUDA; " + INSTALL_HINT) from None
        if not torch.cuda.is_available():
            raise UsageError("running TensorRT engines needs PyTorch with CUDA (torch.cuda.is_available() is False); "
                             "on Jetson install NVIDIA's PyTorch wheel for your JetPack")
        self._trt, self._torch = trt, torch
        self.device = torch.device("cuda", device_index)
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        self._runtime = trt.Runtime(logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise UsageError(f"{engine_path}: TensorRT could not deserialize it (built with another TensorRT "
                             "version or GPU?); rebuild it with 'tcexport build --backend trt' on this device")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.stream = torch.cuda.Stream(self.device)
        self._outputs: dict[str, Any] = {}

    def _torch_dtype(self, name: str):
        trt_name = getattr(self.engine.get_tensor_dtype(name), "name", "FLOAT")
        if trt_name not in _TORCH_DTYPES:
            raise UsageError(f"engine tensor '{name}' has type {trt_name}, which TrtRunner cannot hold in torch")
        return getattr(self._torch, _TORCH_DTYPES[trt_name])

    def bind(self, feeds: dict[str, Any]) -> None:
        """Copy feeds (numpy arrays or torch tensors) to the GPU, set shapes, allocate outputs."""
        torch = self._torch
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise UsageError(f"missing inputs for the engine: {', '.join(sorted(missing))}")
        self._inputs = {}
        for name in self.input_names:
            value = feeds[name]
            tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
            tensor = tensor.to(self.device, self._torch_dtype(name)).contiguous()
            self._inputs[name] = tensor
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise UsageError(f"input '{name}' shape {tuple(tensor.shape)} is outside the engine's profile")
            self.context.set_tensor_address(name, tensor.data_ptr())
        self._outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            tensor = torch.empty(shape, dtype=self._torch_dtype(name), device=self.device)
            self._outputs[name] = tensor
            self.context.set_tensor_address(name, tensor.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the copies above ran on that stream

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise UsageError("TensorRT execution failed (see the TensorRT log)")

    def infer(self, feeds: dict[str, Any]) -> dict[str, Any]:
        """Run once; return outputs as float32-or-native numpy arrays."""
        self.bind(feeds)
        self.execute()
        self.stream.synchronize()
        return {name: t.float().cpu().numpy() if t.dtype == self._torch.bfloat16 else t.cpu().numpy()
                for name, t in self._outputs.items()}

    def time_ms(self, feeds: dict[str, Any], warmup: int = 10, iters: int = 50) -> list[float]:
        """Per-run GPU latency in ms, from CUDA events around each execute_async_v3 (inputs already on the GPU)."""
        torch = self._torch
        self.bind(feeds)
        for _ in range(warmup):
            self.execute()
        self.stream.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            self.execute()
            end.record(self.stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times


__all__ = [
    "BuildPlan", "DeviceInfo", "PluginSpec", "ProfileShape", "TensorInfo", "TrtRunner", "TrtVersion",
    "build", "build_engine", "builder_flags", "check_device_precision", "converts_graph",
    "make_plan", "parse_batch_range", "parse_version", "plugin_node_attributes", "profile_shapes",
    "prefers_plugin_over_local_function", "reads_plugin_namespace_from_domain", "register_plugin",
    "require_gpu", "require_tensorrt", "sidecar", "supports_aot_plugins", "supports_python_plugins",
    "uses_strong_typing", "workspace_bytes", "TCEXPORT_PLUGINS", "ENGINE_FILE",
]
