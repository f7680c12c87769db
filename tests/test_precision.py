"""tcexport.backends.precision: float32 -> float16/bfloat16 graphs for strongly typed TensorRT, checked on ONNX Runtime CPU."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tcexport.core import metadata
from tcexport.backends import precision
from tcexport.core.errors import UsageError

F, H, B = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16


@pytest.fixture(scope="module")
def vit_fp32(tmp_path_factory) -> Path:
    """timm vit_tiny_patch16_224 with random weights, exported once for this module (dynamo, opset 18, dynamic batch)."""
    import timm
    import torch

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(2, 3, 224, 224)
    program = torch.onnx.export(model, (x,), dynamo=True, opset_version=18, verbose=False,
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))
    path = (tmp_path_factory.mktemp("precision") / "vit.onnx").resolve()
    program.save(str(path))
    return path


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, 3, 224, 224)).astype(np.float32)


def run(model_or_path, feeds) -> np.ndarray:
    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def input_types(model: onnx.ModelProto) -> dict[str, int]:
    """elem_type of every tensor the graph knows, after type inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in
             list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return types


def assert_clean_graph(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)  # sorted, SSA, types consistent
    outputs = [o for n in model.graph.node for o in n.output if o]
    assert len(outputs) == len(set(outputs))


def test_fp16_vit_runs_on_ort_cpu_within_fp16_tolerance(vit_fp32, pixels):
    converted, report = precision.convert(onnx.load(str(vit_fp32)), "fp16")
    assert_clean_graph(converted)
    name = converted.graph.input[0].name
    reference = run(vit_fp32, {name: pixels})
    result = run(converted, {name: pixels})
    assert result.dtype == np.float32  # keep_io_types: float32 at the boundary
    assert cosine_rows(reference, result).min() > 0.999
    scale = np.abs(reference).max()
    assert np.abs(reference - result).max() <= 0.02 * scale, (np.abs(reference - result).max(), scale)
    assert report.casts_added > 0 and report.tensors_low > report.tensors_fp32
    assert metadata.read(converted, precision.PRECISION_RECORD)["precision"] == "fp16"


def test_fp16_keeps_sensitive_ops_in_fp32(vit_fp32):
    converted, _ = precision.convert(onnx.load(str(vit_fp32)), "fp16")
    types = input_types(converted)
    sensitive = [n for n in converted.graph.node if n.op_type in ("LayerNormalization", "Softmax", "Erf")]
    assert {n.op_type for n in sensitive} == {"LayerNormalization", "Softmax", "Erf"}
    for node in sensitive:
        assert types[node.input[0]] == F, node.name
    matmuls = [n for n in converted.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(types[n.input[0]] == H for n in matmuls)
    assert converted.graph.input[0].type.tensor_type.elem_type == F
    assert converted.graph.output[0].type.tensor_type.elem_type == F


def test_fp16_without_io_casts_takes_fp16(vit_fp32, pixels):
    converted, _ = precision.convert(onnx.load(str(vit_fp32)), "fp16", keep_io_types=False)
    assert converted.graph.input[0].type.tensor_type.elem_type == H
    name = converted.graph.input[0].name
    result = run(converted, {name: pixels.astype(np.float16)})
    assert result.dtype == np.float16
    assert cosine_rows(run(vit_fp32, {name: pixels}), result).min() > 0.999


def test_bf16_types_and_rounding_from_fp32(vit_fp32, pixels):
    original = onnx.load(str(vit_fp32))
    converted, report = precision.convert(original, "bf16")
    assert_clean_graph(converted)
    types = input_types(converted)
    matmuls = [n for n in converted.graph.node if n.op_type == "MatMul"]
    assert matmuls and all(types[n.input[0]] == B for n in matmuls)
    conv = next(n for n in converted.graph.node if n.op_type == "Conv")
    assert types[conv.input[0]] == F  # ONNX Conv takes bfloat16 only from opset 22: kept in float32
    # every bfloat16 weight is the direct rounding of its float32 value (no detour through float16's range)
    originals = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    converted_bf16 = [t for t in converted.graph.initializer if t.data_type == B]
    assert converted_bf16
    for tensor in converted_bf16:
        expected = originals[tensor.name].astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(numpy_helper.to_array(tensor).view(np.uint16), expected.view(np.uint16))
    # ONNX Runtime's CPU provider has no bfloat16 kernels, so run the same graph with its bfloat16 types widened
    # back to float32: this checks the wiring (Casts, blocked ops) and the effect of bfloat16 weights.
    widened = _widen_bfloat16(converted)
    name = converted.graph.input[0].name
    assert cosine_rows(run(vit_fp32, {name: pixels}), run(widened, {name: pixels})).min() > 0.99


def test_fp32_is_an_unchanged_copy(vit_fp32):
    original = onnx.load(str(vit_fp32))
    converted, report = precision.convert(original, "fp32")
    assert converted is not original and converted == original and report.casts_added == 0


def test_functions_and_custom_ops_stay_fp32():
    """A call to a model-local function (e.g. a compression op) keeps float32 around it; the body is untouched."""
    body = [helper.make_node("Mul", ["a", "a"], ["sq"]), helper.make_node("ReduceSum", ["sq"], ["s"], keepdims=1)]
    fn = helper.make_function("tcexport.local", "Energy", ["a"], ["s"], body, [helper.make_opsetid("", 18)])
    weight = numpy_helper.from_array(np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Energy", ["h"], ["e"], domain="tcexport.local", name="energy"),
             helper.make_node("Add", ["h", "e"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 8])],
                              [helper.make_tensor_value_info("y", F, [2, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("tcexport.local", 1)],
                              functions=[fn], ir_version=10)
    converted, report = precision.convert(model, "fp16")
    assert report.blocked_nodes == ["energy"]
    assert converted.functions[0] == model.functions[0]
    types = input_types(converted)
    energy = next(n for n in converted.graph.node if n.name == "energy")
    assert types[energy.input[0]] == F and types["w"] == H
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    np.testing.assert_allclose(run(converted, {"x": x}), run(model, {"x": x}), rtol=2e-2, atol=2e-2)


def test_refuses_reduced_precision_input_and_unknown_precision(vit_fp32):
    converted, _ = precision.convert(onnx.load(str(vit_fp32)), "fp16", keep_io_types=False)
    with pytest.raises(UsageError):
        precision.convert(converted, "fp16")
    with pytest.raises(UsageError):
        precision.convert(converted, "int8")


def test_convert_file_writes_atomically(vit_fp32, tmp_path):
    out = tmp_path / "vit.fp16.onnx"
    report = precision.convert_file(vit_fp32, out, "fp16")
    assert out.exists() and report.precision == "fp16"
    assert precision.float_types(onnx.load(str(out)))["FLOAT16"] == report.tensors_low
    assert [p.name for p in tmp_path.iterdir()] == ["vit.fp16.onnx"]


def _widen_bfloat16(model: onnx.ModelProto) -> onnx.ModelProto:
    widened = onnx.ModelProto()
    widened.CopyFrom(model)
    graph = widened.graph
    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == B:
            values = numpy_helper.to_array(tensor).astype(np.float32)
            graph.initializer[index].CopyFrom(numpy_helper.from_array(values, tensor.name))
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == B:
            value.type.tensor_type.elem_type = F
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == B:
                attr.i = F
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == B:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
    return widened
