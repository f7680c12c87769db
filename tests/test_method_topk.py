"""topk (EViT-style attention pruning): the ONNX builder (run by ONNX Runtime) against the PyTorch reference,
the parameters and token counts, and whole models compressed with it against their eager reference."""

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
from tcexport.methods.standalone import build_standalone_model
from tcexport.methods.topk import TopK
from tests.conftest import assert_usage_error, cli_here, run_cli

C = 16
TOL = 1e-5
SHAPES = [(n, p) for n in (197, 65, 11) for p in (0, 1, 2)]
RATES = [{"keep": 0.7}, {"keep": 0.25}, {"keep_count": 1}, {"keep_count": 5}]
OPS = {"Constant", "Slice", "TopK", "Cast", "Neg", "GatherElements", "Add", "Unsqueeze", "GatherND", "ReduceSum",
       "Greater", "Where", "Div", "MatMul", "ReduceMax", "Concat", "Identity"}


def variants(base=RATES):
    flags = [(fuse, order) for fuse in (False, True) for order in (False, True)]
    return [dict(rate, fuse=fuse, keep_order=order) for rate in base for fuse, order in flags]


def key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


@functools.lru_cache(maxsize=None)
def compiled(n: int, protected: int, params: tuple, with_mask: bool):
    model = build_standalone_model(TopK(**dict(params)), n, C, 4, protected, with_mask, name_prefix="tc_blk3_topk")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return model, session


def make_inputs(seed: int, batch: int, n: int, protected: int, with_mask: bool, ties: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n, C)).astype(np.float32)
    size = rng.integers(1, 5, (batch, n, 1)).astype(np.float32)
    size[:, :protected] = 1.0
    if ties:  # a handful of distinct values: many exact ties
        score = rng.integers(0, 4, (batch, n)).astype(np.float32) / 8.0
    else:
        score = rng.random((batch, n)).astype(np.float32)
    score /= np.maximum(score.sum(axis=1, keepdims=True), 1e-6)
    mask = None
    if with_mask:
        lengths = rng.integers(max(protected, 1), n + 1, batch)
        if batch > 1:
            lengths[0] = n  # one row without padding
            lengths[-1] = max(protected, 1)  # one row that is nearly all padding
        mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)
        score = score * mask  # padding keys get no attention
    return x, size, score.astype(np.float32), mask


def run_both(n, protected, params, x, size, score, mask):
    _, session = compiled(n, protected, key(params), mask is not None)
    feeds = {"x": x, "size": size, "cls_attention": score}
    if mask is not None:
        feeds["mask"] = mask
    onnx_out = session.run(None, feeds)
    if mask is None:
        onnx_out.append(None)
    ref = TopK(**params).reference(torch.from_numpy(x), None, torch.from_numpy(size),
                                   None if mask is None else torch.from_numpy(mask), protected,
                                   signals={"cls_attention": torch.from_numpy(score)})
    return onnx_out, [None if t is None else t.numpy() for t in ref]


def assert_agree(onnx_out, ref_out, n_out):
    for name, got, want in zip(("x", "size", "mask"), onnx_out, ref_out):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape and got.shape[1] == n_out, (name, got.shape, want.shape, n_out)
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=name)


def check_invariants(params, protected, x, size, mask, out):
    x_new, size_new, mask_new = out
    assert np.array_equal(x_new[:, :protected], x[:, :protected])
    assert np.all(size_new.sum(axis=(1, 2)) <= size.sum(axis=(1, 2)) + 1e-4)
    if params["fuse"]:  # nothing is lost: the fused token holds every dropped token
        np.testing.assert_allclose(size_new.sum(axis=(1, 2)), size.sum(axis=(1, 2)), rtol=1e-6)
    if mask is not None:
        assert np.array_equal(mask_new[:, :protected], mask[:, :protected])


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("n,protected", SHAPES)
def test_onnx_matches_reference(n, protected, with_mask):
    for params in variants():
        method = TopK(**params)
        n_out = method.tokens_out(n, protected)
        for batch in (1, 3):
            for seed in range(3):
                x, size, score, mask = make_inputs(seed, batch, n, protected, with_mask, ties=seed == 2)
                onnx_out, ref_out = run_both(n, protected, params, x, size, score, mask)
                assert_agree(onnx_out, ref_out, n_out)
                check_invariants(params, protected, x, size, mask, onnx_out)


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("n,protected", [(197, 1), (65, 2), (11, 0)])
def test_all_tied_and_edge_counts(n, protected, with_mask):
    """Every score equal (and all zero), one dropped token, nothing dropped."""
    m = n - protected
    rates = [{"keep_count": m - 1}, {"keep_count": m}, {"keep": 1.0}, {"keep": 0.5}]
    for params in variants(rates):
        n_out = TopK(**params).tokens_out(n, protected)
        for fill in (0.0, 1.0 / n):
            x, size, _, mask = make_inputs(7, 3, n, protected, with_mask)
            score = np.full((3, n), fill, np.float32)
            onnx_out, ref_out = run_both(n, protected, params, x, size, score, mask)
            assert_agree(onnx_out, ref_out, n_out)


def test_semantics_by_hand():
    # 1 protected token; scores of tokens 1..6: [.1, .2, .3, 0, .3, .1]. Keep 3: tokens 3, 5 (tie: lower index
    # first), 2 by score, or 2, 3, 5 in original order. Dropped (ranking tail): 1, 6, 4 with weights .5, .5, 0.
    score = np.array([[0.0, 0.1, 0.2, 0.3, 0.0, 0.3, 0.1]], np.float32)
    x = np.arange(7, dtype=np.float32).reshape(1, 7, 1) * np.ones((1, 1, C), np.float32)
    size = np.array([[[1], [1], [2], [1], [3], [1], [4]]], np.float32)
    cases = [({"keep_count": 3, "fuse": True, "keep_order": False}, [0, 3, 5, 2]),
             ({"keep": 0.5, "fuse": False, "keep_order": True}, [0, 2, 3, 5]),
             ({"keep": 0.5, "fuse": True, "keep_order": True}, [0, 2, 3, 5]),
             ({"keep_count": 4, "fuse": False, "keep_order": False}, [0, 3, 5, 2, 1])]  # tie .1: token 1 first
    for params, order in cases:
        onnx_out, ref_out = run_both(7, 1, params, x, size, score, None)
        assert_agree(onnx_out, ref_out, len(order) + params["fuse"])
        x_new, size_new, _ = onnx_out
        assert x_new[0, :len(order), 0].tolist() == order
        assert size_new[0, :len(order), 0].tolist() == size[0, order, 0].tolist()
        if params["fuse"]:
            np.testing.assert_allclose(x_new[0, -1], np.full(C, 0.5 * 1 + 0.5 * 6), atol=TOL)
            assert size_new[0, -1, 0] == 1 + 4 + 3


def test_padding_is_dropped_first_and_fused_padding_stays_padding():
    n, protected = 65, 1
    x, size, score, _ = make_inputs(3, 3, n, protected, False)
    lengths = np.array([20, 40, 65])
    mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)
    score = score * mask
    params = {"keep_count": 40, "fuse": True, "keep_order": True}
    onnx_out, ref_out = run_both(n, protected, params, x, size, score, mask)
    assert_agree(onnx_out, ref_out, 42)
    x_new, size_new, mask_new = onnx_out
    # Row 0: 19 real unprotected tokens, all kept (original order), then 21 padding tokens; the fused token
    # holds only padding (uniform mean, mask 0).
    assert mask_new[0].tolist() == [1.0] * 20 + [0.0] * 22
    np.testing.assert_allclose(x_new[0, 1:20], x[0, 1:20], atol=0)
    np.testing.assert_allclose(x_new[0, 41], x[0, 41:].mean(axis=0), atol=TOL)
    # Row 1: all 39 real unprotected tokens kept plus the first padding token; fused: padding only.
    assert mask_new[1].tolist() == [1.0] * 40 + [0.0] * 2
    # Row 2: no padding; the fused token is real.
    assert mask_new[2, -1] == 1.0


def test_graph_is_clean_and_named():
    model, _ = compiled(197, 1, key({"keep": 0.7, "fuse": True, "keep_order": True}), True)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    op_types = {node.op_type for node in model.graph.node}
    assert op_types <= OPS, op_types - OPS
    assert all(node.name.startswith("tc_blk3_topk/") for node in model.graph.node)
    for node in model.graph.node:
        if node.op_type == "TopK":
            assert {a.name: a.i for a in node.attribute}["sorted"] == 1
    assert [o.type.tensor_type.shape.dim[1].dim_value for o in model.graph.output] == [140] * 3
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    # The size output keeps its builder name inside a model, which validate looks for.
    op = tape.Tape()
    values = [ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
              for name, shape in [("x", [1, 197, C]), ("size", [1, 197, 1]), ("a", [1, 197])]]
    out = TopK(keep=0.7).build_onnx(op, values[0], None, values[1], None, 197, 1, name_prefix="tc_blk3_topk",
                                    signals={"cls_attention": values[2]})
    assert validate.SIZE_OUTPUT.match(out.size.name) and out.size.name == "tc_blk3_topk_size_out"
    assert out.x.name == "tc_blk3_topk_x_out"


def test_tokens_out_and_rounding():
    assert TopK(keep=0.7).tokens_out(197, 1) == 1 + 138  # ceil(0.7 * 196) = ceil(137.2)
    assert TopK(keep=0.7).tokens_out(11, 1) == 1 + 7  # 0.7 * 10 is 7.000000000000001 in floats: still 7
    assert TopK(keep=0.7, fuse=True).tokens_out(11, 1) == 9
    assert TopK(keep=0.5).tokens_out(198, 2) == 2 + 98
    assert TopK(keep=0.001).tokens_out(65, 0) == 1  # at least one
    assert TopK(keep=1.0, fuse=True).tokens_out(65, 1) == 65  # nothing dropped: a no-op
    assert TopK(keep_count=50).tokens_out(197, 1) == 51
    assert TopK(keep_count=50, fuse=True).tokens_out(197, 1) == 52
    assert TopK(keep_count=50).tokens_out(40, 1) == 40  # capped in later, smaller blocks
    assert TopK(keep_count=196, fuse=True).tokens_out(197, 1) == 197
    assert TopK(keep_count=195, fuse=True).tokens_out(197, 1) == 197  # one dropped token becomes the fused one
    TopK(keep_count=196).check_fits(197, 1)
    for method, n, p in [(TopK(keep_count=197), 197, 1), (TopK(keep=0.5), 2, 2)]:
        with pytest.raises(UsageError):
            method.check_fits(n, p)


@pytest.mark.parametrize("params", [{}, {"keep": 0.7, "keep_count": 5}, {"keep": 1.5}, {"keep": 0}, {"keep": -0.1},
                                    {"keep": True}, {"keep": "0.7"}, {"keep_count": 0}, {"keep_count": 2.5},
                                    {"keep_count": True}, {"keep": 0.7, "fuse": "yes"}, {"keep": 0.7, "order": True},
                                    {"keep": 0.7, "r": 8}, {"fuse": True}])
def test_bad_params_raise_usage_error(params):
    with pytest.raises(UsageError) as err:
        TopK(**params)
    assert "\n" not in str(err.value)


def test_registry_and_params_round_trip():
    assert METHODS["topk"] is TopK and get("topk") is TopK
    assert TopK.needs == frozenset({"cls_attention"})
    method = TopK(keep_count=np.int64(5), fuse=np.bool_(True))
    assert method.params == {"keep_count": 5, "fuse": True, "keep_order": False}
    assert TopK(**method.params).params == method.params
    assert repr(TopK(keep=1)) == "TopK(keep=1.0, fuse=False, keep_order=False)"


# ---------------------------------------------------------------------- whole models


def _assert_validates(path, samples=3, seed=0):
    report = validate.validate(path, samples=samples, seed=seed, atol=1e-5, rtol=1e-4)
    assert not report.diverged, "a near-tie flipped; pick another seed"
    assert report.passed, validate.format_report(report)
    return report


def _tokens_match(path, method: TopK, layers, protected=1):
    tokens = metadata.read(onnx.load(str(path)), metadata.TOKENS)
    count = tokens[0]["in"]
    for block in tokens:
        assert block["in"] == count
        if block["block"] in layers:
            count = method.tokens_out(count, protected)
        assert block["out"] == count
    return tokens


def test_vit_validates(vit_onnx, tmp_path):
    out = tmp_path / "vit_topk.onnx"
    params = {"keep": 0.7}
    compress.compress_file(vit_onnx, out, method="topk", params=params, layers="3,6,9")
    tokens = _tokens_match(out, TopK(**params), [3, 6, 9])
    assert [b["out"] for b in tokens][2::3] == [197, 139, 98, 69]  # ceil(.7 * 196) = 138, then 97, then 68
    record = metadata.read(onnx.load(str(out)), metadata.COMPRESSION)
    assert record["methods"] == ["topk"] * 3 and record["params"] == [TopK(**params).params] * 3
    _assert_validates(out)


@pytest.mark.parametrize("params", [{"keep": 0.7}, {"keep": 0.7, "fuse": True, "keep_order": True}],
                         ids=["keep0.7", "fuse-order"])
def test_minilm_validates(minilm_onnx, tmp_path, params):
    """Text with padding: padding is dropped first; with fuse, fused padding stays padding."""
    out = tmp_path / "minilm_topk.onnx"
    compress.compress_file(minilm_onnx, out, method="topk", params=params, layers="1,3")
    _tokens_match(out, TopK(**params), [1, 3])
    _assert_validates(out, samples=2)


def test_multi_stage_tome_then_topk(vit_onnx, tmp_path):
    out = tmp_path / "vit_mixed.onnx"
    schedule = compress.compress_file(vit_onnx, out, stages=["tome:r=8@0-5", "topk:keep=0.7@6,9"])
    after_tome = 197 - 6 * 8
    after_6 = TopK(keep=0.7).tokens_out(after_tome, 1)
    after_9 = TopK(keep=0.7).tokens_out(after_6, 1)
    assert [b["out"] for b in schedule][5:] == [after_tome] + [after_6] * 3 + [after_9] * 3
    assert metadata.read(onnx.load(str(out)), metadata.COMPRESSION)["method"] == "tome+topk"
    _assert_validates(out)


@pytest.mark.parametrize("args", [["--keep", "1.5"], ["--keep", "0.5", "--keep-count", "10"], []],
                         ids=["keep-above-1", "keep-and-count", "neither"])
def test_bad_cli_params_exit_2(vit_onnx, tmp_path, args):
    out = tmp_path / "o.onnx"
    assert_usage_error(cli_here("compress", vit_onnx, "--method", "topk", *args, "-o", out))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_keep_count_beyond_the_tokens_is_rejected(vit_onnx, tmp_path):
    out = tmp_path / "o.onnx"
    with pytest.raises(UsageError, match="keep_count=197"):
        compress.compress_file(vit_onnx, out, method="topk", params={"keep_count": 197}, layers="3")
    assert not out.exists()
