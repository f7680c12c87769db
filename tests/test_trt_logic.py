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

from tcexport import artifacts, inputs
from tcexport.backends import trt
from tcexport.errors import UsageError
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
        trt.require_tensorrt()
        return True
    except UsageError:
        return False


def gpu_present() -> bool:
    try:
        trt.require_gpu()
        return True
    except UsageError:
        return False


# --- versions and switches ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("10.3", (10, 3, 0)), ("10.13.3", (10, 13, 3)), ("10.3.0.30", (10, 3, 0)), ("11.0", (11, 0, 0)),
    (" 10.14.1.48 ", (10, 14, 1)), ("10.3.0.post1", (10, 3, 0)),
])
def test_parse_version(text, expected):
    version = trt.parse_version(text)
    assert (version.major, version.minor, version.patch) == expected
    assert trt.parse_version(version) is version


@pytest.mark.parametrize("bad", ["", "10", "ten", "9.0", "8.6.1", "12.0", "10.x"])
def test_parse_version_rejects(bad):
    with pytest.raises(UsageError):
        trt.parse_version(bad)


@pytest.mark.parametrize("version, strong", [("10.3", False), ("10.13", False), ("11.0", True)])
def test_strong_typing_per_version(version, strong):
    assert trt.uses_strong_typing(version) is strong


@pytest.mark.parametrize("version, precision, flags, convert", [
    ("10.3", "fp32", (), False), ("10.3", "fp16", ("FP16",), False), ("10.3", "bf16", ("BF16",), False),
    ("10.13", "fp32", (), False), ("10.13", "fp16", ("FP16",), False), ("10.13", "bf16", ("BF16",), False),
    ("11.0", "fp32", (), False), ("11.0", "fp16", (), True), ("11.0", "bf16", (), True),
])
def test_builder_flags_and_graph_conversion(version, precision, flags, convert):
    assert trt.builder_flags(version, precision) == flags
    assert trt.converts_graph(version, precision) is convert


def test_unknown_precision_is_a_usage_error():
    with pytest.raises(UsageError):
        trt.builder_flags("10.3", "int8")


def test_plugin_feature_switches():
    assert not trt.supports_python_plugins("10.3") and trt.supports_python_plugins("10.6")
    assert not trt.supports_aot_plugins("10.8") and trt.supports_aot_plugins("10.9")
    assert not trt.prefers_plugin_over_local_function("10.6") and trt.prefers_plugin_over_local_function("10.7")
    assert not trt.reads_plugin_namespace_from_domain("10.9") and trt.reads_plugin_namespace_from_domain("10.13")
    spec = trt.TCEXPORT_PLUGINS[("tcexport", "ToMeMerge")]
    assert trt.plugin_node_attributes(spec) == {"plugin_namespace": "tcexport", "plugin_version": "1"}


# --- profiles, workspace -----------------------------------------------------------------------------------------


def test_profile_only_the_batch_axis_varies():
    specs = [inputs.InputSpec("input_ids", ["batch", 128], "int64"), inputs.InputSpec("mask", ["batch", 128], "int64")]
    shapes = trt.profile_shapes(specs, (1, 4, 8))
    for name in ("input_ids", "mask"):
        assert shapes[name] == trt.ProfileShape((1, 128), (4, 128), (8, 128))
    assert trt.profile_shapes(specs)["mask"] == trt.ProfileShape((1, 128), (1, 128), (8, 128))  # default 1,1,8


def test_profile_fixed_batch():
    specs = [inputs.InputSpec("x", [2, 3, 224, 224])]
    assert trt.profile_shapes(specs)["x"] == trt.ProfileShape((2, 3, 224, 224), (2, 3, 224, 224), (2, 3, 224, 224))
    assert trt.profile_shapes(specs, (2, 2, 2))["x"].max == (2, 3, 224, 224)
    with pytest.raises(UsageError, match="fixed batch of 2"):
        trt.profile_shapes(specs, (1, 1, 8))


def test_profile_rejects_other_dynamic_axes():
    with pytest.raises(UsageError):
        trt.profile_shapes([inputs.InputSpec("ids", ["batch", "seq"], "int64")], (1, 1, 8))


@pytest.mark.parametrize("text, expected", [("1,1,8", (1, 1, 8)), ("4", (4, 4, 4)), ("1,8,8", (1, 8, 8))])
def test_parse_batch_range(text, expected):
    assert trt.parse_batch_range(text) == expected


@pytest.mark.parametrize("bad", ["8,1,1", "0,1,2", "1,2", "a,b,c", "1,2,3,4"])
def test_parse_batch_range_rejects(bad):
    with pytest.raises(UsageError):
        trt.parse_batch_range(bad)


def test_workspace_bytes():
    assert trt.workspace_bytes(None) is None
    assert trt.workspace_bytes(1024) == 1 << 30
    with pytest.raises(UsageError):
        trt.workspace_bytes(0)


# --- plan and sidecar --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_plan_per_version(tiny_onnx, version):
    plan = trt.make_plan(tiny_onnx, version, "fp16", "1,2,8", workspace_mb=256, timing_cache="cache.bin")
    assert plan.strongly_typed is (version == "11.0")
    assert plan.builder_flags == (() if version == "11.0" else ("FP16",))
    assert plan.convert_graph is (version == "11.0")
    assert plan.profile == {"x": trt.ProfileShape((1, 4, 16), (2, 4, 16), (8, 4, 16))}
    assert plan.workspace_bytes == 256 << 20 and plan.timing_cache == Path("cache.bin")
    data = json.loads(json.dumps(plan.to_json()))
    assert data["tensorrt_version"] == version and data["profile"]["x"]["max"] == [8, 4, 16]
    assert data["precision_mode"] == ("graph types (strongly typed)" if version == "11.0" else "builder flags")


def make_sidecar(tiny_onnx, version="10.3", precision="fp16") -> dict:
    plan = trt.make_plan(tiny_onnx, version, precision, "1,1,8")
    device = trt.DeviceInfo("Orin (nvgpu)", (8, 7), 8 << 30)
    return trt.sidecar(plan, device=device, tensorrt_version=f"{version}.0.30",
                       engine_inputs=[trt.TensorInfo("x", [-1, 4, 16], "float")],
                       engine_outputs=[trt.TensorInfo("y", [-1, 4, 16], "float")],
                       source_model=tiny_onnx, source_sha256="ab" * 32, records={}, engine_bytes=1234)


def test_sidecar_contents(tiny_onnx):
    data = json.loads(json.dumps(make_sidecar(tiny_onnx)))
    assert data["backend"] == "trt" and data["model_file"] == "model.engine" == trt.ENGINE_FILE
    assert data["tensorrt_version"] == "10.3.0.30"
    assert data["gpu_name"] == "Orin (nvgpu)" and data["compute_capability"] == "8.7"
    assert data["precision"] == "fp16" and data["plan"]["builder_flags"] == ["FP16"]
    assert data["profile"] == {"x": {"min": [1, 4, 16], "opt": [1, 4, 16], "max": [8, 4, 16]}}
    assert data["inputs"][0]["name"] == "x" and data["inputs"][0]["shape"][1:] == [4, 16]
    assert data["engine_outputs"] == [{"name": "y", "shape": [-1, 4, 16], "dtype": "float"}]
    assert data["outputs"] == ["y"]
    assert data["source_sha256"] == "ab" * 32 and data["source_model"] == str(tiny_onnx.resolve())


def test_sidecar_makes_a_build_dir_bench_can_resolve(tiny_onnx, tmp_path):
    build_dir = tmp_path / "engine"
    build_dir.mkdir()
    (build_dir / trt.ENGINE_FILE).write_bytes(b"engine")
    (build_dir / artifacts.SIDECAR).write_text(json.dumps(make_sidecar(tiny_onnx)))
    artifact = artifacts.resolve(build_dir)
    assert artifact.backend == "trt" and artifact.model_path == build_dir / "model.engine"


def test_bf16_needs_ampere():
    trt.check_device_precision(trt.DeviceInfo("Orin", (8, 7)), "bf16")
    trt.check_device_precision(trt.DeviceInfo("T4", (7, 5)), "fp16")
    with pytest.raises(UsageError, match="bf16"):
        trt.check_device_precision(trt.DeviceInfo("T4", (7, 5)), "bf16")


def test_only_the_trt_backend_imports_tensorrt():
    offenders = []
    for path in (ROOT / "tcexport").rglob("*.py"):
        if path.name == "trt.py" and path.parent.name == "backends":
            continue
        if re.search(r"^\s*(import tensorrt|from tensorrt)", path.read_text(), re.MULTILINE):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    source = (ROOT / "tcexport" / "backends" / "trt.py").read_text()
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
        return "TensorRT is not installed (pip install 'tcexport[trt]' on a machine with an NVIDIA GPU)"
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
    sidecar = trt.build(tiny_onnx, out, precision=precision, batch="1,2,8", workspace_mb=256, timing_cache=cache)
    assert sorted(p.name for p in out.iterdir()) == [artifacts.SIDECAR, trt.ENGINE_FILE]
    assert sidecar["backend"] == "trt" and sidecar["precision"] == precision and cache.stat().st_size > 0
    assert sidecar["profile"]["x"] == {"min": [1, 4, 16], "opt": [2, 4, 16], "max": [8, 4, 16]}
    runner = trt.TrtRunner(out / trt.ENGINE_FILE)
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

