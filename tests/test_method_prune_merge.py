"""prune-merge: the ONNX builder (run by ONNX Runtime) against the PyTorch reference, the spec's padding and
layout rules, and the method end to end (compress -> validate) on ViT and MiniLM."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx_ir import tape

from tcexport.compress import rewrite as compress
from tcexport.core import metadata
from tcexport.validate import equality as validate
from tcexport.core.errors import UsageError
from tcexport.methods import METHODS, get
from tcexport.methods.prune_merge import PruneMerge, target_positions
from tcexport.methods.standalone import build_standalone_model
from tests.conftest import assert_usage_error, run_cli

C, CK = 24, 16
TOL = 1e-5
# (tokens, protected) -> (dominant, contextual) choices; the last ones are no-ops (K + M >= N - protected).
CASES = {
    (197, 1): [(100, 20), (8, 4), (1, 1), (150, 46)],
    (198, 2): [(64, 16), (1, 2), (195, 1), (190, 10)],
    (64, 0): [(30, 20), (1, 1), (60, 3), (40, 24)],
    (11, 1): [(3, 2), (1, 1), (5, 4), (6, 4)],
    (12, 2): [(2, 3), (1, 1)],
}
OP_CASES = [(n, p, k, m) for (n, p), params in CASES.items() for k, m in params]
OPS = {"Constant", "Sub", "Mul", "Where", "TopK", "Slice", "Neg", "Cast", "GatherElements", "Add", "Gather",
       "ReduceL2", "Max", "Div", "Unsqueeze", "GatherND", "Transpose", "MatMul", "ArgMax", "Equal", "Squeeze",
       "Greater", "Concat", "Identity"}


@functools.lru_cache(maxsize=None)
def compiled(n: int, protected: int, k: int, m: int, with_mask: bool):
    model = build_standalone_model(PruneMerge(dominant=k, contextual=m), n, C, CK, protected, with_mask,
                                   name_prefix="tc_blk3_prune-merge")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return model, ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def make_inputs(seed: int, batch: int, n: int, protected: int, with_mask: bool, ties: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n, C)).astype(np.float32)
    if ties:  # few distinct unit vectors and attention values: many exact ties
        palette = np.eye(CK, dtype=np.float32)[:3] * np.array([[1.0], [2.0], [0.5]], np.float32)
        metric = palette[rng.integers(0, 3, (batch, n))]
        attention = rng.integers(0, 3, (batch, n)).astype(np.float32) / 4
    else:
        metric = rng.standard_normal((batch, n, CK)).astype(np.float32)
        attention = rng.random((batch, n)).astype(np.float32)
    size = rng.integers(1, 5, (batch, n, 1)).astype(np.float32)
    size[:, :protected] = 1.0
    mask = None
    if with_mask:
        lengths = rng.integers(max(protected, 1), n + 1, batch)
        lengths[0] = n if batch > 1 else lengths[0]  # one row without padding
        mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)
        attention = attention * mask  # padding keys get exactly 0 attention after the softmax
    attention = attention / np.maximum(attention.sum(axis=1, keepdims=True), 1.0)
    return x, metric, size, mask, attention.astype(np.float32)


def run_both(n, protected, k, m, x, metric, size, mask, attention):
    _, session = compiled(n, protected, k, m, mask is not None)
    feeds = {"x": x, "metric": metric, "size": size, "cls_attention": attention}
    if mask is not None:
        feeds["mask"] = mask
    onnx_out = session.run(None, feeds)
    if mask is None:
        onnx_out.append(None)
    t = torch.from_numpy
    ref = PruneMerge(dominant=k, contextual=m).reference(t(x), t(metric), t(size), None if mask is None else t(mask),
                                                         protected, signals={"cls_attention": t(attention)})
    return onnx_out, [None if v is None else v.numpy() for v in ref]


def assert_agree(onnx_out, ref_out, n_out):
    for name, got, want in zip(("x", "size", "mask"), onnx_out, ref_out):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape and got.shape[1] == n_out, (name, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=name)


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("n,protected,k,m", OP_CASES)
def test_onnx_matches_reference(n, protected, k, m, with_mask):
    method = PruneMerge(dominant=k, contextual=m)
    n_out = method.tokens_out(n, protected)
    assert n_out == (n if k + m >= n - protected else protected + k + m)
    for batch in (1, 3):
        for seed in range(3):
            x, metric, size, mask, attention = make_inputs(seed, batch, n, protected, with_mask)
            onnx_out, ref_out = run_both(n, protected, k, m, x, metric, size, mask, attention)
            assert_agree(onnx_out, ref_out, n_out)
            x_new, size_new, mask_new = ref_out
            assert np.array_equal(x_new[:, :protected], x[:, :protected])
            np.testing.assert_allclose(size_new.sum(axis=(1, 2)), size.sum(axis=(1, 2)), rtol=1e-6)
            if n_out == n:
                continue
            # Dominant tokens: the top-K attention among the unprotected ones, copied unchanged in original order.
            for row in range(batch):
                score = attention[row, protected:] - (0 if mask is None else 4 * (1 - mask[row, protected:]))
                top = np.sort(np.argsort(-score, kind="stable")[:k]) + protected
                assert np.array_equal(x_new[row, protected:protected + k], x[row, top])
                assert np.array_equal(size_new[row, protected:protected + k], size[row, top])
            if mask is not None and m >= 2:  # real and padding never mix
                np.testing.assert_allclose((size_new[..., 0] * mask_new).sum(1), (size[..., 0] * mask).sum(1))


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("n,protected,k,m", [(197, 1, 100, 20), (11, 1, 3, 2), (64, 0, 1, 1), (12, 2, 2, 3)])
def test_ties_agree(n, protected, k, m, with_mask):
    for seed in range(3):
        x, metric, size, mask, attention = make_inputs(seed, 3, n, protected, with_mask, ties=True)
        onnx_out, ref_out = run_both(n, protected, k, m, x, metric, size, mask, attention)
        assert_agree(onnx_out, ref_out, protected + k + m)


def test_hand_worked_example():
    # 9 tokens, CLS protected; dominant 2, contextual 2.
    n, p, k, m = 9, 1, 2, 2
    attention = np.array([[0.3, 0.05, 0.2, 0.05, 0.1, 0.2, 0.0, 0.05, 0.05]], np.float32)
    # Dominant: tokens 2 and 5 (0.2 each; token 4 has 0.1). Remaining: 1, 3, 4, 6, 7, 8 (R = 6);
    # targets at list positions 0 and 5: tokens 1 and 8. Keys: tokens 3, 4 look like token 1, 6, 7 like 8.
    metric = np.zeros((1, n, CK), np.float32)
    metric[0, [1, 3, 4], 0] = 1.0
    metric[0, [6, 7, 8], 1] = 1.0
    metric[0, 4, 1] = 0.5  # still closer to token 1
    x = np.random.default_rng(0).standard_normal((1, n, C)).astype(np.float32)
    size = np.array([[1, 1, 1, 2, 1, 1, 1, 1, 3]], np.float32)[..., None]
    onnx_out, ref_out = run_both(n, p, k, m, x, metric, size, None, attention)
    assert_agree(onnx_out, ref_out, 5)
    x_new, size_new, _ = onnx_out
    assert size_new[0, :, 0].tolist() == [1, 1, 1, 4, 5]
    assert np.array_equal(x_new[0, :3], x[0, [0, 2, 5]])
    np.testing.assert_allclose(x_new[0, 3], (x[0, 1] + 2 * x[0, 3] + x[0, 4]) / 4, atol=TOL)
    np.testing.assert_allclose(x_new[0, 4], (x[0, 6] + x[0, 7] + 3 * x[0, 8]) / 5, atol=TOL)


def test_padding_never_dominant_nor_mixed():
    n, p, k, m = 32, 1, 4, 3
    x, metric, size, _, _ = make_inputs(7, 2, n, p, False)
    size[:] = 1.0
    mask = (np.arange(n)[None, :] < np.array([[12], [6]])).astype(np.float32)
    attention = np.where(mask > 0, 0.0, 0.0).astype(np.float32)  # every score 0: only the tiers decide
    onnx_out, ref_out = run_both(n, p, k, m, x, metric, size, mask, attention)
    assert_agree(onnx_out, ref_out, p + k + m)
    _, size_new, mask_new = onnx_out
    # Row 0: dominant = tokens 1-4 (ties -> lower index), remaining real 5..11 -> first target real, the rest
    # padding. Row 1: dominant = 1-4 (real), remaining real token 5 is a target alone.
    assert mask_new.tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]]
    assert size_new[0, :, 0].tolist()[:6] == [1, 1, 1, 1, 1, 7]
    assert size_new[1, :, 0].tolist()[:6] == [1, 1, 1, 1, 1, 1]
    np.testing.assert_allclose((size_new[..., 0] * mask_new).sum(1), [12, 6])


def test_target_positions():
    assert target_positions(10, 3).tolist() == [0, 5, 9]  # 4.5 rounds up
    assert target_positions(7, 1).tolist() == [0]
    assert target_positions(96, 20).tolist()[:3] == [0, 5, 10] and target_positions(96, 20)[-1] == 95
    for rem in range(2, 60):
        for m in range(1, rem):
            pos = target_positions(rem, m)
            assert len(set(pos.tolist())) == m and pos[0] == 0 and pos.max() == (rem - 1 if m > 1 else 0)
            assert np.all(np.diff(pos) >= 1)


def test_graph_is_clean():
    model, _ = compiled(198, 2, 64, 16, True)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    op_types = {node.op_type for node in model.graph.node}
    assert op_types <= OPS, op_types - OPS
    assert all(node.name.startswith("tc_blk3_prune-merge/") for node in model.graph.node)
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.type.tensor_type.shape.dim[1].dim_value for o in model.graph.output] == [82, 82, 82]
    topk_k = []
    constants = {node.output[0]: node for node in model.graph.node if node.op_type == "Constant"}
    for node in model.graph.node:
        if node.op_type == "TopK":
            topk_k.append(int(onnx.numpy_helper.to_array(constants[node.input[1]].attribute[0].t)[0]))
    assert max(topk_k) < 3840 and sorted(topk_k) == [64, 196 - 64, 196]
    # The size output carries the name validate looks for (named before build_standalone_model renames it).
    def value(name, *dims):
        return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 16, *dims]))

    out = PruneMerge(dominant=4, contextual=2).build_onnx(
        tape.Tape(), value("x", C), value("metric", CK), value("size", 1), None, 16, 1,
        name_prefix="tc_blk3_prune-merge", signals={"cls_attention": value("cls_attention")})
    assert out.size.name == "tc_blk3_prune-merge_size_out" and validate.SIZE_OUTPUT.match(out.size.name)
    assert isinstance(out.x, ir.Value) and out.x.name == "tc_blk3_prune-merge_x_out"


@pytest.mark.parametrize("params", [{}, {"dominant": 4}, {"contextual": 4}, {"dominant": 0, "contextual": 4},
                                    {"dominant": 4, "contextual": 0}, {"dominant": -1, "contextual": 2},
                                    {"dominant": 2.5, "contextual": 2}, {"dominant": True, "contextual": 2},
                                    {"dominant": "4", "contextual": 2}, {"dominant": 4, "contextual": 2, "r": 8}])
def test_bad_params_raise_usage_error(params):
    with pytest.raises(UsageError) as err:
        PruneMerge(**params)
    assert "\n" not in str(err.value)


def test_registry_and_fits():
    assert METHODS["prune-merge"] is PruneMerge and get("prune-merge") is PruneMerge
    method = PruneMerge(dominant=np.int64(100), contextual=20)
    assert method.params == {"dominant": 100, "contextual": 20} and method.needs == {"cls_attention", "keys"}
    assert method.tokens_out(197, 1) == 121 and method.tokens_out(121, 1) == 121 and method.tokens_out(50, 1) == 50
    method.check_fits(121, 1)  # K + M == N - protected: allowed, a no-op
    with pytest.raises(UsageError, match="lower --dominant or --contextual"):
        method.check_fits(120, 1)


# ---------------------------------------------------------------------- end to end


def _tokens_expected(method, count, blocks, layers, protected=1):
    expected = []
    for block in range(blocks):
        out = method.tokens_out(count, protected) if block in layers else count
        expected.append({"in": count, "out": out})
        count = out
    return expected


def _check_model(path, method, blocks, layers, n0):
    model = onnx.load(str(path))
    tokens = metadata.read(model, metadata.TOKENS)
    assert [{"in": t["in"], "out": t["out"]} for t in tokens] == _tokens_expected(method, n0, blocks, layers)
    record = metadata.read(model, metadata.COMPRESSION)
    assert record["method"] == "prune-merge" and record["params"] == [method.params] * len(layers)
    assert not [n for n in model.graph.node if n.op_type.startswith("Scatter")]
    report = validate.validate(path, samples=3, atol=1e-5, rtol=1e-4)
    assert not report.diverged, "a near-tie flipped; pick another seed"
    assert report.passed, validate.format_report(report)


def test_vit_layer3_matches_reference(vit_onnx, tmp_path):
    out = tmp_path / "vit_pm.onnx"
    compress.compress_file(vit_onnx, out, method="prune-merge", params={"dominant": 100, "contextual": 20},
                           layers="3")
    _check_model(out, PruneMerge(dominant=100, contextual=20), 12, [3], 197)


def test_minilm_matches_reference(minilm_onnx, tmp_path):
    out = tmp_path / "minilm_pm.onnx"
    compress.compress_file(minilm_onnx, out, method="prune-merge", params={"dominant": 40, "contextual": 16},
                           layers="1")
    _check_model(out, PruneMerge(dominant=40, contextual=16), 6, [1], 128)


def test_bad_cli_request_exits_2(vit_onnx, tmp_path):
    out = tmp_path / "o.onnx"
    assert_usage_error(run_cli("compress", vit_onnx, "--method", "prune-merge", "--dominant", "0", "--contextual", "8",
                               "-o", out))
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options", [
    dict(params={"dominant": 100}),
    dict(params={"dominant": 100, "contextual": 20}, r="8"),
    dict(params={"dominant": 150, "contextual": 50}),  # 200 > 196 unprotected tokens
])
def test_bad_requests_in_process(vit_onnx, tmp_path, options):
    out = tmp_path / "o.onnx"
    with pytest.raises(UsageError):
        compress.compress_file(vit_onnx, out, method="prune-merge", **options)
    assert not out.exists()
