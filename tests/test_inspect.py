"""tcexport.graph.flops and tcexport.graph.inspection, and the `inspect` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tcexport.graph import flops
from tcexport.graph import inspection
from tcexport.core.errors import UsageError

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def vit_path(tmp_path_factory) -> Path:
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    program = torch.onnx.export(
        model, (x,), dynamo=True, opset_version=18,
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
        input_names=["pixel_values"], output_names=["logits"],
    )
    path = tmp_path_factory.mktemp("vit") / "vit_tiny.onnx"
    program.save(str(path))
    return path


def _tiny_model(batch_dim="N") -> onnx.ModelProto:
    """X[N,4] -> MatMul W[4,3] -> Relu -> Y[N,3]; no metadata at all."""
    w = numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["H"], name="mm"), helper.make_node("Relu", ["H"], ["Y"], name="relu")],
        "tiny",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [batch_dim, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [batch_dim, 3])],
        [w],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.fixture
def tiny_path(tmp_path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(_tiny_model(), str(path))
    return path


def _vit_tiny_analytic_flops() -> int:
    """ViT-Ti/16 at 224: 2 x MACs of the patch-embedding conv, 12 blocks of matmuls, and the head."""
    depth, dim, heads, mlp, tokens, patch, classes = 12, 192, 3, 768, 197, 16, 1000
    head_dim = dim // heads
    patches = (224 // patch) ** 2
    patch_embed = patches * dim * 3 * patch * patch
    block = (tokens * dim * 3 * dim  # qkv
             + heads * tokens * tokens * head_dim  # q @ k^T
             + heads * tokens * tokens * head_dim  # attn @ v
             + tokens * dim * dim  # proj
             + tokens * dim * mlp + tokens * mlp * dim)  # fc1, fc2
    head = dim * classes  # class token only
    return 2 * (patch_embed + depth * block + head)


def _run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), COLUMNS="120")
    return subprocess.run([sys.executable, "-m", "tcexport.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env=env, timeout=120)


# ---------------------------------------------------------------- flops

def test_vit_tiny_flops_match_analytic_count(vit_path):
    expected = _vit_tiny_analytic_flops()
    assert 2.4e9 < expected < 2.6e9  # ~1.26 GMACs
    one = flops.estimate(vit_path, batch=1)
    assert one.unknown_nodes == 0
    assert abs(one.total_flops - expected) / expected < 0.02
    assert set(one.by_op_type) == {"MatMul", "Conv", "Gemm"}
    assert 0 < one.other_flops < 0.05 * one.total_flops
    two = flops.estimate(vit_path, batch=2)
    assert two.total_flops == 2 * one.total_flops
    assert two.other_flops == 2 * one.other_flops


def test_vit_tiny_per_node_records_carry_scopes(vit_path):
    result = flops.estimate(onnx.load(str(vit_path), load_external_data=False), batch=1)
    assert len(result.nodes) == 12 * 6 + 2  # 6 matmuls per block, conv, head gemm
    assert sum(n.flops for n in result.nodes) == result.total_flops
    per_block: dict[str, int] = {}
    for node in result.nodes:
        assert node.scope is not None
        block = next((s for s in node.scope if s.startswith("blocks.") and s.count(".") == 1), None)
        if block:
            per_block[block] = per_block.get(block, 0) + node.flops
    assert len(per_block) == 12 and len(set(per_block.values())) == 1


def test_flops_formulas_on_small_graphs():
    # Conv: 8 -> 16 channels, groups 2, 3x3, stride 1, pad 1, on 10x10; Gemm with transB; batched MatMul broadcast.
    nodes = [
        helper.make_node("Conv", ["X", "Wc"], ["C"], name="conv", group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Gemm", ["A", "Wg"], ["G"], name="gemm", transB=1),
        helper.make_node("MatMul", ["P", "Q"], ["R"], name="bmm"),
    ]
    inits = [numpy_helper.from_array(np.zeros(s, dtype=np.float32), n)
             for n, s in (("Wc", (16, 4, 3, 3)), ("Wg", (7, 5)), ("Q", (3, 6, 2)))]
    graph = helper.make_graph(
        nodes, "formulas",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["b", 8, 10, 10]),
         helper.make_tensor_value_info("A", TensorProto.FLOAT, ["b", 5]),
         helper.make_tensor_value_info("P", TensorProto.FLOAT, ["b", 1, 4, 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("C", "G", "R")],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    result = flops.estimate(model, batch=2)
    by_name = {n.name: n.flops for n in result.nodes}
    assert by_name["conv"] == 2 * (2 * 16 * 10 * 10) * (4 * 3 * 3)
    assert by_name["gemm"] == 2 * 2 * 5 * 7
    assert by_name["bmm"] == 2 * (2 * 3) * 4 * 6 * 2
    assert all(n.scope is None for n in result.nodes)
    assert result.unknown_nodes == 0


def test_unknown_shapes_and_local_functions_are_counted_not_fatal():
    # MatMul on a dim that stays symbolic (seq), plus a call to a model-local function.
    fn = helper.make_function("local", "Double", ["x"], ["y"], [helper.make_node("Add", ["x", "x"], ["y"])],
                              opset_imports=[helper.make_opsetid("", 18)])
    w = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["H"], name="mm"),
         helper.make_node("Double", ["H"], ["Y"], name="call", domain="local")],
        "fn",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", "seq", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [w],
    )
    model = helper.make_model(graph, functions=[fn],
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("local", 1)])
    result = flops.estimate(model, batch=1)
    # the MatMul's output is [1, seq, 4] and only K is known; the call node is never opened
    assert {u.name for u in result.unknown} == {"mm", "call"}
    assert result.total_flops == 0
    filled = flops.estimate(model, batch=2, dims={"seq": 5})
    assert filled.total_flops == 2 * 2 * 5 * 4 * 4
    assert [u.name for u in filled.unknown] == ["call"]


def test_estimate_does_not_modify_the_model():
    model = _tiny_model()
    before = model.SerializeToString()
    assert flops.estimate(model, batch=3).total_flops == 2 * 3 * 4 * 3
    assert model.SerializeToString() == before


# ---------------------------------------------------------------- inspect_model

def test_inspect_vit(vit_path):
    report = inspection.inspect_model(vit_path, batch=1)
    json.dumps(report)  # serialisable
    assert report["path"] == str(vit_path)
    assert report["file_size_bytes"] == vit_path.stat().st_size
    assert report["opsets"]["ai.onnx"] == 18
    assert report["producer"]["name"] == "pytorch"
    assert report["op_histogram"]["Softmax"] == 12
    assert "MatMul" in report["op_histogram"]
    counts = list(report["op_histogram"].values())
    assert counts == sorted(counts, reverse=True)
    assert report["node_count"] == sum(counts)
    (pixel,) = report["inputs"]
    assert pixel == {"name": "pixel_values", "dtype": "float32", "shape": ["batch", 3, 224, 224]}
    assert report["outputs"][0]["shape"] == ["batch", 1000]
    assert 5_000_000 < report["parameter_count"] < 6_000_000
    assert report["scope_metadata"]["fraction"] > 0.5
    assert report["functions"] == []
    assert report["tcexport"] == {}
    expected = _vit_tiny_analytic_flops() / 1e9
    assert abs(report["flops"]["total_gflops"] - expected) / expected < 0.02
    assert set(report["flops"]["by_op_type_gflops"]) == {"MatMul", "Conv", "Gemm"}
    assert report["flops"]["batch"] == 1


def test_inspect_tiny_graph_without_metadata(tiny_path):
    report = inspection.inspect_model(tiny_path, batch=5)
    assert report["op_histogram"] == {"MatMul": 1, "Relu": 1}
    assert report["inputs"] == [{"name": "X", "dtype": "float32", "shape": ["N", 4]}]
    assert report["initializer_count"] == 1 and report["parameter_count"] == 12
    assert report["scope_metadata"] == {"nodes_with_scopes": 0, "fraction": 0.0}
    assert report["tcexport"] == {} and report["metadata_keys"] == []
    assert report["flops"]["total_gflops"] == pytest.approx(2 * 5 * 4 * 3 / 1e9)
    assert report["flops"]["unknown_nodes"] == 0


def test_inspect_reports_tcexport_records_and_other_metadata(tmp_path):
    from tcexport.core import metadata

    model = _tiny_model()
    metadata.write(model, metadata.SOURCE, {"spec": "timm:x", "opset": 18})
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, "author": "me"})
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    report = inspection.inspect_model(path)
    assert report["tcexport"] == {"tcexport.source": {"spec": "timm:x", "opset": 18}}
    assert report["metadata_keys"] == ["author"]


def test_inspect_bad_inputs_raise_usage_error(tmp_path):
    with pytest.raises(UsageError):
        inspection.inspect_model(tmp_path / "missing.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("this is a text file, not a model\n")
    with pytest.raises(UsageError):
        inspection.inspect_model(text)


def test_print_report_renders_every_section(tiny_path):
    from rich.console import Console

    console = Console(record=True, width=120)
    inspection.print_report(inspection.inspect_model(tiny_path), console=console)
    text = console.export_text()
    for needle in ("MatMul", "Relu", "GFLOPs", "[N, 4]", "no tcexport records"):
        assert needle in text


def test_sections_are_extensible(tiny_path):
    section = inspection.Section("blocks", lambda ctx: {"blocks": {"found": len(ctx.flops.nodes)}},
                                 lambda report: f"blocks found: {report['blocks']['found']}")
    inspection.register_section(section, before="flops")
    try:
        names = [s.name for s in inspection.SECTIONS]
        assert names.index("blocks") == names.index("flops") - 1
        assert inspection.inspect_model(tiny_path)["blocks"] == {"found": 1}
    finally:
        inspection.SECTIONS.remove(section)


# ---------------------------------------------------------------- CLI

def test_cli_inspect_prints_report(vit_path):
    proc = _run_cli("inspect", str(vit_path))
    assert proc.returncode == 0, proc.stderr
    assert "MatMul" in proc.stdout and "GFLOPs" in proc.stdout
    assert "[batch, 3, 224, 224]" in proc.stdout


def test_cli_inspect_json(vit_path):
    proc = _run_cli("inspect", str(vit_path), "--json", "--batch", "2")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for key in ("path", "file_size_bytes", "ir_version", "opsets", "producer", "inputs", "outputs", "node_count",
                "op_histogram", "initializer_count", "parameter_count", "functions", "tcexport", "metadata_keys",
                "scope_metadata", "flops"):
        assert key in report, key
    assert report["flops"]["batch"] == 2
    assert report["flops"]["total_gflops"] == pytest.approx(2 * _vit_tiny_analytic_flops() / 1e9, rel=0.02)


def test_cli_inspect_missing_file(tmp_path):
    proc = _run_cli("inspect", str(tmp_path / "missing.onnx"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")
    assert proc.stdout == ""


def test_cli_inspect_text_file(tmp_path):
    text = tmp_path / "model.onnx"
    text.write_text("not a model at all\n")
    proc = _run_cli("inspect", str(text))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:")


# ---------------------------------------------------------------- blocks found, token schedule


@pytest.fixture(scope="module")
def compressed_vit(vit_onnx, tmp_path_factory) -> Path:
    from tcexport.compress import rewrite as compress

    path = tmp_path_factory.mktemp("inspect_tome") / "vit_tome.onnx"
    compress.compress_file(vit_onnx, path, r="8")
    return path


def test_inspect_compressed_vit_blocks_and_schedule(compressed_vit, vit_onnx):
    report = inspection.inspect_model(compressed_vit, batch=1)
    json.dumps(report)
    blocks = report["blocks"]
    assert blocks["found"] == 12 and blocks["note"] is None
    assert [b["scope"] for b in blocks["items"]] == [f"blocks.{i}" for i in range(12)]
    assert [b["index"] for b in blocks["items"]] == list(range(12))
    assert {b["norm"] for b in blocks["items"]} == {"pre-norm"}  # timm ViT: the residual Add feeds the MLP's norm
    assert all(b["hidden"] and b["softmax"] for b in blocks["items"])

    schedule = report["token_schedule"]
    assert [(s["block"], s["in"], s["out"]) for s in schedule["blocks"]] == \
        [(i, 197 - 8 * i, 189 - 8 * i) for i in range(12)]
    assert (schedule["tokens_in"], schedule["tokens_out"]) == (197, 101)
    compression = schedule["compression"]
    assert compression["method"] == "tome" and compression["impl"] == "subgraph"
    assert compression["layers"] == list(range(12)) and compression["params"] == [{"r": 8}] * 12
    assert compression["protected"] == 1

    # Rescaling the compressed file's per-node FLOPs to 197 tokens gives the uncompressed file's count.
    f = schedule["flops"]
    uncompressed = inspection.inspect_model(vit_onnx, batch=1)["flops"]["total_gflops"]
    assert f["uncompressed_gflops"] == pytest.approx(uncompressed, rel=1e-9)
    assert f["gflops"] == pytest.approx(report["flops"]["total_gflops"])
    assert 0 < f["method_gflops"] < 0.1 * f["gflops"]  # ToMe's own matmuls (scores, merge)
    assert f["ideal_speedup"] == pytest.approx(f["uncompressed_gflops"] / (f["gflops"] - f["method_gflops"]))
    assert 1.3 < f["ideal_speedup"] < 1.4


def test_token_schedule_flops_follow_the_cost_model(compressed_vit):
    """Per block: 4 linear layers (qkv, proj, fc1, fc2) and 2 attention products, at the scheduled counts."""
    f = inspection.inspect_model(compressed_vit)["token_schedule"]["flops"]
    dim, mlp = 192, 768

    def block(n_in, n_out):
        return 2 * (n_in * dim * 3 * dim + 2 * n_in * n_in * dim + n_in * dim * dim) + 2 * 2 * n_out * dim * mlp

    saved = sum(block(197, 197) - block(197 - 8 * i, 189 - 8 * i) for i in range(12))
    compressed_without_method = f["gflops"] - f["method_gflops"]
    assert f["uncompressed_gflops"] - compressed_without_method == pytest.approx(saved / 1e9, rel=1e-9)


def test_inspect_finds_blocks_without_node_metadata(compressed_vit, tmp_path):
    model = onnx.load(str(compressed_vit))
    for node in model.graph.node:
        del node.metadata_props[:]
    path = tmp_path / "stripped.onnx"
    onnx.save(model, str(path))
    report = inspection.inspect_model(path)
    blocks = report["blocks"]
    assert blocks["found"] == 12
    assert [b["scope"] for b in blocks["items"]] == [None] * 12
    assert [b["index"] for b in blocks["items"]] == list(range(12))
    f = report["token_schedule"]["flops"]  # the schedule is still read; the per-block FLOPs need module scopes
    assert "uncompressed_gflops" not in f and "module scopes" in f["note"]


def test_inspect_without_blocks_or_schedule_says_so(tiny_path):
    report = inspection.inspect_model(tiny_path)
    assert report["blocks"]["found"] == 0 and report["blocks"]["items"] == []
    assert report["blocks"]["note"].startswith("no transformer blocks found: found no attention Softmax")
    assert report["token_schedule"] is None
    from rich.console import Console

    console = Console(record=True, width=120)
    inspection.print_report(report, console=console)
    assert "no transformer blocks found" in console.export_text()


def test_inspect_uncompressed_export_has_blocks_and_no_schedule(vit_onnx):
    report = inspection.inspect_model(vit_onnx)
    assert report["blocks"]["found"] == 12 and report["token_schedule"] is None


def test_cli_inspect_shows_blocks_and_token_schedule(compressed_vit):
    proc = _run_cli("inspect", str(compressed_vit))
    assert proc.returncode == 0, proc.stderr
    assert "Transformer blocks (12 found)" in proc.stdout
    assert "Token schedule: tome at blocks 0-11, r=8, protected 1, impl subgraph: tokens 197 -> 101" in proc.stdout
    assert "FLOP-ideal speedup 1.3" in proc.stdout
    proc = _run_cli("inspect", str(compressed_vit), "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["blocks"]["found"] == 12 and report["blocks"]["items"][11]["scope"] == "blocks.11"
    assert [s["out"] for s in report["token_schedule"]["blocks"]][:2] == [189, 181]
    assert report["token_schedule"]["flops"]["ideal_speedup"] > 1.3
