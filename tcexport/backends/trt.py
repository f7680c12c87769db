"""TensorRT backend: the only module that imports tensorrt (lazily, inside functions).

Two layers:

- plain decision functions, testable without TensorRT or a GPU: version parsing and version switches
  (strong typing, builder flags, plugin features), optimization-profile shapes, workspace size, plugin node
  attributes, the BuildPlan that gathers every decision, and the sidecar JSON written next to an engine; for
  running: whether an engine fits this TensorRT and GPU (engine_mismatch), whether a batch fits its profile,
  which device times a runner reports (device_fields, TRTEXEC_FIELDS) and the CUDA graph note;
- thin wrappers over the TensorRT Python API: build_engine (Builder / OnnxParser / BuilderConfig / profile /
  timing cache / build_serialized_network, written atomically with its sidecar) and TrtRunner (deserialize,
  set_input_shape / set_tensor_address / execute_async_v3 on torch CUDA tensors, CUDA-event timing of compute
  and optional H2D/D2H copies, optional CUDA graph replay). TrtRunner is the bench Runner for engine
  directories and what `tcexport validate` runs an engine through.

Without the tensorrt package, or without an NVIDIA GPU, the wrappers raise UsageError with one line saying what
is missing, before anything is written.

Facts this encodes (see DESIGN.md §5): TensorRT 11 networks are strongly typed and the FP16/BF16/INT8 builder
flags are gone, so reduced precision there means converting the ONNX graph (tcexport.backends.precision). TensorRT 10.x
still has the flags, but they mean "fp16 where faster" and could run the layers that decide which tokens merge
in fp16; so 10.x fp16/bf16 engines are built the same way, strongly typed from the converted graph, and both
lines make the same fp32 decisions. Plugins to load (--plugins) are decided in trt_plugins.py. Python plugins
("quickly deployable plugins") need 10.6, ahead-of-time plugins 10.9, C++ IPluginV3 plugins 10.0; the parser
prefers a registered plugin over a model-local function of the same name from 10.7 and reads the plugin
namespace from the node's domain from 10.10.
"""

from __future__ import annotations

import ctypes
import json
import platform
import re
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import onnx

from tcexport import __version__
from tcexport.models import inputs
from tcexport.core import metadata
from tcexport.core import onnxfile
from tcexport.core.artifacts import SIDECAR
from tcexport.core.errors import UsageError
from tcexport.methods.plugin import PluginSpec

ENGINE_FILE = "model.engine"
INSTALL_HINT = ("pip install 'tcexport[trt10]' (TensorRT 10.x, CUDA 12) or 'tcexport[trt11]' (= tcexport[trt], "
                "TensorRT 11.x, CUDA 13) on a machine with an NVIDIA GPU (on Jetson: JetPack's python3-libnvinfer)")
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
    """Names of tensorrt.BuilderFlag members to set: none on any version.

    10.x's FP16/BF16 flags mean "fp16 where faster, fp32 fallback": the score MatMul, TopK and ArgMax that decide
    which tokens merge could then run in fp16, and decisions would differ from 11.x. So reduced precision is built
    the 11.x way on 10.x too: a strongly typed network from the converted graph (converts_graph), whose deciding
    layers tcexport.backends.precision keeps in fp32. A strongly typed network takes no precision flags.
    """
    _check_precision(precision)
    parse_version(version)
    return ()


def converts_graph(version: str | TrtVersion, precision: str) -> bool:
    """Whether reduced precision needs the ONNX graph rewritten (tcexport.backends.precision) before parsing: always."""
    parse_version(version)
    return _check_precision(precision) != "fp32"


def builds_strongly_typed(version: str | TrtVersion, precision: str) -> bool:
    """11.x: always; 10.x: for fp16/bf16 (from the converted graph), weakly typed fp32 as before."""
    return uses_strong_typing(version) or converts_graph(version, precision)


def network_creation_flags(version: str | TrtVersion, precision: str) -> tuple[str, ...]:
    """tensorrt.NetworkDefinitionCreationFlag members: STRONGLY_TYPED on 10.x reduced precision (11.x networks
    are strongly typed without it; the flag is deprecated there)."""
    if builds_strongly_typed(version, precision) and not uses_strong_typing(version):
        return ("STRONGLY_TYPED",)
    return ()


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


# Which plugin kinds a TensorRT version runs: C++ IPluginV3 from 10.0 (JetPack 6's 10.3 included), Python
# "quickly deployable" plugins JIT from 10.6, ahead of time (aot_impl, no Python at run time) from 10.9.
CPP_PLUGIN, PYTHON_JIT_PLUGIN, PYTHON_AOT_PLUGIN = "C++ IPluginV3 library", "Python plugin (JIT)", "Python plugin (AOT)"


def plugin_kinds(version: str | TrtVersion, spec: PluginSpec, with_mask: bool = False) -> list[str]:
    """The kinds of tcexport plugin that can run `spec` on TensorRT `version` (the Python ones take no mask)."""
    version = parse_version(version)
    kinds = [CPP_PLUGIN] if spec.cpp else []
    if spec.python_aot and not with_mask:
        if supports_python_plugins(version):
            kinds.append(PYTHON_JIT_PLUGIN)
        if supports_aot_plugins(version):
            kinds.append(PYTHON_AOT_PLUGIN)
    return kinds


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
    network_flags: tuple[str, ...] = ()
    parser_flags: tuple[str, ...] = ()
    plugins: Any = None  # trt_plugins.PluginLoad: what is loaded before parsing

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
            "network_flags": list(self.network_flags),
            "parser_flags": list(self.parser_flags),
        }


def make_plan(model: onnx.ModelProto | str | Path, trt_version: str | TrtVersion, precision: str = "fp32",
              batch: tuple[int, int, int] | str | None = None, workspace_mb: int | None = None,
              timing_cache: str | Path | None = None, plugins: str = "auto",
              numpy_version: str | None = None) -> BuildPlan:
    from tcexport.backends import trt_plugins

    version = parse_version(trt_version)
    _check_precision(precision)
    if not isinstance(model, onnx.ModelProto):
        model = onnxfile.load(model, load_external_data=False)
    if isinstance(batch, str):
        batch = parse_batch_range(batch)
    specs = inputs.specs_from_graph(model)
    load = trt_plugins.choose(plugins, model, version, numpy_version)
    return BuildPlan(
        trt_version=version,
        precision=precision,
        strongly_typed=builds_strongly_typed(version, precision),
        convert_graph=converts_graph(version, precision),
        builder_flags=builder_flags(version, precision),
        profile=profile_shapes(specs, batch),
        inputs=specs,
        workspace_bytes=workspace_bytes(workspace_mb),
        timing_cache=Path(timing_cache) if timing_cache else None,
        network_flags=network_creation_flags(version, precision),
        parser_flags=trt_plugins.parser_flags(version, load),
        plugins=load,
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
    if plan.plugins is not None:
        data["plugins"] = plan.plugins.to_json()
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


_GPU_ADVICE = {
    "build": "TensorRT builds engines on the GPU that will run them: run 'tcexport build --backend trt' on that "
             "machine",
    "run": "TensorRT engines run only on a GPU like the one that built them: run this there, with tcexport[trt] "
           "installed",
}


def require_gpu(index: int = 0, purpose: str = "build") -> DeviceInfo:
    """The CUDA device TensorRT will build for (or run on), read through the CUDA driver API (no torch needed).

    purpose ("build" or "run") only picks the advice at the end of the error message.
    """
    advice = _GPU_ADVICE[purpose]
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        raise UsageError(f"no NVIDIA GPU driver found (libcuda.so.1 is missing); {advice}")
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
        raise UsageError(f"no usable NVIDIA GPU (the CUDA driver reports {count.value} device(s)); {advice}")
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
          workspace_mb: int | None = None, timing_cache: str | Path | None = None, plugins: str = "auto") -> dict:
    """Check TensorRT and the GPU first, plan, then build. Returns the sidecar."""
    trt = require_tensorrt()
    device = require_gpu()
    check_device_precision(device, precision)
    plan = make_plan(onnx_path, trt.__version__, precision, batch, workspace_mb, timing_cache, plugins)
    return build_engine(onnx_path, out_dir, plan, device=device)


def build_engine(onnx_path: str | Path, out_dir: str | Path, plan: BuildPlan,
                 device: DeviceInfo | None = None) -> dict:
    """Parse `onnx_path`, build a serialized engine per `plan`, write OUT_DIR/{model.engine, tcexport-build.json}.

    The directory is written atomically: a failure leaves nothing behind. Returns the sidecar.
    """
    import time

    from tcexport.core.atomic import atomic_dir, atomic_file
    from tcexport.backends.ort import file_sha256

    trt = require_tensorrt()
    device = device or require_gpu()
    onnx_path = Path(onnx_path)
    started = time.perf_counter()
    from tcexport.backends import trt_plugins

    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")  # ScatterElements-with-reduction and other standard plugins
    if plan.plugins is not None:
        trt_plugins.load(plan.plugins, trt)  # before parsing: the parser looks plugins up in the registry
    builder = trt.Builder(logger)
    # fp32 on 10.x: weakly typed. fp16/bf16 on 10.x: STRONGLY_TYPED from the converted graph. 11.x: every network
    # is strongly typed (its creation flag is deprecated there).
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    for name in plan.parser_flags:
        flag = getattr(getattr(trt, "OnnxParserFlag", None), name, None)
        if flag is None:
            raise UsageError(f"TensorRT {trt.__version__} has no OnnxParserFlag.{name}, which a plugin override "
                             "needs here; compress with --impl plugin (its nodes need no override)")
        parser.set_flag(flag)

    precision_report = None
    with tempfile.TemporaryDirectory(prefix="tcexport-trt-") as scratch:
        parse_path = onnx_path
        if plan.convert_graph:
            from tcexport.backends import precision as precision_mod

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
        trt = require_tensorrt()
        device = require_gpu(purpose="run")
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
    from tcexport.backends import trt_plugins

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
            raise UsageError("running TensorRT engines needs PyTorch with CUDA; " + INSTALL_HINT) from None
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
        trt = require_tensorrt()
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
            from tcexport.backends import trt_plugins

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
    "builds_strongly_typed", "network_creation_flags", "plugin_kinds",
    "BuildPlan", "DeviceInfo", "ProfileShape", "TensorInfo", "TorchCuda", "TrtRunner", "TrtVersion",
    "build", "build_engine", "builder_flags", "check_batch_in_profile", "check_device_precision", "converts_graph",
    "cuda_graph_note", "device_fields", "engine_mismatch", "make_plan", "open_engine_runner", "parse_batch_range",
    "parse_version", "profile_shapes", "prefers_plugin_over_local_function",
    "reads_plugin_namespace_from_domain", "require_engine_runtime", "require_gpu",
    "require_tensorrt", "sidecar", "supports_aot_plugins", "supports_python_plugins", "uses_strong_typing",
    "workspace_bytes", "ENGINE_FILE", "TRTEXEC_FIELDS",
]
