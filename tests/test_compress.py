"""compress: the rewritten ONNX graph equals the eager PyTorch reference, keeps every shape consistent, and
rejects bad requests cleanly."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from tcexport.compress import rewrite as compress
from tcexport.export import exporter as export
from tcexport.core import metadata
from tcexport.models import sources
from tcexport.validate import equality as validate
from tcexport.graph.blocks import find_blocks
from tests.conftest import assert_usage_error, cli_here, run_cli

ATOL, RTOL = 1e-5, 1e-4


def _compress(src, tmp_path, name="out.onnx", **options):
    out = tmp_path / name
    compress.compress_file(src, out, **options)
    return out


def _assert_matches_reference(path, samples=3, seed=0):
    report = validate.validate(path, samples=samples, seed=seed, atol=ATOL, rtol=RTOL)
    assert not report.diverged, "a near-tie flipped; pick another seed"
    assert report.passed, validate.format_report(report)
    assert report.worst("max_abs") < 1e-4
    return report


def _assert_graph_is_sound(path):
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    assert not [n for n in model.graph.node if n.op_type.startswith("Scatter")]
    for graph_input in model.graph.input:
        assert graph_input.type.tensor_type.shape.dim[0].dim_param, "dynamic batch was lost"
    return model


@pytest.mark.parametrize("options", [
    dict(r="8"),
    dict(r="16", layers="0-5"),
    dict(r="4,8,12", layers="3,6,9"),
    dict(r="8", schedule="decreasing"),
    dict(r="13", layers="5", prop_attn=False),
], ids=["r8-all", "r16-first-half", "per-layer-r", "decreasing", "one-layer-no-prop-attn"])
def test_vit_tiny_matches_reference(vit_onnx, tmp_path, options):
    out = _compress(vit_onnx, tmp_path, **options)
    model = _assert_graph_is_sound(out)
    tokens = metadata.read(model, metadata.TOKENS)
    assert tokens[0]["in"] == 197 and len(tokens) == 12
    assert all(b["out"] <= b["in"] for b in tokens)
    _assert_matches_reference(out, seed=len(str(options)))


def test_tome_graph_lints_clean_for_tensorrt_10_3(vit_onnx, minilm_onnx, tmp_path):
    """The default (subgraph) ToMe graph needs no plugin library: TensorRT 10.3 (JetPack 6) can parse it."""
    from tcexport.backends import lint

    for source in (vit_onnx, minilm_onnx):
        report = lint.lint_file(_compress(source, tmp_path, f"{source.stem}_tome.onnx", r="8"), "10.3")
        assert not report.errors, report.errors


def test_ruinous_r_is_capped_per_block_like_tome(vit_onnx, tmp_path):
    """r=16 on all 12 blocks: the last blocks merge what they can, (N - 1) // 2, as ToMe does."""
    out = _compress(vit_onnx, tmp_path, r="16")
    tokens = metadata.read(onnx.load(str(out)), metadata.TOKENS)
    assert [b["out"] for b in tokens][-2:] == [21, 11]


def test_token_schedule_follows_tome_rules(vit_onnx, tmp_path):
    out = _compress(vit_onnx, tmp_path, r="8")
    model = onnx.load(str(out))
    tokens = metadata.read(model, metadata.TOKENS)
    assert [b["out"] for b in tokens] == [197 - 8 * (i + 1) for i in range(12)]
    record = metadata.read(model, metadata.COMPRESSION)
    assert record["method"] == "tome" and record["layers"] == list(range(12))
    assert record["params"] == [{"r": 8}] * 12 and record["impl"] == "subgraph" and record["protected"] == 1
    assert metadata.read(model, metadata.SOURCE)["spec"] == "timm:vit_tiny_patch16_224"  # provenance kept
    # The graph really runs with fewer tokens: the last block attends over the 109 tokens entering it.
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    softmax = [n for n in inferred.graph.node if n.op_type == "Softmax"][-1]
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    assert shapes[softmax.output[0]][-2:] == [109, 109]


def test_deit_distilled_keeps_both_prefix_tokens(deit_distilled_onnx, tmp_path):
    out = _compress(deit_distilled_onnx, tmp_path, r="13")
    model = _assert_graph_is_sound(out)
    assert metadata.read(model, metadata.COMPRESSION)["protected"] == 2
    assert metadata.read(model, metadata.TOKENS)[-1]["out"] == 198 - 13 * 12
    _assert_matches_reference(out)


def test_deit_distilled_decreasing(deit_distilled_onnx, tmp_path):
    _assert_matches_reference(_compress(deit_distilled_onnx, tmp_path, r="10", schedule="decreasing"), seed=5)


def test_torchscript_export_and_stripped_metadata(vit_checkpoint, vit_onnx, tmp_path):
    source = sources.load("timm:vit_tiny_patch16_224", checkpoint=vit_checkpoint)
    legacy = tmp_path / "legacy.onnx"
    export.export_to_file(source, legacy, exporter="torchscript")
    _assert_matches_reference(_compress(legacy, tmp_path, "legacy_tome.onnx", r="8"))

    stripped_model = onnx.load(str(vit_onnx))
    for node in stripped_model.graph.node:
        del node.metadata_props[:]
    stripped = tmp_path / "stripped.onnx"
    onnx.save(stripped_model, str(stripped))
    with_scopes = find_blocks(ir.load(str(vit_onnx)).graph)
    without = find_blocks(ir.load(str(stripped)).graph)
    assert [b.hidden.name for b in with_scopes] == [b.hidden.name for b in without]
    assert [b.scope for b in with_scopes] == [f"blocks.{i}" for i in range(12)]
    assert all(b.scope is None for b in without)
    _assert_matches_reference(_compress(stripped, tmp_path, "stripped_tome.onnx", r="6", layers="2-7"))


@pytest.mark.parametrize("options", [dict(r="2"), dict(r="5", layers="1"), dict(r="3", schedule="decreasing")])
def test_hf_bert_with_padding_matches_reference(bert_onnx, tmp_path, options):
    out = _compress(bert_onnx, tmp_path, **options)
    model = _assert_graph_is_sound(out)
    final = metadata.read(model, metadata.TOKENS)[-1]["out"]
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == final  # fewer tokens out
    _assert_matches_reference(out, samples=4)


def test_proportional_attention_rides_on_the_mask_add(bert_onnx, tmp_path):
    # A text encoder adds its attention mask to the logits: the rebuilt mask bias carries log(size) for the real
    # tokens, so no block after a merge needs an Add of its own over the [B, H, N, N] logits. validate (with
    # padding, batch 4) checks it computes what the reference's separate log(size) bias computes.
    out = _compress(bert_onnx, tmp_path, r="2", layers="0")
    model = _assert_graph_is_sound(out)
    names = [node.name for node in model.graph.node]
    assert not [name for name in names if name.endswith("/prop_attn")]
    assert any(name.endswith("attention_mask_log_size/log_size") for name in names)
    _assert_matches_reference(out, samples=4)


def test_a_fold_the_tracker_never_serves_is_an_error_not_a_silent_loss(bert_onnx, tmp_path, monkeypatch):
    # Point the fold at an Add the tracker never meets: the block would lose proportional attention without a
    # word. compress must refuse, and write nothing.
    from tcexport.graph import insert

    monkeypatch.setattr(insert, "_mask_term_on_logits", lambda *args: ir.Node("", "Add", [], name="stray_add"))
    with pytest.raises(RuntimeError, match="proportional attention was meant to ride on .'stray_add'"):
        compress.compress_file(bert_onnx, tmp_path / "c.onnx", method="tome", r="2", layers="0")
    assert not (tmp_path / "c.onnx").exists()


@pytest.mark.parametrize("options", [dict(r="10"), dict(r="4,8", layers="1,4"), dict(r="6", schedule="decreasing")])
def test_minilm_matches_reference(minilm_onnx, tmp_path, options):
    out = _compress(minilm_onnx, tmp_path, **options)
    _assert_graph_is_sound(out)
    _assert_matches_reference(out, samples=2)


def test_minilm_short_sentences_keep_their_embedding(minilm_onnx, tmp_path):
    """Padding merges first and never mixes with real tokens: short sentences padded to 128 lose only padding."""
    from sentence_transformers import SentenceTransformer

    from tcexport import data

    out = _compress(minilm_onnx, tmp_path, r="10")  # 10 per block, 60 in all
    st = SentenceTransformer(str(sources.resolve_st_path("all-MiniLM-L6-v2")), device="cpu")
    encoded = st.tokenizer(data.sentences(), padding="max_length", max_length=128, truncation=True, return_tensors="np")
    feeds = {k: encoded[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
    # Every block still has >= 2r padding tokens to pair up: 128 - 18 real - 50 merged before the last block.
    assert 128 - encoded["attention_mask"].sum(1).max() - 50 >= 2 * 10
    (compressed,) = ort.InferenceSession(str(out)).run(None, feeds)
    expected = st.encode(data.sentences(), convert_to_numpy=True)
    cosine = np.sum(compressed * expected, axis=1)
    assert cosine.min() > 0.99999


def test_only_token_axis_constants_change(tmp_path):
    """Width 65 equals the token count 65: only the constants on the token axis may change."""
    from tcexport.reference import compressed_reference
    from tests.fixtures.factories import vit_dim_equals_tokens

    torch.manual_seed(0)
    model = vit_dim_equals_tokens().eval()
    source = sources.Source("py:tests.fixtures.factories:vit_dim_equals_tokens", model,
                            [sources.InputSpec("pixel_values", ["batch", 3, 32, 32])], ["logits"],
                            {"kind": "seed", "seed": 0}, {"family": "timm", "num_prefix_tokens": 1})
    exported = tmp_path / "tiny.onnx"
    export.export_to_file(source, exported)
    out = _compress(exported, tmp_path, r="8", protected=1)
    _assert_graph_is_sound(out)
    reshape_targets = []
    model_proto = onnx.load(str(out))
    constants = {t.name: onnx.numpy_helper.to_array(t) for t in model_proto.graph.initializer}
    for node in model_proto.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    for node in model_proto.graph.node:
        if node.op_type == "Reshape" and node.input[1] in constants:
            reshape_targets.append(constants[node.input[1]].tolist())
    assert [-1, 57, 65] in reshape_targets  # tokens changed, width kept (block 0: 65 -> 57 tokens)
    reference = compressed_reference(source, {0: compress.methods.get("tome")(r=8), 1: compress.methods.get("tome")(r=8),
                                              2: compress.methods.get("tome")(r=8)})
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(x).numpy()
    (actual,) = ort.InferenceSession(str(out)).run(None, {"pixel_values": x.numpy()})
    assert np.abs(actual - expected).max() < 1e-5


@pytest.mark.parametrize("args", [
    ["--r", "-1"],
    ["--r", "99"],  # cap for 197 tokens with CLS is 98
    ["--r", "8", "--layers", "12"],
    ["--r", "8", "--layers", "5-3"],
    ["--r", "8", "--layers", "three"],
    ["--r", "8,8", "--layers", "1,2,3"],
    ["--r", "eight"],
    ["--method", "nope", "--r", "8"],
    [],  # no --r
    ["--r", "8", "--schedule", "sideways"],
])
def test_bad_compress_requests_exit_2(vit_onnx, tmp_path, args):
    out = tmp_path / "out.onnx"
    assert_usage_error(cli_here("compress", vit_onnx, "-o", out, *args))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_compressing_twice_and_bad_graphs(vit_onnx, tmp_path):
    once = _compress(vit_onnx, tmp_path, "once.onnx", r="4")
    assert_usage_error(run_cli("compress", once, "--r", "4", "-o", tmp_path / "twice.onnx"))
    # A graph with no attention at all.
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])
    plain = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    result = run_cli("compress", tmp_path / "plain.onnx", "--r", "4", "-o", tmp_path / "plain_out.onnx")
    assert_usage_error(result)
    assert "Softmax" in result.stderr
    assert not (tmp_path / "twice.onnx").exists() and not (tmp_path / "plain_out.onnx").exists()


def test_cli_compress_then_validate(vit_onnx, tmp_path):
    out = tmp_path / "vit_tome.onnx"
    result = run_cli("compress", vit_onnx, "--method", "tome", "--r", "8", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "197 -> 189" in result.stdout
    report_path = tmp_path / "report.json"
    result = run_cli("validate", out, "--samples", "2", "--json", report_path)
    assert result.returncode == 0, result.stderr
    assert "PASSED" in result.stdout and "top1_agreement" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["discrete_divergences"] == 0 and report["max_abs"] < 1e-4


def test_validate_fails_with_exit_1_when_graph_is_wrong(vit_onnx, tmp_path):
    """Break the rewritten graph (drop proportional attention) and validation must notice."""
    out = _compress(vit_onnx, tmp_path, r="8")
    model = onnx.load(str(out))
    record = metadata.read(model, metadata.COMPRESSION)
    record["prop_attn"] = False  # the reference now differs from what the graph computes
    metadata.write(model, metadata.COMPRESSION, record)
    tampered = tmp_path / "tampered.onnx"
    onnx.save(model, str(tampered))
    result = run_cli("validate", tampered, "--samples", "2")
    assert result.returncode == 1, result.stderr
    assert "EXCEEDS TOLERANCE" in result.stderr


def test_discrete_divergence_is_told_apart():
    """Different token choices from the same metric are a near-tie flip; from a different metric, an error."""
    metric = torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(0))
    flow = type("Flow", (), {"stage_sizes": [torch.ones(1, 5, 1)], "stage_metrics": [metric]})()
    reference = type("Ref", (), {"flow": flow})()
    names = ["tc_blk0_tome_size_out"]
    same_sizes = np.ones((1, 5, 1), dtype=np.float32)
    other_sizes = np.array([[[1], [2], [1], [1], [0]]], dtype=np.float32)
    same_metric, far_metric = metric.numpy(), metric.numpy() + 0.5
    assert not validate._diverged(reference, {names[0]: same_sizes, "tc_blk0_metric": same_metric}, names)
    assert validate._diverged(reference, {names[0]: other_sizes, "tc_blk0_metric": same_metric}, names)
    assert not validate._diverged(reference, {names[0]: other_sizes, "tc_blk0_metric": far_metric}, names)
    report = validate.ValidationReport("m", 1e-4, 1e-4, samples=[
        {"discrete_divergence": True, "within_tolerance": False, "outputs": {}},
        {"discrete_divergence": False, "within_tolerance": True, "outputs": {}},
    ])
    assert report.passed and len(report.diverged) == 1
    report.samples[1]["within_tolerance"] = False
    assert not report.passed


def test_validate_on_user_inputs(minilm_onnx, tmp_path):
    """Real sentences given as an .npz are compared too, next to the random samples."""
    from sentence_transformers import SentenceTransformer

    from tcexport import data

    out = _compress(minilm_onnx, tmp_path, r="8")
    tokenizer = SentenceTransformer(str(sources.resolve_st_path("all-MiniLM-L6-v2")), device="cpu").tokenizer
    encoded = tokenizer(data.sentences()[:5], padding="max_length", max_length=128, truncation=True,
                        return_tensors="np")
    inputs = tmp_path / "sentences.npz"
    np.savez(inputs, input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
    report_path = tmp_path / "report.json"
    result = run_cli("validate", out, "--samples", "1", "--inputs", inputs, "--json", report_path)
    assert result.returncode == 0, result.stderr
    samples = json.loads(report_path.read_text())["samples"]
    assert len(samples) == 2 and samples[1]["batch"] == 5 and samples[1]["inputs"] == str(inputs)
    assert samples[1]["within_tolerance"]
    # Short sentences lose only padding: the compressed embedding equals the uncompressed one.
    assert samples[1]["fidelity"]["sentence_embedding"]["cosine_vs_uncompressed"] > 0.99999
    np.savez(tmp_path / "wrong.npz", input_ids=encoded["input_ids"])
    assert_usage_error(run_cli("validate", out, "--inputs", tmp_path / "wrong.npz"))


def test_fused_attention_graph_fails_clearly(vit_checkpoint, tmp_path):
    """Opset 23 exports attention as one Attention node. compress decomposes it (tests/test_opsets.py); a form it
    cannot decompose (here softcap, which encoders do not use) must be refused in one line, not rewritten wrongly."""
    source = sources.load("timm:vit_tiny_patch16_224", checkpoint=vit_checkpoint)
    fused = tmp_path / "fused.onnx"
    export.export_to_file(source, fused, opset=23)
    model = onnx.load(str(fused))
    if not any(n.op_type == "Attention" for n in model.graph.node):
        pytest.skip("this torch exports opset-23 attention decomposed")
    for node in model.graph.node:
        if node.op_type == "Attention":
            kept = [a for a in node.attribute if a.name != "softcap"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("softcap", 50.0)])
    onnx.save(model, str(fused))
    for method in (["--r", "8"], ["--method", "topk", "--keep", "0.7", "--layers", "3"]):
        result = run_cli("compress", fused, *method, "-o", tmp_path / "out.onnx")
        assert_usage_error(result)
        assert "Attention" in result.stderr and "softcap" in result.stderr and "opset" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("spec_fixture", ["vit_onnx", "minilm_onnx"])
def test_metric_leaves_the_logits_chain_to_the_logits(spec_fixture, request, tmp_path):
    """The head-averaged keys are read upstream of the logits' K^T (before its scale and transpose): every value
    on the chain from there to the logits MatMul keeps the consumers it had, so ONNX Runtime can still fuse the
    scale and the transpose into the MatMul, and the metric is not transposed back ([B, H, N, d] is read)."""
    src = request.getfixturevalue(spec_fixture)
    base = onnx.load(str(src), load_external_data=False)
    model = onnx.load(str(_compress(src, tmp_path, r="2")), load_external_data=False)

    def consumer_counts(graph):
        counts = {}
        for node in graph.node:
            for name in node.input:
                counts[name] = counts.get(name, 0) + 1
        return counts

    before, after = consumer_counts(base.graph), consumer_counts(model.graph)
    producers = {out: node for node in model.graph.node for out in node.output}
    metrics = {n.name.split("/")[0]: n for n in model.graph.node if n.name.endswith("/metric")}
    blocks = find_blocks(ir.from_proto(model).graph)
    assert len(metrics) == len(blocks) > 1
    for block in blocks:
        metric = metrics[f"tc_blk{block.index}"]
        assert metric.op_type == "Reshape"  # straight to [B, N, d]: no Transpose after the head mean
        source = producers[producers[metric.input[0]].input[1]].input[0]  # metric <- MatMul <- flat <- source
        value, walked = block.keys.name, []
        while value != source:
            walked.append(value)
            assert after.get(value) == before.get(value), (value, before.get(value), after.get(value))
            producer = producers[value]
            assert producer.op_type in ("Mul", "Div", "Transpose", "Reshape"), producer.op_type
            value = producer.input[0] if producer.op_type != "Mul" or producer.input[0] not in (
                i.name for i in model.graph.initializer) else producer.input[1]
        assert walked, "the metric should not read the logits operand itself"
