"""`tcexport lint`: each rule fails on a small crafted graph and passes on its fixed form; CLI exit codes 0/1/2."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tcexport.backends import lint
from tcexport.core.errors import UsageError
from tests.conftest import assert_usage_error, run_cli

F = TensorProto.FLOAT


def model(nodes, inputs, outputs, initializers=(), opset=18, functions=(), extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions), ir_version=10)


def vi(name, elem_type=F, shape=(2, 8)):
    return helper.make_tensor_value_info(name, elem_type, list(shape))


def relu_model(opset=18):
    return model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [vi("x")], [vi("y")], opset=opset)


def findings(m, version="10.3", rule=None):
    report = lint.lint_model(m, version)
    return [f for f in report.findings if rule is None or f.rule == rule]


def only(m, version, rule):
    found = findings(m, version, rule)
    assert len(found) == 1, found
    return found[0]


# --- opset / op version ------------------------------------------------------------------------------------------


def test_clean_graph_has_no_findings():
    report = lint.lint_model(relu_model(), "10.3")
    assert report.findings == [] and report.ok


def test_opset_above_documented_range_warns():
    finding = only(relu_model(opset=23), "10.3", "opset")
    assert finding.severity == "warning" and "9-20" in finding.message
    assert findings(relu_model(opset=23), "10.15", "opset") == []  # 10.15 documents opset 24
    assert findings(relu_model(opset=24), "10.15", "opset") == []


def test_op_version_newer_than_parser_warns_once_per_op():
    nodes = [helper.make_node("Reshape", ["x", "s"], ["r1"], name="r1"),
             helper.make_node("Reshape", ["r1", "s"], ["y"], name="r2")]
    shape = numpy_helper.from_array(np.array([2, 8], dtype=np.int64), "s")
    m = model(nodes, [vi("x")], [vi("y")], [shape], opset=23)
    finding = only(m, "10.3", "op-version")
    assert finding.severity == "warning" and finding.node == "r1 (+1 more)" and "Reshape-23" in finding.message
    assert findings(model(nodes, [vi("x")], [vi("y")], [shape], opset=18), "10.3", "op-version") == []


# --- unsupported ops ---------------------------------------------------------------------------------------------


def test_unsupported_op_is_an_error():
    m = model([helper.make_node("Unique", ["x"], ["y"], name="uniq")], [vi("x", shape=(8,))], [vi("y", shape=(8,))])
    finding = only(m, "10.13", "unsupported-op")
    assert (finding.severity, finding.node, finding.op_type) == ("error", "uniq", "Unique")


def test_op_added_later_depends_on_version():
    nodes = [helper.make_node("HannWindow", ["n"], ["y"], name="hann")]
    n = numpy_helper.from_array(np.array(16, dtype=np.int64), "n")
    m = model(nodes, [], [vi("y", shape=(16,))], [n])
    finding = only(m, "10.3", "unsupported-op")
    assert "10.4" in finding.message
    assert findings(m, "10.4", "unsupported-op") == []


def test_onnx_ml_op_is_unsupported():
    node = helper.make_node("LabelEncoder", ["x"], ["y"], domain="ai.onnx.ml", name="enc",
                            keys_int64s=[1], values_int64s=[2])
    m = model([node], [vi("x", TensorProto.INT64)], [vi("y", TensorProto.INT64)], extra_opsets=["ai.onnx.ml"])
    assert only(m, "10.3", "unsupported-op").severity == "error"


# --- TopK --------------------------------------------------------------------------------------------------------


def topk_model(k: int | None, sorted_: int = 1, n: int = 4096):
    attrs = {} if sorted_ == 1 else {"sorted": 0}
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="topk", **attrs)
    inits = [numpy_helper.from_array(np.array([k], dtype=np.int64), "k")] if k is not None else []
    inputs = [vi("x", shape=(1, n))] + ([] if k is not None else [vi("k", TensorProto.INT64, (1,))])
    return model([node], inputs, [vi("values", shape=(1, None)), vi("indices", TensorProto.INT64, (1, None))], inits)


def test_topk_passes_with_sorted_and_small_constant_k():
    assert findings(topk_model(197), "10.3") == []


def test_topk_unsorted_is_an_error():
    finding = only(topk_model(197, sorted_=0), "10.3", "topk")
    assert finding.severity == "error" and "sorted=1" in finding.message


def test_topk_k_too_large_is_an_error():
    finding = only(topk_model(3840), "10.3", "topk")
    assert finding.severity == "error" and "3840" in finding.message
    assert findings(topk_model(3839), "10.3", "topk") == []


def test_topk_runtime_k_is_a_warning():
    assert only(topk_model(None), "10.3", "topk").severity == "warning"


# --- scatter reductions ------------------------------------------------------------------------------------------


def scatter_model(op="ScatterElements", reduction="add", index_type=TensorProto.INT64, data_type=F):
    attrs = {"reduction": reduction} if reduction else {}
    node = helper.make_node(op, ["data", "idx", "upd"], ["y"], name="scatter", **attrs)
    idx_shape = (2, 8) if op == "ScatterElements" else (2, 1)
    upd_shape = (2, 8) if op == "ScatterElements" else (2, 8)
    return model([node], [vi("data", data_type, (4, 8)), vi("idx", index_type, idx_shape), vi("upd", data_type, upd_shape)],
                 [vi("y", data_type, (4, 8))])


def test_scatter_elements_reduction_int64_warns_about_plugin():
    finding = only(scatter_model(), "10.3", "scatter-reduction")
    assert finding.severity == "warning" and "plugin" in finding.message


def test_scatter_elements_reduction_int32_indices_is_an_error():
    finding = only(scatter_model(index_type=TensorProto.INT32), "10.3", "scatter-reduction")
    assert finding.severity == "error" and "int64" in finding.message


def test_scatter_elements_reduction_bf16_data_is_an_error():
    assert only(scatter_model(data_type=TensorProto.BFLOAT16), "10.3", "scatter-reduction").severity == "error"


def test_scatter_elements_without_reduction_passes():
    assert findings(scatter_model(reduction=None), "10.3") == []
    assert findings(scatter_model(reduction="none", index_type=TensorProto.INT32), "10.3") == []


def test_scatter_nd_reduction_is_an_error():
    finding = only(scatter_model("ScatterND", "add"), "10.13", "scatternd-reduction")
    assert finding.severity == "error"
    assert findings(scatter_model("ScatterND", None), "10.13") == []


# --- Attention ---------------------------------------------------------------------------------------------------


def attention_model(extra_inputs=()):
    inputs = ["q", "k", "v", *extra_inputs]
    node = helper.make_node("Attention", inputs, ["y"], name="attn")
    shape = (1, 3, 16, 8)
    values = [vi(n, shape=shape) for n in ["q", "k", "v"]] + [vi(n, shape=shape) for n in extra_inputs if n]
    return model([node], values, [vi("y", shape=shape)], opset=23)


def test_attention_needs_10_14():
    finding = only(attention_model(), "10.13", "attention")
    assert finding.severity == "error" and "10.14" in finding.message
    assert findings(attention_model(), "10.14", "attention") == []


def test_attention_past_key_is_unsupported():
    finding = only(attention_model(["", "past_key"]), "10.15", "attention")
    assert finding.severity == "error" and "past_key" in finding.message


# --- data types --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("elem_type, severity", [
    (TensorProto.DOUBLE, "warning"),
    (TensorProto.STRING, "error"),
    (TensorProto.COMPLEX64, "error"),
    (TensorProto.UINT16, "error"),
])
def test_unsupported_dtypes(elem_type, severity):
    m = model([helper.make_node("Identity", ["x"], ["y"], name="id")], [vi("x", elem_type)], [vi("y", elem_type)])
    found = findings(m, "10.3", "dtype")
    assert found and {f.severity for f in found} == {severity}


def test_uint8_only_at_the_boundary():
    boundary = model([helper.make_node("Cast", ["x"], ["y"], to=F, name="cast")], [vi("x", TensorProto.UINT8)],
                     [vi("y")])
    assert findings(boundary, "10.3", "dtype") == []
    internal = model([helper.make_node("Cast", ["x"], ["u"], to=TensorProto.UINT8, name="to_u8"),
                      helper.make_node("Cast", ["u"], ["y"], to=F, name="back")], [vi("x")], [vi("y")])
    finding = only(internal, "10.3", "dtype")
    assert (finding.severity, finding.node) == ("error", "to_u8")


def test_fp4_depends_on_version():
    m = model([helper.make_node("Cast", ["x"], ["q"], to=TensorProto.FLOAT4E2M1, name="to_fp4"),
               helper.make_node("Cast", ["q"], ["y"], to=F, name="back")], [vi("x")], [vi("y")], opset=23)
    assert only(m, "10.3", "dtype").severity == "error"
    assert only(m, "10.8", "dtype").severity == "warning"


# --- custom ops, functions, subgraphs ----------------------------------------------------------------------------


def test_unknown_custom_op_is_an_error():
    m = model([helper.make_node("FancyMerge", ["x"], ["y"], domain="acme", name="fancy")], [vi("x")], [vi("y")],
              extra_opsets=["acme"])
    finding = only(m, "10.13", "custom-op")
    assert (finding.severity, finding.op_type) == ("error", "FancyMerge")


def _plugin_node(op="ToMeMerge", inputs=("x",), **attrs):
    node = helper.make_node(op, list(inputs), ["y"], domain="tcexport", name="tome", **attrs)
    return model([node], [vi(n) for n in inputs], [vi("y")], extra_opsets=["tcexport"])


TOME_FIELDS = {"r": 8, "protected": 1}


def test_tcexport_plugin_op_by_version():
    """C++ IPluginV3 runs from 10.0 (JetPack 6's 10.3 too); Python plugins JIT from 10.6, AOT from 10.9."""
    on_10_3 = only(_plugin_node(**TOME_FIELDS, plugin_namespace="tcexport", plugin_version="1", aot=1), "10.3",
                   "custom-op")
    assert on_10_3.severity == "warning"  # not "cannot run": the C++ library runs it
    assert "C++ IPluginV3 library" in on_10_3.message and "Python plugin" not in on_10_3.message.split(":")[-1]
    assert "no Python plugins here" in on_10_3.message
    assert only(_plugin_node(**TOME_FIELDS), "10.6", "custom-op").severity == "error"  # domain read from 10.10 only
    with_ns = _plugin_node(**TOME_FIELDS, plugin_namespace="tcexport", plugin_version="1")
    jit = only(with_ns, "10.6", "custom-op")
    assert jit.severity == "warning" and "Python plugin (JIT)" in jit.message and "(AOT)" not in jit.message
    new = findings(with_ns, "10.10", "custom-op")  # AOT too: and without `aot` the parser cannot choose
    assert [f.severity for f in new] == ["warning", "warning"]
    assert "Python plugin (AOT)" in new[0].message and "'aot' attribute" in new[1].message
    assert len(findings(_plugin_node(**TOME_FIELDS, aot=1), "10.10", "custom-op")) == 1


def test_plugin_with_a_mask_has_no_python_plugin():
    masked = _plugin_node(inputs=("x", "metric", "size", "mask"), **TOME_FIELDS, plugin_namespace="tcexport",
                          plugin_version="1", aot=1)
    finding = only(masked, "11.0", "custom-op")
    assert finding.message.endswith("C++ IPluginV3 library (tcexport's Python plugins take no mask)")


def test_plugin_without_any_implementation_is_an_error():
    pool = _plugin_node("TokenPool", kernel=2, protected=1, grid_side=14, plugin_namespace="tcexport")
    (finding,) = [f for f in findings(pool, "11.0", "custom-op") if f.severity == "error"]
    assert "no tcexport plugin" in finding.message


def test_plugin_fields_must_be_int_attributes():
    """onnx-tensorrt's plugin field loading: INT attribute -> INT32 field; INT64 tensors rejected; only declared
    fields are passed, so a missing one never reaches the plugin."""
    tensor_k = helper.make_attribute("r", numpy_helper.from_array(np.array([8], np.int64)))
    m = _plugin_node(protected=1, plugin_namespace="tcexport")
    m.graph.node[0].attribute.append(tensor_k)
    errors = [f for f in findings(m, "10.13", "custom-op") if f.severity == "error"]
    assert len(errors) == 1 and "as TENSOR" in errors[0].message and "INT64" in errors[0].message
    missing = [f for f in findings(_plugin_node(r=8, plugin_namespace="tcexport"), "10.13", "custom-op")
               if f.severity == "error"]
    assert len(missing) == 1 and "lacks the plugin field 'protected'" in missing[0].message
    huge = [f for f in findings(_plugin_node(r=2**31, protected=1, plugin_namespace="tcexport"), "10.13", "custom-op")
            if f.severity == "error"]
    assert len(huge) == 1 and "INT32" in huge[0].message


def function_model(body_sorted: int = 1):
    attrs = {} if body_sorted == 1 else {"sorted": 0}
    body = [helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.array([4], np.int64)),
                             name="k_const"),
            helper.make_node("TopK", ["x", "k"], ["v", "i"], name="rank", **attrs)]
    fn = helper.make_function("tcexport.local", "RankTokens", ["x"], ["v"], body,
                              [helper.make_opsetid("", 18)])
    call = helper.make_node("RankTokens", ["x"], ["y"], domain="tcexport.local", name="call")
    return model([call], [vi("x")], [vi("y", shape=(2, 4))], functions=[fn], extra_opsets=["tcexport.local"])


def test_model_local_function_is_not_a_custom_op_and_its_body_is_checked():
    assert findings(function_model(), "10.3") == []
    finding = only(function_model(body_sorted=0), "10.3", "topk")
    assert finding.scope == "function tcexport.local:RankTokens" and finding.node == "rank"


def test_subgraphs_are_checked():
    then_branch = helper.make_graph([helper.make_node("Unique", ["x"], ["t"], name="inner_unique")], "then", [],
                                    [vi("t", shape=(8,))])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="inner_id")], "else", [],
                                    [vi("e", shape=(8,))])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch, name="branch")
    m = model([node], [vi("cond", TensorProto.BOOL, ()), vi("x", shape=(8,))], [vi("y", shape=(8,))])
    finding = only(m, "10.3", "unsupported-op")
    assert finding.node == "inner_unique" and "then_branch" in finding.scope


# --- versions, JSON, CLI -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["abc", "10", "9.0", "12.1", ""])
def test_bad_version_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        lint.lint_model(relu_model(), bad)


def test_report_json_round_trips():
    report = lint.lint_model(topk_model(197, sorted_=0), "10.3")
    data = json.loads(json.dumps(report.to_json()))
    assert data["errors"] == 1 and data["trt_version"] == "10.3"
    assert data["findings"][0] | {"message": ""} == {"severity": "error", "rule": "topk", "node": "topk",
                                                     "op_type": "TopK", "message": "", "scope": "graph"}


def test_cli_exit_codes(tmp_path):
    clean, bad = tmp_path / "clean.onnx", tmp_path / "bad.onnx"
    onnx.save(relu_model(), clean)
    onnx.save(topk_model(197, sorted_=0), bad)

    result = run_cli("lint", clean, "--trt-version", "10.3")
    assert result.returncode == 0, result.stderr
    assert "0 error(s)" in result.stdout

    result = run_cli("lint", bad, "--trt-version", "10.13")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "topk" in result.stdout and "sorted=1" in result.stdout.replace("\n", " ").replace("│", "")
    assert "Traceback" not in result.stderr

    result = run_cli("lint", bad, "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["errors"] == 1 and data["findings"][0]["rule"] == "topk"

    assert_usage_error(run_cli("lint", clean, "--trt-version", "ten"))
    assert_usage_error(run_cli("lint", tmp_path / "missing.onnx"))


def test_cli_warnings_only_exit_zero(tmp_path):
    path = tmp_path / "runtime_k.onnx"
    onnx.save(topk_model(None), path)
    result = run_cli("lint", path, "--trt-version", "11.0", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["warnings"] == 1


def test_outer_tensor_types_are_reported_once():
    then_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["t"], name="inner")], "then", [],
                                    [vi("t", TensorProto.DOUBLE, (8,))])
    else_branch = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="inner2")], "else", [],
                                    [vi("e", TensorProto.DOUBLE, (8,))])
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_branch, else_branch=else_branch, name="branch")
    m = model([node], [vi("cond", TensorProto.BOOL, ()), vi("x", TensorProto.DOUBLE, (8,))],
              [vi("y", TensorProto.DOUBLE, (8,))])
    found = findings(m, "10.3", "dtype")
    named = sorted(f.message.split("'")[1] for f in found)
    assert named == ["e", "t", "x", "y"], found  # x and y once (main graph), t and e in their branches
