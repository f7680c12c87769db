"""--impl function: each method stage becomes one call to a model-local function (tcexport::ToMeMerge).

The function model must compute what the subgraph model computes (ONNX Runtime inlines the function), pass the
full ONNX checker and `tcexport validate`, and keep the names validate and a later TensorRT plugin rely on.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnx_ir as ir
import onnxruntime as ort
import pytest

from tcexport.compress import rewrite as compress
from tcexport.models import inputs
from tcexport.backends import lint
from tcexport.core import metadata
from tcexport.validate import equality as validate
from tcexport.graph import functions
from tests.conftest import run_cli

SIZE_OUTPUT = validate.SIZE_OUTPUT


def _compress_pair(source: Path, out_dir: Path, **options) -> tuple[Path, Path]:
    subgraph, function = out_dir / "subgraph.onnx", out_dir / "function.onnx"
    compress.compress_file(source, subgraph, impl="subgraph", **options)
    compress.compress_file(source, function, impl="function", **options)
    return subgraph, function


@pytest.fixture(scope="module")
def vit_pair(vit_onnx, tmp_path_factory) -> tuple[Path, Path]:
    return _compress_pair(vit_onnx, tmp_path_factory.mktemp("vit_fn"), r="8", layers="all")


@pytest.fixture(scope="module")
def minilm_pair(minilm_onnx, tmp_path_factory) -> tuple[Path, Path]:
    return _compress_pair(minilm_onnx, tmp_path_factory.mktemp("minilm_fn"), r="8", layers="0-2")


def _run(path: Path, feeds: dict) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _calls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in model.graph.node if n.domain == functions.DOMAIN]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _assert_same_outputs(subgraph: Path, function: Path, feeds: dict) -> None:
    expected, actual = _run(subgraph, feeds), _run(function, feeds)
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- vit_tiny, r=8 at every block


def test_vit_function_model_equals_subgraph_model(vit_pair):
    subgraph, function = vit_pair
    feeds = {"pixel_values": np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)}
    _assert_same_outputs(subgraph, function, feeds)


def test_vit_function_model_passes_the_full_checker(vit_pair):
    onnx.checker.check_model(onnx.load(str(vit_pair[1])), full_check=True)


def test_vit_one_function_called_once_per_block(vit_pair):
    subgraph_path, function_path = vit_pair
    model = onnx.load(str(function_path))
    (fn,) = model.functions
    assert (fn.domain, fn.name) == ("tcexport", "ToMeMerge")
    assert {o.domain: o.version for o in model.opset_import} == {"": 18, "tcexport": 1}
    assert {o.domain: o.version for o in fn.opset_import} == {"": 18}
    assert list(fn.input) == ["tome_x", "tome_metric", "tome_size"]
    assert list(fn.output) == ["tome_x_out", "tome_size_out"]
    # the plugin's static attributes first, then the tensors only the body needs
    assert list(fn.attribute)[:5] == ["r", "protected", "plugin_namespace", "plugin_version", "aot"]
    assert all(a.startswith(functions.CONST_PREFIX) for a in list(fn.attribute)[5:])

    calls = _calls(model)
    schedule = metadata.read(model, metadata.TOKENS)
    assert [c.name for c in calls] == [f"tc_blk{b}_tome" for b in range(12)]
    for call, step in zip(calls, schedule):
        b = step["block"]
        assert call.op_type == "ToMeMerge" and call.domain == "tcexport"
        assert list(call.input)[1:] == [f"tc_blk{b}_metric", "tc_size0" if b == 0 else f"tc_blk{b - 1}_tome_size_out"]
        assert list(call.output) == [f"tc_blk{b}_tome_x_out", f"tc_blk{b}_tome_size_out"]
        attrs = _attrs(call)
        assert attrs["r"] == step["in"] - step["out"] == 8
        assert attrs["protected"] == 1
        assert (attrs["plugin_namespace"], attrs["plugin_version"]) == (b"tcexport", b"1")
        assert attrs["aot"] == 1  # the Python plugin has JIT and AOT implementations: the parser needs a choice
        assert set(attrs) == {"r", "protected", "plugin_namespace", "plugin_version", "aot", *fn.attribute[5:]}

    # The metric stays in the main graph; no ToMe node is left outside the function.
    names = [n.name for n in model.graph.node]
    assert all(f"tc_blk{b}/metric" in names for b in range(12))
    assert not [n for n in names if re.match(r"tc_blk\d+_tome/", n)]
    assert sorted({o for n in model.graph.node for o in n.output if SIZE_OUTPUT.match(o)}) == \
        sorted(f"tc_blk{b}_tome_size_out" for b in range(12))

    # Inlining the calls gives back the subgraph model's nodes.
    subgraph = onnx.load(str(subgraph_path))
    inlined = onnx.inliner.inline_local_functions(model)
    assert Counter(n.op_type for n in inlined.graph.node) == Counter(n.op_type for n in subgraph.graph.node)
    tome_nodes = [n for n in subgraph.graph.node if n.name.startswith("tc_blk0_tome/")]
    assert len(fn.node) == len(tome_nodes)
    assert {n.name for n in fn.node} == {n.name.replace("tc_blk0_", "") for n in tome_nodes}


def test_vit_function_model_validates(vit_pair):
    report = validate.validate(vit_pair[1], samples=2)
    assert report.passed, validate.format_report(report)
    assert not report.diverged


def test_inspect_function_model(vit_pair):
    from tcexport.graph import inspection

    subgraph, function = (inspection.inspect_model(path) for path in vit_pair)
    assert function["functions"] == ["tcexport::ToMeMerge"]
    assert function["blocks"]["found"] == 12
    assert function["token_schedule"]["blocks"] == subgraph["token_schedule"]["blocks"]
    fn, sub = function["token_schedule"]["flops"], subgraph["token_schedule"]["flops"]
    assert fn["uncompressed_gflops"] == pytest.approx(sub["uncompressed_gflops"])
    assert fn["ideal_speedup"] == pytest.approx(sub["ideal_speedup"])
    # The function bodies are inlined for counting: the same FLOPs as the subgraph, the method's own included.
    assert fn["method_gflops"] == pytest.approx(sub["method_gflops"]) and fn["method_gflops"] > 0
    assert fn["gflops"] == pytest.approx(sub["gflops"]) and "note" not in fn
    assert function["flops"]["total_gflops"] == pytest.approx(subgraph["flops"]["total_gflops"])


def test_lint_reports_the_function_per_tensorrt_version(vit_pair):
    model = onnx.load(str(vit_pair[1]), load_external_data=False)
    old = lint.lint_model(model, "10.3")
    assert old.ok and [f.rule for f in old.findings] == ["custom-op"]
    (finding,) = old.findings
    assert finding.severity == "warning" and finding.op_type == "ToMeMerge" and finding.node.endswith("(+11 more)")
    assert "inlines" in finding.message and "plain-ONNX" in finding.message
    new = lint.lint_model(model, "10.8")
    assert new.ok and [f.rule for f in new.findings] == ["custom-op"]
    assert "plugin tcexport::ToMeMerge v1" in new.findings[0].message


# ---------------------------------------------------------------- MiniLM: a mask, post-norm blocks


def test_minilm_function_model_equals_subgraph_model_with_padding(minilm_pair):
    subgraph, function = minilm_pair
    model = onnx.load(str(function), load_external_data=False)
    feeds = validate.sample_feeds(inputs.specs_from_graph(model), batch=3, seed=5)
    lengths = feeds["attention_mask"].sum(axis=1)
    assert (lengths < 128).all() and len(set(lengths.tolist())) == 3  # padding, a different amount per row
    _assert_same_outputs(subgraph, function, feeds)


def test_minilm_function_signature_has_the_mask(minilm_pair):
    model = onnx.load(str(minilm_pair[1]))
    onnx.checker.check_model(model, full_check=True)
    (fn,) = model.functions
    assert list(fn.input) == ["tome_x", "tome_metric", "tome_size", "tome_mask"]
    assert list(fn.output) == ["tome_x_out", "tome_size_out", "tome_mask_out"]
    calls = _calls(model)
    assert [c.name for c in calls] == ["tc_blk0_tome", "tc_blk1_tome", "tc_blk2_tome"]
    assert list(calls[0].input)[2:] == ["tc_size0", "tc_mask0"]
    assert list(calls[2].input)[2:] == ["tc_blk1_tome_size_out", "tc_blk1_tome_mask_out"]
    assert list(calls[2].output) == ["tc_blk2_tome_x_out", "tc_blk2_tome_size_out", "tc_blk2_tome_mask_out"]
    assert [_attrs(c)["r"] for c in calls] == [8, 8, 8]
    assert metadata.read(model, metadata.COMPRESSION)["impl"] == "function"


# ---------------------------------------------------------------- API edges and the CLI


def test_package_methods_without_stages_changes_nothing(vit_onnx):
    model = ir.from_proto(onnx.load(str(vit_onnx), load_external_data=False))
    before = len(list(model.graph))
    functions.package_methods(model)
    assert len(list(model.graph)) == before and not model.functions
    assert "tcexport" not in model.graph.opset_imports


def test_cli_impl_function_with_two_methods(vit_onnx, tmp_path):
    """Through the CLI: ToMe with r differing per block (the ranking's split sizes become an attribute, const_split_sizes) and 3 protected
    tokens, then average pooling, which reads the last ToMe call's sizes and needs no metric."""
    function, subgraph = tmp_path / "cli.onnx", tmp_path / "subgraph.onnx"
    stages = ["tome:r=16@0-2", "tome:r=8@3-5", "pool:kernel=2@8"]
    args = [arg for stage in stages for arg in ("--stage", stage)]
    result = run_cli("compress", vit_onnx, *args, "--protected", "3", "--impl", "function", "-o", function)
    assert result.returncode == 0, result.stderr
    model = onnx.load(str(function))
    onnx.checker.check_model(model, full_check=True)
    tome, pool = model.functions
    assert [(f.domain, f.name) for f in (tome, pool)] == [("tcexport", "ToMeMerge"), ("tcexport", "TokenPool")]
    assert "const_split_sizes" in tome.attribute
    assert list(pool.input) == ["pool_x", "pool_size"] and list(pool.output) == ["pool_x_out", "pool_size_out"]
    assert metadata.read(model, metadata.COMPRESSION)["impl"] == "function"
    calls = _calls(model)
    assert [c.name for c in calls] == [f"tc_blk{b}_tome" for b in range(6)] + ["tc_blk8_pool"]
    for call, r in zip(calls, [16, 16, 16, 8, 8, 8]):
        attrs = _attrs(call)
        assert (attrs["r"], attrs["protected"]) == (r, 3)
        assert onnx.numpy_helper.to_array(attrs["const_split_sizes"]).tolist()[0] == r
    assert list(calls[-1].input)[1:] == ["tc_blk5_tome_size_out"]
    assert {"plugin_namespace", "plugin_version"} <= set(_attrs(calls[-1]))
    compress.compress_file(vit_onnx, subgraph, stages=stages, protected=3)
    feeds = {"pixel_values": np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    _assert_same_outputs(subgraph, function, feeds)


def test_lint_checks_topk_k_passed_by_each_call():
    """A body Constant fed by the call (ref_attr_name): lint checks the largest K any call passes."""
    from onnx import TensorProto, helper, numpy_helper

    body = [helper.make_node("Constant", [], ["k"], name="k_const"),
            helper.make_node("TopK", ["x", "k"], ["v", "i"], name="rank")]
    body[0].attribute.append(helper.make_attribute_ref("value", onnx.AttributeProto.TENSOR, ref_attr_name="const_k"))
    fn = helper.make_function("tcexport", "ToMeMerge", ["x"], ["v"], body, [helper.make_opsetid("", 18)],
                              attributes=["const_k"])

    def call(name, k, x, y):
        node = helper.make_node("ToMeMerge", [x], [y], domain="tcexport", name=name, plugin_namespace="tcexport",
                                plugin_version="1")
        node.attribute.append(helper.make_attribute("const_k", numpy_helper.from_array(np.array([k], np.int64))))
        return node

    def model(second_k):
        graph = helper.make_graph([call("a", 4, "x", "h"), call("b", second_k, "h", "y")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5000])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        return helper.make_model(graph, functions=[fn], ir_version=10,
                                 opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("tcexport", 1)])

    assert [f.rule for f in lint.lint_model(model(3), "10.8").findings] == ["custom-op"]
    (topk,) = [f for f in lint.lint_model(model(4000), "10.8").findings if f.rule == "topk"]
    assert topk.severity == "error" and "K = 4000" in topk.message and topk.scope == "function tcexport:ToMeMerge"


def test_lint_rejects_function_names_tensorrt_would_confuse():
    """TensorRT keys local functions by name alone and tries built-in ops first."""
    from onnx import TensorProto, helper

    def fn(domain, name):
        return helper.make_function(domain, name, ["x"], ["y"], [helper.make_node("Relu", ["x"], ["y"])],
                                    [helper.make_opsetid("", 18)])

    def model(functions, calls):
        nodes = [helper.make_node(name, ["x"], ["y"], domain=domain, name="call") for domain, name in calls]
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        domains = sorted({f.domain for f in functions})
        opsets = [helper.make_opsetid("", 18)] + [helper.make_opsetid(d, 1) for d in domains]
        return helper.make_model(graph, functions=functions, ir_version=10, opset_imports=opsets)

    twins = model([fn("a", "Merge"), fn("b", "Merge")], [("a", "Merge")])
    (error,) = lint.lint_model(twins, "10.3").errors
    assert error.rule == "custom-op" and "share the name 'Merge'" in error.message
    builtin = model([fn("a", "Relu")], [("a", "Relu")])
    (error,) = lint.lint_model(builtin, "10.3").errors
    assert "built-in op Relu" in error.message


# ---------------------------------------------------------------- plugin fields: --impl function and --impl plugin
# What TensorRT's ONNX parser does with a node it maps to a plugin (onnx-tensorrt, onnxOpImporters.cpp: the
# fallback plugin importer and its field loading): it iterates the fields the plugin creator DECLARES and reads
# the node attribute of each name; an ONNX INT attribute becomes a kINT32 field, a STRING one a kCHAR field, and a
# TENSOR attribute becomes weights -- INT64 tensors are rejected there. Undeclared attributes are never passed.
# The plugin is matched by op_type + `plugin_version` + `plugin_namespace` (attributes; from 10.15 a plugin
# overrides a model-local function only when `plugin_namespace` is present or kENABLE_PLUGIN_OVERRIDE is set), and
# a Python plugin with both JIT and AOT implementations needs the node attribute `aot`.

TINY_SPEC = "py:tests.fixtures.factories:vit_dim_equals_tokens"  # 65 tokens, width 65, 3 blocks


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    from tcexport.export import exporter as export
    from tcexport.models import sources

    path = tmp_path_factory.mktemp("tiny_vit") / "tiny.onnx"
    export.export_to_file(sources.load(TINY_SPEC, input_shape="3x32x32", seed=0), path)
    return path


def _plugin_nodes(path: Path) -> tuple[onnx.ModelProto, list[onnx.NodeProto]]:
    model = onnx.load(str(path))
    return model, [n for n in model.graph.node if n.domain == "tcexport"]


def _assert_parser_ready(node: onnx.NodeProto, fields: dict[str, int]) -> None:
    from tcexport.methods import registry

    spec = registry.plugin_spec(node.op_type)
    by_name = {a.name: a for a in node.attribute}
    assert list(spec.fields) == list(fields)
    for name, expected in fields.items():  # each declared field: an ONNX INT attribute (-> kINT32 field)
        attr = by_name[name]
        assert attr.type == onnx.AttributeProto.INT, (name, attr.type)
        assert attr.i == expected and -2**31 <= attr.i < 2**31
    assert by_name["plugin_namespace"].type == onnx.AttributeProto.STRING
    assert (by_name["plugin_namespace"].s, by_name["plugin_version"].s) == (b"tcexport", b"1")
    assert by_name["aot"].type == onnx.AttributeProto.INT and by_name["aot"].i == 1
    # no INT64 tensor among what a plugin declares
    assert not [a for a in node.attribute if a.name in spec.fields and a.type == onnx.AttributeProto.TENSOR]


@pytest.mark.parametrize("impl", ["function", "plugin"])
def test_tome_nodes_carry_int_fields(tiny_vit, tmp_path, impl):
    out = tmp_path / f"{impl}.onnx"
    schedule = compress.compress_file(tiny_vit, out, r="8,30,4", impl=impl)
    model, nodes = _plugin_nodes(out)
    onnx.checker.check_model(model, full_check=impl == "function")
    assert [n.op_type for n in nodes] == ["ToMeMerge"] * 3
    for node, step in zip(nodes, schedule):
        _assert_parser_ready(node, {"r": step["in"] - step["out"], "protected": 1})
    # block 1 asked for 30 but holds 57 tokens: the field carries the capped r, (57 - 1) // 2 = 28
    assert [_attrs(n)["r"] for n in nodes] == [8, 28, 4]
    assert len(model.functions) == (1 if impl == "function" else 0)
    assert metadata.read(model, metadata.COMPRESSION)["impl"] == impl


@pytest.mark.parametrize("impl", ["function", "plugin"])
def test_topk_nodes_carry_int_fields_not_int64_tensors(tiny_vit, tmp_path, impl):
    out = tmp_path / f"{impl}.onnx"
    schedule = compress.compress_file(tiny_vit, out, method="topk", layers="0,2",
                                      params={"keep": 0.5, "fuse": True, "keep_order": True}, impl=impl)
    model, nodes = _plugin_nodes(out)
    assert [n.op_type for n in nodes] == ["TokenPrune"] * 2
    # 64 unprotected -> K = 32 (+1 fused) = 34 tokens out; then 33 unprotected -> K = ceil(16.5) = 17
    assert [(s["in"], s["out"]) for s in schedule if s["in"] != s["out"]] == [(65, 34), (34, 19)]
    for node, k in zip(nodes, (32, 17)):
        _assert_parser_ready(node, {"k": k, "protected": 1, "fuse": 1, "keep_order": 1})
        assert list(node.input)[1].endswith("_cls_attention")


def test_function_model_with_int_fields_still_equals_subgraph(tiny_vit, tmp_path):
    subgraph, function = _compress_pair(tiny_vit, tmp_path, method="topk", layers="0,2",
                                        params={"keep": 0.5, "fuse": True})
    feeds = {"input": np.random.default_rng(3).standard_normal((3, 3, 32, 32)).astype(np.float32)}
    _assert_same_outputs(subgraph, function, feeds)


def test_plugin_graph_has_no_body_and_no_stray_nodes(tiny_vit, tmp_path):
    out = tmp_path / "plugin.onnx"
    compress.compress_file(tiny_vit, out, r="8", impl="plugin")
    model, nodes = _plugin_nodes(out)
    assert not model.functions and functions.plugin_only_nodes(model) == nodes
    assert not [n for n in model.graph.node if re.match(r"tc_blk\d+_tome/", n.name)]
    # the plugin's outputs keep their static shapes, so the rest of the graph stays typed
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in model.graph.value_info}
    assert shapes["tc_blk0_tome_x_out"] == [shapes["tc_blk0_tome_x_out"][0], 57, 65]


def test_plugin_graph_refused_by_onnx_runtime_without_the_op_library(tiny_vit, tmp_path, monkeypatch):
    """tests/test_ort_ops.py runs plugin graphs on ONNX Runtime with tcexport's op library; without it, one line."""
    from tests.conftest import assert_usage_error

    out = tmp_path / "plugin.onnx"
    compress.compress_file(tiny_vit, out, r="8", impl="plugin")
    monkeypatch.setenv("TCEXPORT_ORT_OPS_LIBRARY", "none")
    for args in (("build", out, "-o", tmp_path / "build"), ("validate", out), ("bench", out, "--iters", "1")):
        result = run_cli(*args)
        assert_usage_error(result)
        assert "--impl plugin nodes (tcexport::ToMeMerge)" in result.stderr and "ORT_INCLUDE_DIR" in result.stderr
    assert not (tmp_path / "build").exists()


def test_impl_plugin_refuses_a_method_without_plugin(tiny_vit, tmp_path):
    from tests.conftest import assert_usage_error

    result = run_cli("compress", tiny_vit, "--method", "pool", "--kernel", "2", "--layers", "1", "--protected",
                     "1", "--impl", "plugin", "-o", tmp_path / "pool.onnx")
    assert_usage_error(result)
    assert "no TensorRT plugin implements pool" in result.stderr
    assert not (tmp_path / "pool.onnx").exists()


def test_lint_accepts_the_plugin_graph_compress_writes(tiny_vit, tmp_path):
    out = tmp_path / "plugin.onnx"
    compress.compress_file(tiny_vit, out, method="topk", layers="1", params={"keep": 0.5}, impl="plugin")
    model = onnx.load(str(out), load_external_data=False)
    old = lint.lint_model(model, "10.3")  # JetPack 6: the C++ library runs it, Python plugins do not exist
    assert old.ok and [f.rule for f in old.findings] == ["custom-op"]
    assert "C++ IPluginV3 library (no Python plugins here" in old.findings[0].message
    new = lint.lint_model(model, "10.13")
    assert new.ok and "Python plugin (AOT)" in new.findings[0].message and len(new.findings) == 1  # aot=1 is set
