"""Opsets 17-23: the methods' opset-18 forms legalized for the model's opset, the fused opset-23 Attention
decomposed with the op's exact semantics (checked against ONNX Runtime's own Attention kernel), and exported
ViT / MiniLM models at opsets 17, 18, 20, 23 compressed with tome and topk and validated."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tcexport.core.errors import UsageError
from tcexport.graph import opset as opset_pass
from tcexport.graph.attention import decompose_attention
from tcexport.methods import get
from tcexport.methods.standalone import build_standalone_model

OPSETS = range(17, 24)
# One instance of every registered method, sized for a 1 + 4x4 token grid.
METHOD_PARAMS = {"tome": {"r": 4}, "topk": {"keep": 0.5, "fuse": True}, "prune-merge": {"dominant": 4, "contextual": 2},
                 "adjacent": {"r": 3}, "pool": {"kernel": 2}, "query": {"keep": 0.5}, "random": {"keep": 0.5},
                 "uniform": {"keep": 0.5}}
N, C, CK = 17, 8, 4


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _random_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        shape = [batch if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.name == "size":
            feeds[value.name] = rng.integers(1, 4, shape).astype(np.float32)
        elif value.name == "mask":
            feeds[value.name] = (rng.random(shape) > 0.3).astype(np.float32)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _at_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """The model declared at `version` and legalized for it (what compress does before the checker)."""
    ir_model = ir.from_proto(model)
    ir_model.opset_imports[""] = version
    opset_pass.legalize(ir_model)
    return ir.to_proto(ir_model)


def _signature(op_type: str, version: int) -> tuple:
    schema = onnx.defs.get_schema(op_type, version, "")
    return tuple(i.name for i in schema.inputs), tuple(sorted(schema.attributes))


@pytest.mark.parametrize("name", sorted(METHOD_PARAMS))
def test_method_ops_legal_and_equal_at_every_opset(name):
    method = get(name)(**METHOD_PARAMS[name])
    original = build_standalone_model(method, N, C, CK, 1, with_mask=True, name_prefix=f"tc_blk0_{name}")
    feeds = _random_feeds(original)
    expected = _session(original).run(None, feeds)
    for version in OPSETS:
        legal = _at_opset(original, version)
        onnx.checker.check_model(legal, full_check=True)  # strict shape inference at that opset
        got = _session(legal).run(None, feeds)
        for want, have in zip(expected, got):
            np.testing.assert_array_equal(want, have)


def test_every_changed_signature_is_handled():
    """Each op the methods emit whose inputs or attributes differ between opsets 17 and 23 is either adapted by
    the pass, or used only in a form that every opset accepts (Pad without its opset-18 axes input)."""
    emitted: dict[str, list[onnx.NodeProto]] = {}
    for name, params in METHOD_PARAMS.items():
        model = build_standalone_model(get(name)(**params), N, C, CK, 1, with_mask=True)
        for node in model.graph.node:
            emitted.setdefault(node.op_type, []).append(node)
    emitted.setdefault("ReduceMean", [])  # graph/insert.py: the head-mean metric and the CLS attention
    changed = {op for op in emitted if len({_signature(op, v) for v in OPSETS}) > 1}
    assert "ReduceMean" in changed and "ReduceMax" in changed  # the onnx.defs comparison sees the axes change
    for op in sorted(changed - opset_pass.HANDLED):
        old_inputs = len(onnx.defs.get_schema(op, 17, "").inputs)
        old_attributes = set(onnx.defs.get_schema(op, 17, "").attributes)
        for node in emitted[op]:
            assert len(node.input) <= old_inputs, (op, list(node.input))
            assert {a.name for a in node.attribute} <= old_attributes, (op, [a.name for a in node.attribute])


def _reduce_model(version: int, op_type: str = "ReduceMean", axes_as_input: bool = True) -> onnx.ModelProto:
    inputs = ["x"]
    attributes = {"keepdims": 0}
    nodes = []
    if axes_as_input:
        nodes.append(helper.make_node("Constant", [], ["axes"], value=helper.make_tensor("a", TensorProto.INT64, [1], [1])))
        inputs.append("axes")
    else:
        attributes["axes"] = [1]
    nodes.append(helper.make_node(op_type, inputs, ["y"], name="reduce", **attributes))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)], ir_version=10)


@pytest.mark.parametrize("op_type", ["ReduceMean", "ReduceMax", "ReduceL2", "ReduceMin", "ReduceSumSquare"])
def test_reduce_axes_move_between_input_and_attribute(op_type):
    x = np.random.default_rng(1).standard_normal((2, 5, 3)).astype(np.float32)
    want = _session(_reduce_model(18, op_type)).run(None, {"x": x})[0]
    down = _at_opset(_reduce_model(18, op_type), 17)  # opset-18 form in an opset-17 model
    node = [n for n in down.graph.node if n.op_type == op_type][0]
    assert list(node.input) == ["x"]
    assert [list(a.ints) for a in node.attribute if a.name == "axes"] == [[1]]
    assert not any(n.op_type == "Constant" for n in down.graph.node)  # the unused axes constant is gone
    onnx.checker.check_model(down, full_check=True)
    np.testing.assert_array_equal(_session(down).run(None, {"x": x})[0], want)
    up = _at_opset(_reduce_model(17, op_type, axes_as_input=False), 18)  # and the other way
    onnx.checker.check_model(up, full_check=True)
    np.testing.assert_array_equal(_session(up).run(None, {"x": x})[0], want)


def test_reduce_sum_keeps_its_axes_input_at_17():
    model = _reduce_model(18, "ReduceSum")
    assert opset_pass.legalize(ir.from_proto(_at_opset(model, 17))) == 0
    onnx.checker.check_model(_at_opset(model, 17), full_check=True)


def test_run_time_axes_are_refused_below_18():
    model = _reduce_model(18)
    model.graph.node.pop(0)
    model.graph.input.append(helper.make_tensor_value_info("axes", TensorProto.INT64, [1]))
    with pytest.raises(UsageError, match="axes computed at run time"):
        _at_opset(model, 17)


@pytest.mark.parametrize("length,parts", [(6, 3), (7, 3)])
def test_split_num_outputs_below_18(length, parts):
    outputs = [f"y{i}" for i in range(parts)]
    node = helper.make_node("Split", ["x"], outputs, name="split", axis=1, num_outputs=parts)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, length])],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, [2, "part"]) for o in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    x = np.arange(2 * length, dtype=np.float32).reshape(2, length)
    want = _session(model).run(None, {"x": x})
    down = _at_opset(model, 17)
    onnx.checker.check_model(down, full_check=True)
    for a, b in zip(want, _session(down).run(None, {"x": x})):
        np.testing.assert_array_equal(a, b)


def test_function_bodies_are_legalized():
    body = _reduce_model(18).graph
    function = helper.make_function("tcexport", "Mean1", ["x"], ["y"], list(body.node),
                                    opset_imports=[helper.make_opsetid("", 18)])
    call = helper.make_node("Mean1", ["x"], ["y"], domain="tcexport")
    graph = helper.make_graph([call], "g", list(body.input), list(body.output))
    model = helper.make_model(graph, functions=[function], ir_version=10,
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("tcexport", 1)])
    ir_model = ir.from_proto(model)
    for fn in ir_model.functions.values():
        fn.opset_imports[""] = 17
    assert opset_pass.legalize(ir_model) == 1
    legal = ir.to_proto(ir_model)
    onnx.checker.check_model(legal, full_check=True)
    x = np.random.default_rng(2).standard_normal((2, 5, 3)).astype(np.float32)
    np.testing.assert_allclose(_session(legal).run(None, {"x": x})[0], x.mean(axis=1), rtol=1e-6)


# --- Attention (opset 23) --------------------------------------------------------------------------------

def _attention_model(rank=4, q_heads=2, kv_heads=2, mask=None, q_len=5, kv_len=5, head=8, v_head=6,
                     **attributes) -> onnx.ModelProto:
    if rank == 4:
        shapes = [["batch", q_heads, q_len, head], ["batch", kv_heads, kv_len, head], ["batch", kv_heads, kv_len, v_head]]
    else:
        shapes = [["batch", q_len, q_heads * head], ["batch", kv_len, kv_heads * head],
                  ["batch", kv_len, kv_heads * v_head]]
        attributes.update(q_num_heads=q_heads, kv_num_heads=kv_heads)
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in zip("qkv", shapes)]
    names = ["q", "k", "v"]
    if mask is not None:
        inputs.append(helper.make_tensor_value_info("mask", mask, ["batch", 1, q_len, kv_len]))
        names.append("mask")
    node = helper.make_node("Attention", names, ["y"], name="attn", **attributes)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)


ATTENTION_CASES = [
    {},
    {"rank": 3, "q_heads": 4, "kv_heads": 4},
    {"rank": 3, "q_heads": 4, "kv_heads": 2},  # grouped-query: each K/V head serves two query heads
    {"q_heads": 4, "kv_heads": 1, "mask": TensorProto.BOOL},
    {"mask": TensorProto.FLOAT, "scale": 0.3},
    {"is_causal": 1},
    {"is_causal": 1, "mask": TensorProto.BOOL, "q_len": 3, "kv_len": 6},
    {"rank": 3, "mask": TensorProto.BOOL, "softmax_precision": TensorProto.FLOAT},
]


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_decomposed_attention_equals_fused_in_ort(case):
    fused = _attention_model(**case)
    decomposed = decompose_attention(fused)
    ops = [n.op_type for n in decomposed.graph.node]
    assert "Attention" not in ops and ops.count("Softmax") == 1 and ops.count("MatMul") == 2
    onnx.checker.check_model(decomposed, full_check=True)
    rng = np.random.default_rng(3)
    for batch in (1, 3):
        feeds = {}
        for value in fused.graph.input:
            shape = [batch if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]
            if value.type.tensor_type.elem_type == TensorProto.BOOL:
                feeds[value.name] = rng.random(shape) > 0.4
                feeds[value.name][0, 0, 0, :] = False  # a fully masked query row: zeros by definition
            else:
                feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
        if "mask" in feeds and feeds["mask"].dtype == np.float32:
            feeds["mask"][0, 0, 1, :2] = -np.inf
        want = _session(fused).run(None, feeds)[0]
        got = _session(decomposed).run(None, feeds)[0]
        assert not np.isnan(got).any()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_decomposed_keys_have_the_layout_blocks_expect():
    """The logits MatMul's right operand is K^T [B, heads, d, N] (graph/blocks.py reads the keys from it)."""
    model = decompose_attention(_attention_model(rank=3, q_heads=2, kv_heads=2, kv_len=7, q_len=7, head=4))
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in inferred.graph.value_info}
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers[softmax.input[0]]
    while node.op_type != "MatMul":
        node = producers[node.input[0]]
    assert shapes[node.input[1]] == ["batch", 2, 4, 7]


@pytest.mark.parametrize("attributes,message", [({"softcap": 30.0}, "softcap"),
                                                ({"q_len": 4, "kv_len": 4, "past": True}, "past_key")])
def test_unsupported_attention_is_refused_in_one_line(attributes, message):
    past = attributes.pop("past", False)
    model = _attention_model(**attributes)
    if past:
        node = model.graph.node[0]
        node.input.extend(["", "past_k", "past_v"])
        model.graph.input.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 2, 3, 8])
                                  for n in ("past_k", "past_v")])
    with pytest.raises(UsageError, match=message) as info:
        decompose_attention(model)
    assert "\n" not in str(info.value)


def test_models_without_attention_are_returned_unchanged():
    model = _reduce_model(23)
    assert decompose_attention(model) is model


# --- exported models at each opset: compress (tome, topk) and validate against eager PyTorch ---------------

MODELS = {"vit": ("timm:vit_tiny_patch16_224", {"input_shape": "3x64x64"}),  # 1 + 4x4 tokens, 12 blocks
          "minilm": ("st:all-MiniLM-L6-v2", {"seq_len": 32})}
COMPRESSIONS = {"tome": {"method": "tome", "r": "2"}, "topk": {"method": "topk", "params": {"keep": 0.75}}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(model, opset) -> the export at that opset, made once per module."""
    from tcexport.export import exporter as export
    from tcexport.models import sources

    made: dict[tuple[str, int], object] = {}

    def get_export(model: str, version: int):
        if (model, version) not in made:
            spec, options = MODELS[model]
            path = tmp_path_factory.mktemp(f"{model}{version}") / f"{model}_{version}.onnx"
            # torch's dynamo exporter writes MiniLM at opset 18 when asked for 17 (its down-conversion gives
            # up); the TorchScript exporter writes a real opset-17 graph.
            exporter = "torchscript" if (model, version) == ("minilm", 17) else "dynamo"
            export.export_to_file(sources.load(spec, **options), path, opset=version, check=False,
                                  exporter=exporter)
            made[model, version] = path
        return made[model, version]

    return get_export


@pytest.mark.slow
@pytest.mark.parametrize("version", [17, 18, 20, 23])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_exported_model_compresses_and_validates(exported, tmp_path, model, version):
    from tcexport.compress import rewrite as compress
    from tcexport.validate import equality as validate

    source = exported(model, version)
    exported_model = onnx.load(str(source))
    assert next(o.version for o in exported_model.opset_import if o.domain == "") == version
    fused = [n.op_type for n in exported_model.graph.node].count("Attention")
    assert (fused > 0) == (version >= 23)  # opset 23: the exporter really wrote fused attention
    for name, options in COMPRESSIONS.items():
        out = tmp_path / f"{model}_{version}_{name}.onnx"
        schedule = compress.compress_file(source, out, **options)
        assert schedule[-1]["out"] < schedule[0]["in"]
        written = onnx.load(str(out))
        assert next(o.version for o in written.opset_import if o.domain == "") == version
        assert "Attention" not in {n.op_type for n in written.graph.node}
        report = validate.validate(out, samples=2)
        assert report.passed, validate.format_report(report)
        assert report.worst("max_abs") < 1e-3


@pytest.mark.slow
def test_function_impl_at_opset_17_validates(exported, tmp_path):
    """--impl function: the method bodies become model-local functions, declared at the model's opset 17."""
    from tcexport.compress import rewrite as compress
    from tcexport.validate import equality as validate

    out = tmp_path / "vit_17_tome_fn.onnx"
    compress.compress_file(exported("vit", 17), out, method="tome", r="2", impl="function")
    written = onnx.load(str(out))
    assert written.functions and all(
        next(o.version for o in f.opset_import if o.domain == "") == 17 for f in written.functions)
    reduces = [n for f in written.functions for n in f.node if n.op_type.startswith("Reduce") and n.op_type != "ReduceSum"]
    assert reduces and all(len(n.input) == 1 for n in reduces)  # axes as attributes, as opset 17 defines them
    onnx.checker.check_model(written, full_check=True)
    report = validate.validate(out, samples=2)
    assert report.passed, validate.format_report(report)
