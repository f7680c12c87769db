"""Building TensorRT engines: the BuildPlan, the sidecar, and the thin wrapper that carries a plan out.

- make_plan gathers every decision before TensorRT is touched (plain functions, testable without TensorRT):
  version switches (trt_versions.py), optimization-profile shapes and workspace (trt_profiles.py), and the
  plugins to load and parser flags (trt_plugins.py). sidecar() is the tcexport-build.json written next to an
  engine.
- build_engine wraps the TensorRT Python API: Builder / OnnxParser / BuilderConfig / profile / timing cache /
  build_serialized_network, written atomically with its sidecar; plugins are loaded before parsing, and
  fp16/bf16 graphs are converted first (tcexport.backends.precision). build checks TensorRT and the GPU first
  (trt_device.py), plans, then builds.

Without the tensorrt package, or without an NVIDIA GPU, build and build_engine raise UsageError with one line
saying what is missing, before anything is written.
"""

from __future__ import annotations

import json
import platform
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import onnx

from tcexport import __version__
from tcexport.backends import trt_device, trt_plugins
from tcexport.backends.trt_device import DeviceInfo
from tcexport.backends.trt_profiles import ProfileShape, parse_batch_range, profile_shapes, workspace_bytes
from tcexport.backends.trt_versions import (TrtVersion, builder_flags, builds_strongly_typed, check_precision,
                                            converts_graph, network_creation_flags, parse_version)
from tcexport.core import metadata
from tcexport.core import onnxfile
from tcexport.core.artifacts import SIDECAR
from tcexport.core.errors import UsageError
from tcexport.models import inputs

ENGINE_FILE = "model.engine"


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
    version = parse_version(trt_version)
    check_precision(precision)
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


def build(onnx_path: str | Path, out_dir: str | Path, precision: str = "fp32", batch: str | None = None,
          workspace_mb: int | None = None, timing_cache: str | Path | None = None, plugins: str = "auto") -> dict:
    """Check TensorRT and the GPU first, plan, then build. Returns the sidecar."""
    trt = trt_device.require_tensorrt()
    device = trt_device.require_gpu()
    trt_device.check_device_precision(device, precision)
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

    trt = trt_device.require_tensorrt()
    device = device or trt_device.require_gpu()
    onnx_path = Path(onnx_path)
    started = time.perf_counter()

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


__all__ = ["build", "build_engine", "make_plan", "sidecar", "BuildPlan", "TensorInfo", "ENGINE_FILE"]
