"""TensorRT backend: the decisions (versions, flags, profiles, plan, sidecar) run anywhere; engines need a GPU.

Tests marked trt/gpu build and run a real engine and skip with the reason when TensorRT or a GPU is absent.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tcexport.core import artifacts
from tcexport.models import inputs
from tcexport.backends import trt_build, trt_device, trt_engine, trt_profiles, trt_versions
from tcexport.core.errors import UsageError
from tests.conftest import assert_usage_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
VERSIONS = ["10.3", "10.13", "11.0"]


def tiny_model(batch="batch", hidden=16) -> onnx.ModelProto:
    """x[batch, 4, hidden] -> LayerNorm -> MatMul -> Softmax: a miniature attention-ish block."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), "w")
    scale = numpy_helper.from_array(np.ones(hidden, np.float32), "scale")
    bias = numpy_helper.from_array(np.zeros(hidden, np.float32), "bias")
    nodes = [helper.make_node("LayerNormalization", ["x", "scale", "bias"], ["n"], name="ln", axis=-1),
             helper.make_node("MatMul", ["n", "w"], ["h"], name="mm"),
             helper.make_node("Softmax", ["h"], ["y"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4, hidden])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, hidden])],
                              [weight, scale, bias])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


@pytest.fixture
def tiny_onnx(tmp_path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_model(), path)
    return path


def tensorrt_importable() -> bool:
    try:
        trt_device.require_tensorrt()
        return True
    except UsageError:
        return False


def gpu_present() -> bool:
    try:
        trt_device.require_gpu()
        return True
    except UsageError:
        return False


# --- versions and switches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("10.3", (10, 3, 0)), ("10.13.3", (10, 13, 3)), ("10.3.0.30", (10, 3, 0)), ("11.0", (11, 0, 0)),
    (" 10.14.1.48 ", (10, 14, 1)), ("10.3.0.post1", (10, 3, 0)),
])
def test_parse_version(text, expected):
    version = trt_versions.parse_version(text)
    assert (version.major, version.minor, version.patch) == expected
    assert trt_versions.parse_version(version) is version


@pytest.mark.parametrize("bad", ["", "10", "ten", "9.0", "8.6.1", "12.0", "10.x"])
def test_parse_version_rejects(bad):
    with pytest.raises(UsageError):
        trt_versions.parse_version(bad)


@pytest.mark.parametrize("version, strong", [("10.3", False), ("10.13", False), ("11.0", True)])
def test_strong_typing_per_version(version, strong):
    assert trt_versions.uses_strong_typing(version) is strong


@pytest.mark.parametrize("version, precision, strong, network_flags", [
    ("10.3", "fp32", False, ()), ("10.3", "fp16", True, ("STRONGLY_TYPED",)),
    ("10.3", "bf16", True, ("STRONGLY_TYPED",)),
    ("10.13", "fp32", False, ()), ("10.13", "fp16", True, ("STRONGLY_TYPED",)),
    ("11.0", "fp32", True, ()), ("11.0", "fp16", True, ()), ("11.0", "bf16", True, ()),
])
def test_reduced_precision_is_built_from_the_converted_graph_on_every_version(version, precision, strong,
                                                                              network_flags):
    """10.x fp16/bf16 as 11.x: converted graph, strongly typed, no FP16/BF16 builder flag ("fp16 where faster")."""
    assert trt_versions.builder_flags(version, precision) == ()
    assert trt_versions.converts_graph(version, precision) is (precision != "fp32")
    assert trt_versions.builds_strongly_typed(version, precision) is strong
    assert trt_versions.network_creation_flags(version, precision) == network_flags


def test_unknown_precision_is_a_usage_error():
    with pytest.raises(UsageError):
        trt_versions.builder_flags("10.3", "int8")


def test_plugin_feature_switches():
    assert not trt_versions.supports_python_plugins("10.3") and trt_versions.supports_python_plugins("10.6")
    assert not trt_versions.supports_aot_plugins("10.8") and trt_versions.supports_aot_plugins("10.9")
    assert not trt_versions.prefers_plugin_over_local_function("10.6") and trt_versions.prefers_plugin_over_local_function("10.7")
    assert not trt_versions.reads_plugin_namespace_from_domain("10.9") and trt_versions.reads_plugin_namespace_from_domain("10.13")
    from tcexport.methods import registry
    from tcexport.methods.plugin import plugin_node_attributes

    spec = registry.plugin_specs()[("tcexport", "ToMeMerge")]
    assert plugin_node_attributes(spec) == {"plugin_namespace": "tcexport", "plugin_version": "1"}


# --- profiles, workspace -----------------------------------------------------------------------------------------


def test_profile_only_the_batch_axis_varies():
    specs = [inputs.InputSpec("input_ids", ["batch", 128], "int64"), inputs.InputSpec("mask", ["batch", 128], "int64")]
    shapes = trt_profiles.profile_shapes(specs, (1, 4, 8))
    for name in ("input_ids", "mask"):
        assert shapes[name] == trt_profiles.ProfileShape((1, 128), (4, 128), (8, 128))
    assert trt_profiles.profile_shapes(specs)["mask"] == trt_profiles.ProfileShape((1, 128), (1, 128), (8, 128))  # default 1,1,8


def test_profile_fixed_batch():
    specs = [inputs.InputSpec("x", [2, 3, 224, 224])]
    assert trt_profiles.profile_shapes(specs)["x"] == trt_profiles.ProfileShape((2, 3, 224, 224), (2, 3, 224, 224), (2, 3, 224, 224))
    assert trt_profiles.profile_shapes(specs, (2, 2, 2))["x"].max == (2, 3, 224, 224)
    with pytest.raises(UsageError, match="fixed batch of 2"):
        trt_profiles.profile_shapes(specs, (1, 1, 8))


def test_profile_rejects_other_dynamic_axes():
    with pytest.raises(UsageError):
        trt_profiles.profile_shapes([inputs.InputSpec("ids", ["batch", "seq"], "int64")], (1, 1, 8))


@pytest.mark.parametrize("text, expected", [("1,1,8", (1, 1, 8)), ("4", (4, 4, 4)), ("1,8,8", (1, 8, 8))])
def test_parse_batch_range(text, expected):
    assert trt_profiles.parse_batch_range(text) == expected


@pytest.mark.parametrize("bad", ["8,1,1", "0,1,2", "1,2", "a,b,c", "1,2,3,4"])
def test_parse_batch_range_rejects(bad):
    with pytest.raises(UsageError):
        trt_profiles.parse_batch_range(bad)


def test_workspace_bytes():
    assert trt_profiles.workspace_bytes(None) is None
    assert trt_profiles.workspace_bytes(1024) == 1 << 30
    with pytest.raises(UsageError):
        trt_profiles.workspace_bytes(0)


# --- plan and sidecar --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_plan_per_version(tiny_onnx, version):
    plan = trt_build.make_plan(tiny_onnx, version, "fp16", "1,2,8", workspace_mb=256, timing_cache="cache.bin")
    assert plan.strongly_typed and plan.convert_graph and plan.builder_flags == ()
    assert plan.network_flags == (() if version == "11.0" else ("STRONGLY_TYPED",))
    assert plan.plugins.kind == "none" and plan.parser_flags == ()  # no plugin nodes: nothing to load
    assert plan.profile == {"x": trt_profiles.ProfileShape((1, 4, 16), (2, 4, 16), (8, 4, 16))}
    assert plan.workspace_bytes == 256 << 20 and plan.timing_cache == Path("cache.bin")
    data = json.loads(json.dumps(plan.to_json()))
    assert data["tensorrt_version"] == version and data["profile"]["x"]["max"] == [8, 4, 16]
    assert data["precision_mode"] == "graph types (strongly typed)"


def make_sidecar(tiny_onnx, version="10.3", precision="fp16") -> dict:
    plan = trt_build.make_plan(tiny_onnx, version, precision, "1,1,8")
    device = trt_device.DeviceInfo("Orin (nvgpu)", (8, 7), 8 << 30)
    return trt_build.sidecar(plan, device=device, tensorrt_version=f"{version}.0.30",
                       engine_inputs=[trt_build.TensorInfo("x", [-1, 4, 16], "float")],
                       engine_outputs=[trt_build.TensorInfo("y", [-1, 4, 16], "float")],
                       source_model=tiny_onnx, source_sha256="ab" * 32, records={}, engine_bytes=1234)


def test_sidecar_contents(tiny_onnx):
    data = json.loads(json.dumps(make_sidecar(tiny_onnx)))
    assert data["backend"] == "trt" and data["model_file"] == "model.engine" == trt_build.ENGINE_FILE
    assert data["tensorrt_version"] == "10.3.0.30"
    assert data["gpu_name"] == "Orin (nvgpu)" and data["compute_capability"] == "8.7"
    assert data["precision"] == "fp16" and data["plan"]["builder_flags"] == []
    assert data["plan"]["network_flags"] == ["STRONGLY_TYPED"] and data["plugins"]["kind"] == "none"
    assert data["profile"] == {"x": {"min": [1, 4, 16], "opt": [1, 4, 16], "max": [8, 4, 16]}}
    assert data["inputs"][0]["name"] == "x" and data["inputs"][0]["shape"][1:] == [4, 16]
    assert data["engine_outputs"] == [{"name": "y", "shape": [-1, 4, 16], "dtype": "float"}]
    assert data["outputs"] == ["y"]
    assert data["source_sha256"] == "ab" * 32 and data["source_model"] == str(tiny_onnx.resolve())


def test_sidecar_makes_a_build_dir_bench_can_resolve(tiny_onnx, tmp_path):
    build_dir = tmp_path / "engine"
    build_dir.mkdir()
    (build_dir / trt_build.ENGINE_FILE).write_bytes(b"engine")
    (build_dir / artifacts.SIDECAR).write_text(json.dumps(make_sidecar(tiny_onnx)))
    artifact = artifacts.resolve(build_dir)
    assert artifact.backend == "trt" and artifact.model_path == build_dir / "model.engine"


def test_bf16_needs_ampere():
    trt_device.check_device_precision(trt_device.DeviceInfo("Orin", (8, 7)), "bf16")
    trt_device.check_device_precision(trt_device.DeviceInfo("T4", (7, 5)), "fp16")
    with pytest.raises(UsageError, match="bf16"):
        trt_device.check_device_precision(trt_device.DeviceInfo("T4", (7, 5)), "bf16")


def test_only_the_trt_backend_imports_tensorrt():
    """backends/trt_device.py (lazily) and the Python plugin registrations, which only --plugins python imports."""
    offenders = []
    for path in (ROOT / "tcexport").rglob("*.py"):
        if path.name == "trt_device.py" and path.parent.name == "backends":
            continue
        if path.relative_to(ROOT).as_posix() == "tcexport/plugins/python.py":
            continue
        if re.search(r"^\s*(import tensorrt|from tensorrt)", path.read_text(), re.MULTILINE):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    source = (ROOT / "tcexport" / "backends" / "trt_device.py").read_text()
    assert not re.search(r"^(import tensorrt|from tensorrt)", source, re.MULTILINE)  # never at module level


# --- clean failure without TensorRT ------------------------------------------------------------------------------


@pytest.mark.skipif(tensorrt_importable(), reason="TensorRT is installed here; the missing-TensorRT path is not reachable")
def test_build_without_tensorrt_fails_cleanly(tiny_onnx, tmp_path):
    result = run_cli("build", tiny_onnx, "--backend", "trt", "-o", "out", cwd=tmp_path)
    assert_usage_error(result)
    assert "tcexport[trt]" in result.stderr
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.onnx"]


@pytest.mark.skipif(tensorrt_importable(), reason="TensorRT is installed here; the missing-TensorRT path is not reachable")
def test_build_model_spec_without_tensorrt_fails_before_exporting(tmp_path):
    result = run_cli("build", "py:tests.fixtures.factories:tiny_convnet", "--backend", "trt", "-o", "out",
                     cwd=tmp_path)
    assert_usage_error(result)
    assert "tcexport[trt]" in result.stderr and not (tmp_path / "out").exists()


def test_trt_options_with_ort_backend_are_usage_errors(tiny_onnx, tmp_path):
    for extra in (["--precision", "fp16"], ["--batch", "1,1,8"], ["--workspace", "64"]):
        result = run_cli("build", tiny_onnx, "-o", tmp_path / "out", *extra)
        assert_usage_error(result)
        assert not (tmp_path / "out").exists()


# --- real engines (need TensorRT and an NVIDIA GPU) --------------------------------------------------------------


def _engine_skip_reason() -> str | None:
    if not tensorrt_importable():
        return ("TensorRT is not installed (pip install 'tcexport[trt10]' or 'tcexport[trt11]' on a machine with an "
                "NVIDIA GPU)")
    if not gpu_present():
        return "no NVIDIA GPU"
    return None


_ENGINE_SKIP = _engine_skip_reason()
needs_engine = pytest.mark.skipif(_ENGINE_SKIP is not None, reason=_ENGINE_SKIP or "")


def _ort_reference(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.trt
@pytest.mark.gpu
@needs_engine
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_engine_matches_onnx_runtime(tiny_onnx, tmp_path, precision, atol):
    out = tmp_path / f"engine-{precision}"
    cache = tmp_path / "timing.cache"
    sidecar = trt_build.build(tiny_onnx, out, precision=precision, batch="1,2,8", workspace_mb=256, timing_cache=cache)
    assert sorted(p.name for p in out.iterdir()) == [artifacts.SIDECAR, trt_build.ENGINE_FILE]
    assert sidecar["backend"] == "trt" and sidecar["precision"] == precision and cache.stat().st_size > 0
    assert sidecar["profile"]["x"] == {"min": [1, 4, 16], "opt": [2, 4, 16], "max": [8, 4, 16]}
    runner = trt_engine.TrtRunner(out / trt_build.ENGINE_FILE)
    for batch in (1, 8):
        x = np.random.default_rng(batch).standard_normal((batch, 4, 16)).astype(np.float32)
        got = runner.infer({"x": x})["y"].astype(np.float32)
        np.testing.assert_allclose(got, _ort_reference(tiny_onnx, x), atol=atol, rtol=0)
    times = runner.time_ms({"x": np.zeros((2, 4, 16), np.float32)}, warmup=2, iters=5)
    assert len(times) == 5 and all(t > 0 for t in times)


@pytest.mark.trt
@pytest.mark.gpu
@needs_engine
def test_cli_build_writes_engine_dir(tiny_onnx, tmp_path):
    out = tmp_path / "engine"
    result = run_cli("build", tiny_onnx, "--backend", "trt", "--precision", "fp16", "--batch", "1,1,8", "-o", out)
    assert result.returncode == 0, result.stderr
    assert artifacts.resolve(out).backend == "trt"



# --- running engines: the decisions ------------------------------------------------------------------------------


def test_tolerances_for_each_precision():
    from tcexport.validate import equality as validate

    assert validate.tolerances_for("fp32") == (1e-4, 1e-4, None)
    assert validate.tolerances_for("fp16") == (1e-2, 1e-2, 0.999)
    atol, rtol, cosine = validate.tolerances_for("bf16")
    assert atol > 1e-2 and rtol > 1e-2 and cosine < 0.999  # looser than fp16
    # Explicit values win, one by one; the rest keep the precision's.
    assert validate.tolerances_for("fp32", 1e-3, 2e-3) == (1e-3, 2e-3, None)
    assert validate.tolerances_for("fp16", atol=5e-2) == (5e-2, 1e-2, 0.999)
    assert validate.tolerances_for("fp16", min_cosine=0.99) == (1e-2, 1e-2, 0.99)
    assert validate.tolerances_for("fp16", 0.0, 0.0) == (0.0, 0.0, 0.999)  # 0 is a value, not "not given"
    with pytest.raises(UsageError, match="int8"):
        validate.tolerances_for("int8")


def test_tolerance_reason_says_where_each_value_comes_from():
    from tcexport.validate import equality as validate

    default = validate.tolerance_reason("fp16", engine=True)
    assert "defaults for a fp16 engine" in default and "float16" in default
    partial = validate.tolerance_reason("fp16", engine=True, atol=1e-3)
    assert partial.startswith("--atol given") and "fp16 engine" in partial
    assert validate.tolerance_reason("fp32", False, 1e-3, 1e-3, 0.9) == "all given on the command line"
    assert "ONNX Runtime" in validate.tolerance_reason("fp32", engine=False)


def test_compare_with_a_cosine_floor():
    from tcexport.validate import equality as validate

    reference = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    rotated = np.array([[1.0, 0.05, 0.0], [0.0, 0.0, 0.0]])  # within atol 0.1, but cosine 0.9988
    assert validate.compare(reference, rotated, 0.1, 0.0)["within_tolerance"]
    assert validate.compare(reference, rotated, 0.1, 0.0, min_cosine=0.99)["within_tolerance"]
    assert not validate.compare(reference, rotated, 0.1, 0.0, min_cosine=0.999)["within_tolerance"]
    # Rows that are zero on both sides have no direction to compare; they match.
    assert validate.compare(reference, reference, 0.0, 0.0, min_cosine=0.999)["within_tolerance"]
    # Without a floor the result is what it always was.
    assert validate.compare(reference, rotated, 0.1, 0.0) == validate.compare(reference, rotated, 0.1, 0.0, None)


def test_engine_mismatch():
    sidecar = {"tensorrt_version": "10.13.0.35", "compute_capability": "8.7", "gpu_name": "Orin (nvgpu)"}
    orin = trt_device.DeviceInfo("Orin (nvgpu)", (8, 7))
    assert trt_engine.engine_mismatch(sidecar, "10.13.0.35", orin) is None
    assert trt_engine.engine_mismatch(sidecar, "10.13.0.post1", orin) is None  # same release, other packaging
    assert trt_engine.engine_mismatch({}, "10.3", orin) is None  # nothing recorded: let TensorRT decide
    version = trt_engine.engine_mismatch(sidecar, "10.3.0.26", orin)
    assert "TensorRT 10.13.0.35" in version and "10.3.0.26" in version and "tcexport build --backend trt" in version
    gpu = trt_engine.engine_mismatch(sidecar, "10.13.0.35", trt_device.DeviceInfo("Tesla T4", (7, 5)))
    assert "compute capability 8.7" in gpu and "Tesla T4 is 7.5" in gpu and "TensorRT" not in gpu.split(";")[0]
    both = trt_engine.engine_mismatch(sidecar, "10.3", trt_device.DeviceInfo("Tesla T4", (7, 5)))
    assert "TensorRT 10.13.0.35" in both and "compute capability" in both and "\n" not in both


def test_check_batch_in_profile():
    profile = {"x": {"min": [1, 4, 16], "opt": [2, 4, 16], "max": [8, 4, 16]},
               "scalar": {"min": [], "opt": [], "max": []}}
    for batch in (1, 2, 8):
        trt_engine.check_batch_in_profile(profile, batch, "engine")
    with pytest.raises(UsageError, match=r"engine: batch 9 is outside .* batches 1 to 8"):
        trt_engine.check_batch_in_profile(profile, 9, "engine")
    with pytest.raises(UsageError, match=r"takes batch 4\)"):
        trt_engine.check_batch_in_profile({"x": {"min": [4, 3], "max": [4, 3]}}, 1, "engine")
    trt_engine.check_batch_in_profile(None, 100, "no profile recorded")


def test_device_fields_and_graph_note():
    assert trt_engine.device_fields(False) == ("gpu_compute_ms",)
    assert trt_engine.device_fields(True) == ("h2d_ms", "gpu_compute_ms", "d2h_ms")
    assert set(trt_engine.TRTEXEC_FIELDS) == set(trt_engine.device_fields(True))
    assert trt_engine.TRTEXEC_FIELDS["gpu_compute_ms"] == "GPU Compute Time"
    assert trt_engine.cuda_graph_note(False, False) == "off"
    assert trt_engine.cuda_graph_note(True, True).startswith("on")
    note = trt_engine.cuda_graph_note(True, False, "operation not permitted\nwhen stream is capturing")
    assert note.startswith("unsupported") and "operation not permitted when stream" in note and "\n" not in note


# --- running engines: TrtRunner, validate and bench on a fake TensorRT and CUDA ----------------------------------
#
# The fakes stand in for the tensorrt module and for TorchCuda (the only code that touches CUDA): the engine is an
# ONNX Runtime session over the ONNX bytes stored as "model.engine", device memory is numpy arrays looked up by
# address, and a synthetic clock makes every CUDA-event time known in advance. What runs for real is TrtRunner's
# control flow (bind / stage / copies / events / graph capture and fallback), validate's engine path and bench's
# handling of engine directories.


class FakeEvent:
    time: float | None = None


class FakeCuda:
    """TorchCuda's interface on numpy arrays. Each engine execution advances the clock by compute_ms (a graph
    replay by graph_ms), each copy by copy_ms; events read the clock."""

    stream_handle = 0xC0DA

    def __init__(self, compute_ms=2.0, graph_ms=1.5, copy_ms=0.25, capturable=True):
        self.compute_ms, self.graph_ms, self.copy_ms, self.capturable = compute_ms, graph_ms, copy_ms, capturable
        self.clock = 0.0
        self.memory: dict[int, np.ndarray] = {}
        self.calls: list[str] = []
        self.capturing = self.replaying = False

    def _keep(self, array):
        self.memory[id(array)] = array
        return array

    def to_device(self, value, dtype):
        return self._keep(np.array(value, dtype=dtype))

    def empty(self, shape, dtype):
        return self._keep(np.zeros(shape, dtype=dtype))

    def pinned(self, value, dtype):
        return np.array(value, dtype=dtype)

    def pinned_empty(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    @staticmethod
    def address(array):
        return id(array)

    def after_uploads(self):
        pass

    def copy_async(self, dst, src):
        dst[...] = src
        self.clock += self.copy_ms
        self.calls.append("copy")

    def event(self):
        return FakeEvent()

    def record(self, event):
        event.time = self.clock

    @staticmethod
    def elapsed_ms(start, end):
        return end.time - start.time

    def synchronize(self):
        self.calls.append("sync")

    def capture(self, launch):
        if not self.capturable:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        self.capturing = True
        try:
            launch()
        finally:
            self.capturing = False
        self.calls.append("capture")
        return launch

    def replay(self, graph):
        self.replaying = True
        try:
            graph()
        finally:
            self.replaying = False

    @staticmethod
    def to_numpy(array):
        return np.array(array)


_ORT_TO_TRT = {"tensor(float)": "FLOAT", "tensor(float16)": "HALF", "tensor(int64)": "INT64", "tensor(int32)": "INT32"}


class FakeEngine:
    def __init__(self, blob: bytes, state):
        import onnxruntime as ort

        self.state = state
        self.session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.types = {t.name: t.type for t in [*self.session.get_inputs(), *self.session.get_outputs()]}
        self.num_io_tensors = len(self.inputs) + len(self.outputs)

    def get_tensor_name(self, index):
        return [*self.inputs, *self.outputs][index]

    def get_tensor_mode(self, name):
        return "INPUT" if name in self.inputs else "OUTPUT"

    def get_tensor_dtype(self, name):
        return type("DataType", (), {"name": _ORT_TO_TRT[self.types[name]]})()

    def create_execution_context(self):
        return FakeContext(self)


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.shapes, self.addresses = engine, {}, {}

    def set_input_shape(self, name, shape):
        low, high = self.engine.state.batch_range
        if not low <= shape[0] <= high:
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addresses[name] = address
        return True

    def _compute(self) -> dict[str, np.ndarray]:
        memory = self.engine.state.cuda.memory
        results = self.engine.session.run(None, {n: memory[self.addresses[n]] for n in self.engine.inputs})
        scale = 1 + self.engine.state.relative_error  # a reduced-precision engine's error, in a known size
        return {n: (r * scale).astype(r.dtype) for n, r in zip(self.engine.outputs, results)}

    def get_tensor_shape(self, name):
        return self.shapes[name] if name in self.shapes else self._compute()[name].shape

    def execute_async_v3(self, stream_handle):
        cuda = self.engine.state.cuda
        assert stream_handle == cuda.stream_handle
        if cuda.capturing:  # captured work is recorded, not run
            cuda.calls.append("captured")
            return True
        for name, value in self._compute().items():
            cuda.memory[self.addresses[name]][...] = value
        cuda.clock += cuda.graph_ms if cuda.replaying else cuda.compute_ms
        cuda.calls.append("graph" if cuda.replaying else "execute")
        return True


def make_fake_tensorrt(state):
    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            try:
                return FakeEngine(blob, state)
            except Exception:  # noqa: BLE001 - not an engine: TensorRT returns None
                return None

    return type("tensorrt", (), {"__version__": state.tensorrt_version, "Logger": Logger, "Runtime": Runtime,
                                 "init_libnvinfer_plugins": staticmethod(lambda logger, namespace: True),
                                 "TensorIOMode": type("TensorIOMode", (), {"INPUT": "INPUT", "OUTPUT": "OUTPUT"})})


@pytest.fixture
def fake_gpu(monkeypatch):
    """tensorrt, the GPU and TorchCuda replaced by fakes; tweak the returned state before opening a runner."""
    from types import SimpleNamespace

    state = SimpleNamespace(cuda=FakeCuda(), batch_range=(1, 8), relative_error=0.0, tensorrt_version="10.13.0.35",
                            device=trt_device.DeviceInfo("Fake GPU", (8, 7), 8 << 30))
    fake = make_fake_tensorrt(state)
    monkeypatch.setattr(trt_device, "require_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_device, "require_gpu", lambda index=0, purpose="build": state.device)
    monkeypatch.setattr(trt_engine, "TorchCuda", lambda device_index=0: state.cuda)
    return state


def make_engine_dir(directory: Path, onnx_path: Path, precision="fp16", version="10.13", compute_capability=(8, 7),
                    batch="1,1,8") -> Path:
    """A build directory as build_engine writes it, with the ONNX bytes as the (fake) engine."""
    from tcexport.core import metadata

    model = onnx.load(str(onnx_path))
    plan = trt_build.make_plan(model, version, precision, batch)
    specs = inputs.specs_from_graph(model)
    data = trt_build.sidecar(plan, device=trt_device.DeviceInfo("Fake GPU", compute_capability), tensorrt_version=f"{version}.0.35",
                       engine_inputs=[trt_build.TensorInfo(s.name, [-1, *s.shape[1:]], "float") for s in specs],
                       engine_outputs=[trt_build.TensorInfo(o.name, [], "float") for o in model.graph.output],
                       source_model=onnx_path, source_sha256="ab" * 32, records=metadata.all_records(model))
    directory.mkdir(parents=True)
    (directory / trt_build.ENGINE_FILE).write_bytes(onnx_path.read_bytes())
    (directory / artifacts.SIDECAR).write_text(json.dumps(data))
    return directory


def test_fake_runner_times_compute_only(fake_gpu, tiny_onnx, tmp_path):
    engine_dir = make_engine_dir(tmp_path / "engine", tiny_onnx)
    runner = trt_engine.open_engine_runner(artifacts.resolve(engine_dir), "tiny-trt")
    assert runner.name == "tiny-trt" and runner.device_fields == ("gpu_compute_ms",)
    x = np.random.default_rng(0).standard_normal((2, 4, 16)).astype(np.float32)
    feeds = {"x": x}
    for _ in range(3):
        outputs = runner.run(feeds)
    np.testing.assert_allclose(outputs["y"], _ort_reference(tiny_onnx, x), rtol=1e-6)
    # Staged once (one untimed execution), then three timed executions; no copies without include_copies.
    assert fake_gpu.cuda.calls.count("execute") == 4 and "copy" not in fake_gpu.cuda.calls
    assert runner.pop_device_times() == {"gpu_compute_ms": [2.0, 2.0, 2.0]}
    assert runner.pop_device_times() == {"gpu_compute_ms": []}  # popped means gone
    assert runner.cuda_graph_used is False and runner.cuda_graph_note == "off"
    assert runner.time_ms(feeds, warmup=2, iters=4) == [2.0] * 4
    np.testing.assert_allclose(runner.infer({"x": x})["y"], _ort_reference(tiny_onnx, x), rtol=1e-6)


def test_fake_runner_with_copies_and_cuda_graph(fake_gpu, tiny_onnx, tmp_path):
    engine_dir = make_engine_dir(tmp_path / "engine", tiny_onnx)
    runner = trt_engine.open_engine_runner(artifacts.resolve(engine_dir), include_copies=True, cuda_graph=True)
    assert runner.device_fields == ("h2d_ms", "gpu_compute_ms", "d2h_ms")
    x = np.random.default_rng(1).standard_normal((3, 4, 16)).astype(np.float32)
    feeds = {"x": x}
    runner.stage(feeds)
    assert runner.cuda_graph_used and runner.cuda_graph_note.startswith("on")
    calls = fake_gpu.cuda.calls
    assert calls[calls.index("capture") - 1] == "captured"  # captured, not run, during capture
    runner.pop_device_times()
    outputs = runner.run(feeds)
    times = runner.pop_device_times()
    assert times == {"h2d_ms": [0.25], "gpu_compute_ms": [1.5], "d2h_ms": [0.25]}  # replayed graph: graph_ms
    assert calls[-4:] == ["copy", "graph", "copy", "sync"]  # H2D, replay, D2H, then wait for the stream
    np.testing.assert_allclose(outputs["y"], _ort_reference(tiny_onnx, x), rtol=1e-6)  # host buffer, copied back
    # A new feed (another batch) is staged again and gets its own graph.
    runner.run({"x": x[:1]})
    assert calls.count("capture") == 2


def test_fake_runner_falls_back_when_capture_fails(fake_gpu, tiny_onnx, tmp_path):
    fake_gpu.cuda.capturable = False
    engine_dir = make_engine_dir(tmp_path / "engine", tiny_onnx)
    runner = trt_engine.open_engine_runner(artifacts.resolve(engine_dir), cuda_graph=True)
    runner.run({"x": np.zeros((1, 4, 16), np.float32)})
    assert runner.cuda_graph_used is False
    assert runner.cuda_graph_note.startswith("unsupported") and "operation not permitted" in runner.cuda_graph_note
    assert runner.pop_device_times() == {"gpu_compute_ms": [2.0]}  # timed with plain execute_async_v3


def test_fake_runner_refusals(fake_gpu, tiny_onnx, tmp_path):
    engine_dir = make_engine_dir(tmp_path / "engine", tiny_onnx)
    runner = trt_engine.open_engine_runner(artifacts.resolve(engine_dir))
    with pytest.raises(UsageError, match="outside the engine's profile"):
        runner.run({"x": np.zeros((9, 4, 16), np.float32)})
    with pytest.raises(UsageError, match="missing inputs for the engine: x"):
        runner.run({"other": np.zeros((1, 4, 16), np.float32)})
    (engine_dir / trt_build.ENGINE_FILE).write_bytes(b"not an engine")
    with pytest.raises(UsageError, match="could not deserialize"):
        trt_engine.open_engine_runner(artifacts.resolve(engine_dir))
    elsewhere = make_engine_dir(tmp_path / "t4-engine", tiny_onnx, compute_capability=(7, 5))
    with pytest.raises(UsageError, match=r"compute capability 7\.5 .*rebuild it here"):
        trt_engine.open_engine_runner(artifacts.resolve(elsewhere))
    older = make_engine_dir(tmp_path / "old-engine", tiny_onnx, version="10.3")
    with pytest.raises(UsageError, match=r"TensorRT 10\.3\.0\.35 \(this machine has 10\.13\.0\.35\)"):
        trt_engine.open_engine_runner(artifacts.resolve(older))


@pytest.fixture(scope="module")
def convnet_onnx(tmp_path_factory) -> Path:
    """A tiny exported CNN with its tcexport.source record, so validate can rebuild the PyTorch reference."""
    from tcexport.export import exporter as export
    from tcexport.models import sources

    source = sources.load("py:tests.fixtures.factories:tiny_convnet", input_shape="3x8x8")
    path = tmp_path_factory.mktemp("convnet") / "convnet.onnx"
    export.export_to_file(source, path, exporter="torchscript")  # the fast exporter: only the record matters here
    return path


def test_validate_fp16_engine_uses_its_precision_tolerances(fake_gpu, convnet_onnx, tmp_path):
    from tcexport.validate import equality as validate
    from tcexport.core.errors import ValidationFailed

    fake_gpu.relative_error = 1e-3  # far beyond fp32's 1e-4, well within fp16's 1e-2
    engine_dir = make_engine_dir(tmp_path / "engine", convnet_onnx, precision="fp16")
    report = validate.validate(engine_dir, samples=2)
    assert report.passed, validate.format_report(report)
    assert (report.atol, report.rtol, report.min_cosine) == (1e-2, 1e-2, 0.999)
    data = json.loads(json.dumps(report.to_json()))
    assert data["backend"] == "trt" and data["precision"] == "fp16"
    assert data["tolerances"]["min_cosine"] == 0.999 and "fp16 engine" in data["tolerances"]["reason"]
    assert data["divergence_check"].startswith("not checked")
    assert all(s["discrete_divergence"] is None for s in data["samples"])
    assert 5e-4 < data["max_rel"] < 2e-3  # the engine's error was measured, not hidden
    text = validate.format_report(report)
    assert "(TensorRT fp16 engine)" in text and "min cosine 0.999" in text and "defaults for a fp16 engine" in text
    assert "discrete divergence not checked" in text.splitlines()[-1]

    with pytest.raises(ValidationFailed) as failed:  # explicit tolerances win over the precision's
        validate.run(engine_dir, samples=2, atol=1e-4, rtol=1e-4)
    assert failed.value.report["tolerances"]["reason"].startswith("--atol, --rtol given")


def test_validate_fp32_engine_keeps_the_user_tolerances(fake_gpu, convnet_onnx, tmp_path):
    from tcexport.validate import equality as validate

    engine_dir = make_engine_dir(tmp_path / "engine", convnet_onnx, precision="fp32")
    report = validate.validate(engine_dir, samples=1, atol=2e-4)
    assert report.passed and (report.atol, report.rtol, report.min_cosine) == (2e-4, 1e-4, None)
    with pytest.raises(UsageError, match="outside the engine's optimization profile"):
        validate.validate(engine_dir, samples=2, batches=(1, 9))


def test_validate_onnx_is_unchanged(convnet_onnx):
    from tcexport.validate import equality as validate

    report = validate.validate(convnet_onnx, samples=2)
    assert report.passed and (report.atol, report.rtol, report.min_cosine) == (1e-4, 1e-4, None)
    assert report.backend == "ort" and report.divergence_check == "ONNX Runtime size tensors"
    assert all(s["discrete_divergence"] is False for s in report.samples)
    assert validate.format_report(report).splitlines()[0] == \
        f"validate {convnet_onnx}: 2 samples, atol 0.0001, rtol 0.0001"


def test_bench_fake_engine_next_to_onnx_runtime(fake_gpu, tiny_onnx, tmp_path):
    from tcexport.bench import session

    engine_dir = make_engine_dir(tmp_path / "tiny-trt", tiny_onnx)
    results = session.run([tiny_onnx, engine_dir], batches=[1, 2], warmup=1, iters=3, include_copies=True,
                          cuda_graph=True)
    json.dumps(results)
    ort_entry, engine_entry = results["artifacts"]
    assert ort_entry["backend"] == "ort" and "cuda_graph" not in ort_entry
    assert engine_entry["backend"] == "trt" and engine_entry["precision"] == "fp16" and engine_entry["cuda_graph"]
    assert engine_entry["device_fields"] == ["h2d_ms", "gpu_compute_ms", "d2h_ms"]
    assert results["settings"]["include_copies"] and results["settings"]["cuda_graph"]
    for entry in results["results"]:
        if entry["artifact"] == "tiny":
            assert not {"gpu_compute_ms", "h2d_ms", "d2h_ms"} & set(entry)
        else:
            assert entry["gpu_compute_ms"]["median"] == 1.5 and entry["h2d_ms"]["max"] == 0.25
            assert entry["d2h_ms"]["min"] == 0.25 and entry["iters"] == 3
    with pytest.raises(UsageError, match="outside the engine's optimization profile"):
        session.run([engine_dir], batches=[16], warmup=0, iters=1)


# --- clean failure without TensorRT: running engines -------------------------------------------------------------


@pytest.mark.skipif(tensorrt_importable(), reason="TensorRT is installed here; the missing-TensorRT path is not reachable")
def test_validate_and_bench_engine_without_tensorrt_fail_cleanly(tiny_onnx, tmp_path):
    engine_dir = make_engine_dir(tmp_path / "engine", tiny_onnx)
    for command in ("validate", "bench"):
        result = run_cli(command, engine_dir, cwd=tmp_path)
        assert_usage_error(result)
        assert "tensorrt" in result.stderr and "tcexport[trt]" in result.stderr and str(engine_dir) in result.stderr


# --- real engines: validate and bench through the CLI (need TensorRT and an NVIDIA GPU) --------------------------


@pytest.mark.trt
@pytest.mark.gpu
@needs_engine
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cli_validate_engine(convnet_onnx, tmp_path, precision):
    from tcexport.validate import equality as validate

    plan = trt_build.make_plan(convnet_onnx, trt_device.require_tensorrt().__version__, precision, "1,1,8")
    engine_dir = tmp_path / f"engine-{precision}"
    sidecar = trt_build.build_engine(convnet_onnx, engine_dir, plan)
    assert sidecar["records"]  # the provenance validate rebuilds the reference from travels with the engine
    report_path = tmp_path / "validate.json"
    result = run_cli("validate", engine_dir, "--samples", "2", "--json", report_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"(TensorRT {precision} engine)" in result.stdout and "tolerances:" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["backend"] == "trt" and report["precision"] == precision
    assert (report["atol"], report["rtol"], report["min_cosine"]) == validate.tolerances_for(precision)
    assert report["divergence_check"].startswith("not checked")


@pytest.fixture(scope="module")
def ort_and_engine_builds(tmp_path_factory):
    """The tiny model built twice: ONNX Runtime (CPU) and a TensorRT fp16 engine with batches 1..2."""
    if _ENGINE_SKIP:
        pytest.skip(_ENGINE_SKIP)
    from tcexport.backends import ort as ort_backend

    root = tmp_path_factory.mktemp("builds")
    onnx_path = root / "tiny.onnx"
    onnx.save(tiny_model(), onnx_path)
    ort_backend.build(onnx_path, root / "tiny-ort")
    plan = trt_build.make_plan(onnx_path, trt_device.require_tensorrt().__version__, "fp16", "1,2,2")
    trt_build.build_engine(onnx_path, root / "tiny-trt", plan)
    return root / "tiny-ort", root / "tiny-trt"


@pytest.mark.trt
@pytest.mark.gpu
@needs_engine
@pytest.mark.parametrize("extra", [[], ["--include-copies"], ["--cuda-graph"], ["--include-copies", "--cuda-graph"]])
def test_cli_bench_engine_next_to_ort(ort_and_engine_builds, tmp_path, extra):
    ort_dir, engine_dir = ort_and_engine_builds
    out = tmp_path / "bench.json"
    result = run_cli("bench", ort_dir, engine_dir, "--batch", "1,2", "--iters", "20", "--warmup", "3",
                     "--json", out, *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "gpu" in result.stdout
    data = json.loads(out.read_text())
    ort_entry, engine_entry = data["artifacts"]
    assert ort_entry["backend"] == "ort" and engine_entry["backend"] == "trt"
    assert engine_entry["cuda_graph"] is ("--cuda-graph" in extra), engine_entry["cuda_graph_note"]
    copies = "--include-copies" in extra
    for entry in data["results"]:
        if entry["artifact"] == "tiny-ort":
            assert not {"gpu_compute_ms", "h2d_ms", "d2h_ms"} & set(entry)
            continue
        gpu = entry["gpu_compute_ms"]
        assert gpu["min"] > 0 and entry["iters"] == 20
        assert gpu["median"] <= entry["latency_ms"]["median"]  # host wall time brackets the device work
        assert ("h2d_ms" in entry and "d2h_ms" in entry) is copies
        if copies:
            assert entry["h2d_ms"]["min"] > 0 and entry["d2h_ms"]["min"] > 0


# --- plugins: which ones a build loads, and when -----------------------------------------------------------------

from tcexport.backends import trt_plugins  # noqa: E402


def _plugin_graph(with_function: bool = False, mask: bool = False) -> onnx.ModelProto:
    """x -> tcexport::ToMeMerge (a plugin node, optionally backed by a local function) -> y."""
    names = ["x", "metric", "size"] + (["mask"] if mask else [])
    node = helper.make_node("ToMeMerge", names, ["y", "size_out"], domain="tcexport", name="tc_blk0_tome", r=2,
                            protected=1, plugin_namespace="tcexport", plugin_version="1", aot=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 9, 4])
                                            for n in names],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 7, 4])])
    functions = []
    if with_function:
        body = [helper.make_node("Identity", ["x"], ["y"]), helper.make_node("Identity", ["size"], ["size_out"])]
        functions = [helper.make_function("tcexport", "ToMeMerge", names, ["y", "size_out"], body,
                                          [helper.make_opsetid("", 18)], attributes=["r", "protected"])]
    return helper.make_model(graph, functions=functions, ir_version=10,
                             opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("tcexport", 1)])


@pytest.fixture
def library(tmp_path) -> Path:
    path = tmp_path / "libtcexport_plugins.so"
    path.write_bytes(b"\x7fELF fake plugin library")
    return path


def test_auto_loads_nothing_without_plugin_only_nodes(library):
    assert trt_plugins.choose("auto", tiny_model(), "10.3", library=library).kind == "none"
    # --impl function: TensorRT inlines the bodies, so auto leaves the plugins out
    assert trt_plugins.choose("auto", _plugin_graph(with_function=True), "10.13", library=library).kind == "none"


def test_auto_takes_the_library_then_the_python_plugins(library, monkeypatch):
    model = _plugin_graph()
    chosen = trt_plugins.choose("auto", model, "10.3", library=library)
    assert (chosen.kind, chosen.path) == ("library", str(library.resolve()))
    record = chosen.to_json()
    import hashlib

    assert record["sha256"] == hashlib.sha256(library.read_bytes()).hexdigest()
    monkeypatch.setattr(trt_plugins, "find_library", lambda: None)
    python = trt_plugins.choose("auto", model, "10.13", numpy_version="2.3.1")
    assert python.kind == "python" and python.path == "tcexport.plugins.python"
    assert python.versions["ptx_isa"] == "8.0" and python.versions["aot"] is True
    with pytest.raises(UsageError, match="TensorRT 10.3 has no Python plugins"):
        trt_plugins.choose("auto", model, "10.3", numpy_version="2.3.1")  # JetPack 6 without the C++ library


def test_auto_finds_the_library_from_the_environment(library, monkeypatch):
    monkeypatch.setenv(trt_plugins.LIBRARY_ENV, str(library))
    assert trt_plugins.choose("auto", _plugin_graph(), "10.3").path == str(library.resolve())


def test_plugin_choices_refuse_what_cannot_work(library, tmp_path):
    model = _plugin_graph()
    with pytest.raises(UsageError, match="--plugins none cannot build it"):
        trt_plugins.choose("none", model, "10.13")
    assert trt_plugins.choose("none", tiny_model(), "10.13").kind == "none"
    with pytest.raises(UsageError, match="no such file"):
        trt_plugins.choose(str(tmp_path / "missing.so"), model, "10.13")
    with pytest.raises(UsageError, match="auto, none, python or a plugin library"):
        trt_plugins.choose("cpp", model, "10.13")
    with pytest.raises(UsageError, match="10.6"):
        trt_plugins.choose("python", model, "10.5", numpy_version="1.26.4")
    with pytest.raises(UsageError, match="passes a mask"):
        trt_plugins.choose("python", _plugin_graph(mask=True), "11.4", numpy_version="2.4.0")
    assert trt_plugins.choose(str(library), _plugin_graph(mask=True), "10.3").kind == "library"  # C++ takes masks


@pytest.mark.parametrize("version, numpy_version, broken", [
    ("10.12", "2.4.0", False), ("10.13", "2.3.5", False), ("10.13", "2.4.0", True), ("11.0", "2.4.1", True),
    ("11.3", "2.5.0", True), ("11.4", "2.4.0", False), ("10.13", "2.4.0rc1", True), ("11.0", "1.26.4", False),
])
def test_numpy_24_field_parsing_bug_is_guarded(version, numpy_version, broken):
    """TensorRT 10.13-11.3 parse Python plugin fields with int() on a 1-element array; NumPy 2.4 refuses that."""
    assert trt_plugins.numpy_breaks_python_plugins(version, numpy_version) is broken
    if broken:
        with pytest.raises(UsageError, match="numpy<2.4"):
            trt_plugins.choose("python", _plugin_graph(), version, numpy_version=numpy_version)
    elif trt_versions.supports_python_plugins(version):
        assert trt_plugins.choose("python", _plugin_graph(), version, numpy_version=numpy_version).kind == "python"


def test_the_numpy_behaviour_the_guard_is_about():
    """What NumPy >= 2.4 does with int() on a 1-element array (the guard's premise), on this machine's NumPy."""
    one = np.array([3], dtype=np.int32)
    major, minor = (int(p) for p in np.__version__.split(".")[:2])
    if (major, minor) >= (2, 4):
        with pytest.raises(TypeError):
            int(one)
    else:
        assert int(one) == 3  # older NumPy: allowed (deprecated since 1.25)


@pytest.mark.parametrize("version, flags", [("10.3", ()), ("10.14", ()), ("10.15", ("ENABLE_PLUGIN_OVERRIDE",)),
                                            ("11.0", ("ENABLE_PLUGIN_OVERRIDE",))])
def test_parser_flag_plugin_override_where_the_version_needs_it(version, flags, library):
    loaded = trt_plugins.PluginLoad("library", str(library))
    assert trt_plugins.parser_flags(version, loaded) == flags
    assert trt_plugins.parser_flags(version, trt_plugins.PluginLoad("none")) == ()


def test_engine_plugins_come_back_from_the_sidecar(library):
    record = trt_plugins.choose(str(library), _plugin_graph(), "10.3").to_json()
    again = trt_plugins.from_sidecar({"plugins": record})
    assert (again.kind, again.path) == ("library", str(library.resolve()))
    library.write_bytes(b"rebuilt")
    with pytest.raises(UsageError, match="changed since the engine was built"):
        trt_plugins.from_sidecar({"plugins": record})
    library.unlink()
    with pytest.raises(UsageError, match="missing"):
        trt_plugins.from_sidecar({"plugins": record})
    assert trt_plugins.from_sidecar({}).kind == "none"  # engines built before plugins existed


# --- building on a fake TensorRT: what the network gets ----------------------------------------------------------


class _Enum:
    def __init__(self, **members):
        for name, value in members.items():
            setattr(self, name, value)


class FakeBuild:
    """A tensorrt module for build_engine: records the order of calls, flags, and the graph the parser reads."""

    def __init__(self, version: str):
        self.__version__ = version
        self.events: list[str] = []
        self.parsed: onnx.ModelProto | None = None
        self.network_flags = None
        self.builder_flags: list[str] = []
        self.parser_flags: list[str] = []
        self.NetworkDefinitionCreationFlag = _Enum(STRONGLY_TYPED=1, PREFER_AOT_PYTHON_PLUGINS=2)
        self.BuilderFlag = _Enum(FP16="FP16", BF16="BF16", OBEY_PRECISION_CONSTRAINTS="OBEY")
        self.OnnxParserFlag = _Enum(ENABLE_PLUGIN_OVERRIDE="ENABLE_PLUGIN_OVERRIDE", NATIVE_INSTANCENORM="NI")
        self.MemoryPoolType = _Enum(WORKSPACE="WORKSPACE")
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                pass

        class Registry:
            def load_library(self, path):
                fake.events.append(f"load_library {Path(path).name}")
                return object()

        class Network:
            num_inputs = num_outputs = 1

            def get_input(self, i):
                return SimpleTensor("x")

            def get_output(self, i):
                return SimpleTensor("y")

        class Parser:
            def __init__(self, network, logger):
                pass

            def set_flag(self, flag):
                fake.parser_flags.append(flag)

            def parse_from_file(self, path):
                fake.events.append("parse")
                fake.parsed = onnx.load(path)
                return True

        class Config:
            def set_flag(self, flag):
                fake.builder_flags.append(flag)

            def set_memory_pool_limit(self, pool, size):
                pass

            def add_optimization_profile(self, profile):
                pass

        class Profile:
            def set_shape(self, *args):
                pass

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.network_flags = flags
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.events.append("build")
                return b"engine bytes"

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser
        self._registry = Registry()

    def get_plugin_registry(self):
        return self._registry

    @staticmethod
    def init_libnvinfer_plugins(logger, namespace):
        return True


class SimpleTensor:
    def __init__(self, name):
        self.name, self.shape, self.dtype = name, (-1, 4), type("DataType", (), {"name": "FLOAT"})()


@pytest.fixture(scope="module")
def tome_onnx(tmp_path_factory) -> Path:
    """A 3-block ViT (65 tokens, width 65) with ToMe r=8 at every block, as standard ONNX ops."""
    from tcexport.compress import rewrite as compress
    from tcexport.export import exporter as export
    from tcexport.models import sources

    folder = tmp_path_factory.mktemp("tome_trt")
    exported = folder / "tiny.onnx"
    export.export_to_file(sources.load("py:tests.fixtures.factories:vit_dim_equals_tokens", input_shape="3x32x32",
                                       seed=0), exported)
    compress.compress_file(exported, folder / "tome.onnx", r="8")
    compress.compress_file(exported, folder / "tome_plugin.onnx", r="8", impl="plugin")
    return folder / "tome.onnx"


def _build_on_fake(monkeypatch, tmp_path, onnx_path: Path, version: str, precision: str, plugins: str = "auto"):
    fake = FakeBuild(version)
    monkeypatch.setattr(trt_device, "require_tensorrt", lambda: fake)
    device = trt_device.DeviceInfo("Fake GPU", (8, 7), 8 << 30)
    plan = trt_build.make_plan(onnx_path, version, precision, "1,1,4", plugins=plugins, numpy_version="2.3.0")
    data = trt_build.build_engine(onnx_path, tmp_path / f"engine-{version}-{precision}", plan, device=device)
    return fake, data


DECIDING_OPS = ("TopK", "ArgMax", "ReduceMax")


def _deciding_types(model: onnx.ModelProto) -> dict[str, set[int]]:
    """Element type of every input and output of the deciding layers of the ToMe stages (score MatMul, TopK,
    ArgMax, ReduceMax) and of the size arithmetic, in the graph the parser was given."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    found: dict[str, set[int]] = {}
    for node in inferred.graph.node:
        if not re.match(r"tc_blk\d+_tome/", node.name):
            continue
        label = node.name.split("/", 1)[1]
        if node.op_type in DECIDING_OPS or label in ("scores", "node_max", "node_idx") or "size" in label:
            floats = {types[n] for n in [*node.input, *node.output] if n and types.get(n) in
                      (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)}
            found.setdefault(node.op_type, set()).update(floats)
    return found


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_keeps_every_deciding_layer_fp32_on_10x_and_11x(monkeypatch, tmp_path, tome_onnx, precision):
    seen = {}
    for version in ("10.3", "10.13", "11.0"):
        if precision == "bf16" and version == "10.3":
            continue  # same code path as 10.13; one bf16 10.x build is enough
        fake, data = _build_on_fake(monkeypatch, tmp_path, tome_onnx, version, precision)
        strongly = fake.network_flags == (1 << 1 if version.startswith("10.") else 0)
        assert strongly, (version, fake.network_flags)  # 10.x: STRONGLY_TYPED; 11.x: strongly typed anyway
        assert fake.builder_flags == []  # no FP16/BF16 flag: no "fp16 where faster"
        assert data["plan"]["precision_mode"] == "graph types (strongly typed)"
        types = _deciding_types(fake.parsed)
        assert {"MatMul", "TopK"} <= set(types)  # ToMe decides with TopK alone (best partner, ranking, order)
        assert all(types[op] == {TensorProto.FLOAT} for op in ("MatMul", "TopK")), types
        assert all(t <= {TensorProto.FLOAT} for t in types.values()), (version, types)  # sizes too
        low = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.BFLOAT16
        assert any(t.data_type == low for t in fake.parsed.graph.initializer)  # the rest did go low
        seen[version] = types
    assert len({json.dumps({k: sorted(v) for k, v in t.items()}, sort_keys=True) for t in seen.values()}) == 1


def test_fp32_on_10x_stays_weakly_typed(monkeypatch, tmp_path, tome_onnx):
    fake, data = _build_on_fake(monkeypatch, tmp_path, tome_onnx, "10.3", "fp32")
    assert fake.network_flags == 0 and fake.builder_flags == [] and data["plan"]["precision_mode"] == "fp32"


def test_plugins_load_before_parsing_and_are_recorded(monkeypatch, tmp_path, tome_onnx, library):
    plugin_graph = tome_onnx.parent / "tome_plugin.onnx"
    fake, data = _build_on_fake(monkeypatch, tmp_path, plugin_graph, "10.15", "fp32", plugins=str(library))
    assert fake.events == ["load_library libtcexport_plugins.so", "parse", "build"]
    assert fake.parser_flags == ["ENABLE_PLUGIN_OVERRIDE"]
    record = json.loads((tmp_path / "engine-10.15-fp32" / artifacts.SIDECAR).read_text())["plugins"]
    assert record["kind"] == "library" and record["path"] == str(library.resolve())
    assert len(record["sha256"]) == 64 and record["versions"]["tensorrt"] == "10.15"
    plain, _ = _build_on_fake(monkeypatch, tmp_path, tome_onnx, "10.15", "fp32")  # auto, no plugin nodes
    assert plain.events == ["parse", "build"] and plain.parser_flags == []


def test_runner_loads_the_build_plugins_before_deserializing(fake_gpu, tiny_onnx, tmp_path, library):
    engine_dir = make_engine_dir(tmp_path / "engine", tiny_onnx)
    sidecar_path = engine_dir / artifacts.SIDECAR
    data = json.loads(sidecar_path.read_text())
    data["plugins"] = trt_plugins.choose(str(library), _plugin_graph(), "10.13").to_json()
    sidecar_path.write_text(json.dumps(data))
    events = []
    fake = trt_device.require_tensorrt()
    fake.get_plugin_registry = staticmethod(lambda: type("R", (), {
        "load_library": staticmethod(lambda path: events.append(("load", Path(path).name)) or object())})())
    runtime = fake.Runtime

    class RecordingRuntime(runtime):
        def deserialize_cuda_engine(self, blob):
            events.append(("deserialize", len(blob)))
            return super().deserialize_cuda_engine(blob)

    fake.Runtime = RecordingRuntime
    trt_engine.open_engine_runner(artifacts.resolve(engine_dir), "with-plugins")
    assert [e[0] for e in events] == ["load", "deserialize"] and events[0][1] == library.name


# --- extras: which TensorRT each one installs --------------------------------------------------------------------


def _extras() -> dict[str, list[str]]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def resolve(name: str) -> list[str]:
        found = []
        for requirement in extras[name]:
            if requirement.startswith(f"{project['name']}["):
                for inner in requirement.split("[", 1)[1].rstrip("]").split(","):
                    found += resolve(inner.strip())
            else:
                found.append(requirement)
        return found

    return {name: resolve(name) for name in extras}


# Releases on PyPI (pip index versions tensorrt-cu12 / tensorrt-cu13, November 2026): both names carry 10.x and 11.x.
PUBLISHED = ["10.0.1", "10.3.0", "10.9.0.34", "10.13.3.9", "10.16.1.11", "11.0.0.114", "11.4.0.106"]


@pytest.mark.parametrize("extra, package, major", [("trt10", "tensorrt-cu12", 10), ("trt11", "tensorrt-cu13", 11),
                                                   ("trt", "tensorrt-cu13", 11)])
def test_trt_extras_pin_one_tensorrt_major(extra, package, major):
    from packaging.requirements import Requirement

    (requirement,) = [Requirement(r) for r in _extras()[extra]]
    assert requirement.name == package
    allowed = [v for v in PUBLISHED if requirement.specifier.contains(v, prereleases=False)]
    assert allowed and {int(v.split(".")[0]) for v in allowed} == {major}
    if major == 10:
        assert "10.3.0" in allowed and "10.0.1" not in allowed  # JetPack 6's 10.3 and newer 10.x


@pytest.mark.slow
@pytest.mark.parametrize("extra, major", [("trt10", 10), ("trt11", 11)])
def test_trt_extras_resolve_with_pip(extra, major):
    """pip's own resolution (--dry-run --no-deps, needs the package index; a few seconds each)."""
    import subprocess
    import sys

    (requirement,) = _extras()[extra]
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed",
                           "--quiet", "--report", "-", requirement], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"pip could not reach a package index: {done.stderr.strip().splitlines()[-1:]}")
    report = json.loads(done.stdout[done.stdout.index("{"):])
    (item,) = report["install"]
    assert int(item["metadata"]["version"].split(".")[0]) == major


def test_plugins_option_is_trt_only(tiny_onnx, tmp_path):
    result = run_cli("build", tiny_onnx, "--plugins", "python", "-o", tmp_path / "out")
    assert_usage_error(result)
    assert "--plugins apply to --backend trt" in result.stderr and not (tmp_path / "out").exists()


@pytest.mark.trt
@pytest.mark.gpu
@needs_engine
@pytest.mark.parametrize("plugins", ["python", "auto"])
def test_plugin_engine_matches_the_subgraph_model(tome_onnx, tmp_path, plugins):
    """The --impl plugin graph built with tcexport's plugins (python: the Triton ones; auto: the C++ library when
    plugins/cpp/build has one, else Python) computes what the standard-ops graph computes in ONNX Runtime."""
    import onnxruntime as ort

    plugin_graph = tome_onnx.parent / "tome_plugin.onnx"
    if plugins == "python" and not trt_versions.supports_aot_plugins(trt_device.require_tensorrt().__version__):
        pytest.skip("this TensorRT has no ahead-of-time Python plugins (10.9+)")
    out = tmp_path / f"engine-{plugins}"
    sidecar = trt_build.build(plugin_graph, out, precision="fp32", batch="1,2,4", plugins=plugins)
    assert sidecar["plugins"]["kind"] in ("python", "library")
    runner = trt_engine.open_engine_runner(artifacts.resolve(out))
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    expected = ort.InferenceSession(str(tome_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    got = runner.infer({"input": x})
    np.testing.assert_allclose(next(iter(got.values())), expected, atol=1e-3, rtol=0)
