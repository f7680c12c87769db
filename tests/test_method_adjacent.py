"""adjacent: the ONNX builder (run by ONNX Runtime) against the PyTorch reference, the spec's pairing, order and
padding rules, and the method end to end (compress -> validate) on MiniLM and ViT."""

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
from tcexport.methods.adjacent import Adjacent
from tcexport.methods.standalone import build_standalone_model

from tests.conftest import assert_usage_error, run_cli

C, CK = 24, 16
TOL = 1e-5
SHAPES = [(197, 1), (198, 2), (64, 0), (11, 1), (12, 2), (5, 2)]  # (tokens, protected); odd and even N - p
RS = [0, 1, 8, 30, 1000]  # 1000: above the cap for every shape
OPS = {"Constant", "ReduceL2", "Max", "Div", "Slice", "Mul", "ReduceSum", "Sub", "Add", "TopK", "Unsqueeze",
       "Equal", "Cast", "ReduceMax", "Neg", "Gather", "GatherElements", "Greater", "GatherND", "Where", "Identity"}


@functools.lru_cache(maxsize=None)
def compiled(n: int, protected: int, r: int, with_mask: bool):
    model = build_standalone_model(Adjacent(r=r), n, C, CK, protected, with_mask, name_prefix="tc_blk0_adjacent")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return model, ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def make_inputs(seed: int, batch: int, n: int, protected: int, with_mask: bool, ties: bool = False,
                ones: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n, C)).astype(np.float32)
    if ties:  # normalised dot products are exactly 0, 0.5 or 1: many exact ties
        palette = np.zeros((3, CK), np.float32)
        palette[0, 0], palette[1, 1], palette[2, :4] = 1.0, 2.0, 1.0
        metric = palette[rng.integers(0, 3, (batch, n))]
    else:
        metric = rng.standard_normal((batch, n, CK)).astype(np.float32)
    size = np.ones((batch, n, 1), np.float32) if ones else rng.integers(1, 5, (batch, n, 1)).astype(np.float32)
    size[:, :protected] = 1.0
    mask = None
    if with_mask:
        lengths = rng.integers(max(protected, 1), n + 1, batch)
        lengths[0] = n if batch > 1 else lengths[0]
        mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)
    return x, metric, size, mask


def run_both(n, protected, r, x, metric, size, mask):
    _, session = compiled(n, protected, r, mask is not None)
    feeds = {"x": x, "metric": metric, "size": size}
    if mask is not None:
        feeds["mask"] = mask
    onnx_out = session.run(None, feeds)
    if mask is None:
        onnx_out.append(None)
    t = torch.from_numpy
    ref = Adjacent(r=r).reference(t(x), t(metric), t(size), None if mask is None else t(mask), protected)
    return onnx_out, [None if v is None else v.numpy() for v in ref]


def assert_agree(onnx_out, ref_out, n_out):
    for name, got, want in zip(("x", "size", "mask"), onnx_out, ref_out):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape and got.shape[1] == n_out, (name, got.shape, want.shape)
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=name)


def groups_in_order(x, size, x_new, size_new, protected):
    """Check the output is the input in order with disjoint (2k, 2k+1) pairs averaged: rebuild it greedily."""
    for row in range(x.shape[0]):
        i = 0
        for j in range(x_new.shape[1]):
            if np.array_equal(x_new[row, j], x[row, i]) and size_new[row, j, 0] == size[row, i, 0]:
                i += 1
                continue
            assert i >= protected and (i - protected) % 2 == 0, "a merge that is not a candidate pair"
            s = size[row, i, 0] + size[row, i + 1, 0]
            assert size_new[row, j, 0] == s
            want = (x[row, i] * size[row, i, 0] + x[row, i + 1] * size[row, i + 1, 0]) / s
            np.testing.assert_allclose(x_new[row, j], want, atol=TOL)
            i += 2
        assert i == x.shape[1]


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("r", RS)
@pytest.mark.parametrize("n,protected", SHAPES)
def test_onnx_matches_reference(n, protected, r, with_mask):
    n_out = Adjacent(r=r).tokens_out(n, protected)
    assert n_out == n - min(r, (n - protected) // 2)
    for batch in (1, 3):
        for seed in range(3):
            x, metric, size, mask = make_inputs(seed, batch, n, protected, with_mask)
            onnx_out, ref_out = run_both(n, protected, r, x, metric, size, mask)
            assert_agree(onnx_out, ref_out, n_out)
            x_new, size_new, _ = ref_out
            np.testing.assert_allclose(size_new.sum(axis=(1, 2)), size.sum(axis=(1, 2)), rtol=1e-6)
            if seed == 0:
                groups_in_order(x, size, x_new, size_new, protected)


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("n,protected", [(197, 1), (12, 2), (11, 0)])
def test_ties_agree(n, protected, with_mask):
    for r in (1, 4, 1000):
        for seed in range(3):
            x, metric, size, mask = make_inputs(seed, 3, n, protected, with_mask, ties=True)
            onnx_out, ref_out = run_both(n, protected, r, x, metric, size, mask)
            assert_agree(onnx_out, ref_out, Adjacent(r=r).tokens_out(n, protected))


def test_all_ties_merge_the_first_pairs():
    n, p, r = 10, 1, 2
    x, _, size, _ = make_inputs(0, 1, n, p, False, ones=True)
    metric = np.ones((1, n, CK), np.float32)
    onnx_out, ref_out = run_both(n, p, r, x, metric, size, None)
    assert_agree(onnx_out, ref_out, n - r)
    # Pairs (1,2), (3,4), (5,6), (7,8); token 9 is unpaired. All tie: (1,2) and (3,4) merge.
    x_new, size_new, _ = onnx_out
    assert size_new[0, :, 0].tolist() == [1, 2, 2, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(x_new[0, 1], (x[0, 1] + x[0, 2]) / 2, atol=TOL)
    assert np.array_equal(x_new[0, [0, 3, 4, 5, 6, 7]], x[0, [0, 5, 6, 7, 8, 9]])


def test_most_similar_pairs_merge():
    n, p, r = 9, 1, 2
    x, _, size, _ = make_inputs(1, 1, n, p, False)
    metric = np.eye(CK, dtype=np.float32)[np.arange(n)][None]  # every pair orthogonal ...
    metric[0, 6] = metric[0, 5]  # ... but (5, 6)
    metric[0, 4] = 0.9 * metric[0, 3] + 0.1 * metric[0, 4]  # and (3, 4), less so
    metric[0, 2] = metric[0, 3]  # (2, 3) is identical but straddles two candidate pairs: never merged
    onnx_out, ref_out = run_both(n, p, r, x, metric, size, None)
    assert_agree(onnx_out, ref_out, n - r)
    _, size_new, _ = onnx_out
    s = size[0, :, 0]
    assert size_new[0, :, 0].tolist() == [s[0], s[1], s[2], s[3] + s[4], s[5] + s[6], s[7], s[8]]


@pytest.mark.parametrize("n", [64, 197])
def test_padding_pairs_merge_first(n):
    protected = 1
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        lengths = rng.integers(2, n - 8, 3)
        # Pure padding pairs: both members at or past the length.
        pure = [int(((np.arange(protected, n - 1, 2) >= length)).sum()) for length in lengths]
        r = min(pure)
        assert r > 0
        x, metric, size, _ = make_inputs(seed, 3, n, protected, False, ones=True)
        mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)
        onnx_out, ref_out = run_both(n, protected, r, x, metric, size, mask)
        assert_agree(onnx_out, ref_out, n - r)
        for x_new, size_new, mask_new in (onnx_out, ref_out):
            for row, length in enumerate(lengths):
                real = mask_new[row] == 1
                assert real.sum() == length and np.all(size_new[row][real] == 1.0)
                assert np.array_equal(x_new[row][real], x[row, :length])  # real tokens untouched, in order
        # One more than the pure padding pairs of the shortest row: real pairs merge before mixed ones.
        onnx_out, ref_out = run_both(n, protected, r + 1, x, metric, size, mask)
        assert_agree(onnx_out, ref_out, n - r - 1)
        _, size_new, mask_new = onnx_out
        np.testing.assert_allclose((size_new[..., 0] * mask_new).sum(1), lengths)


def test_graph_is_clean():
    model, _ = compiled(198, 2, 8, True)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    op_types = {node.op_type for node in model.graph.node}
    assert op_types <= OPS, op_types - OPS
    assert all(node.name.startswith("tc_blk0_adjacent/") for node in model.graph.node)
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [o.type.tensor_type.shape.dim[1].dim_value for o in model.graph.output] == [190] * 3
    constants = {node.output[0]: node for node in model.graph.node if node.op_type == "Constant"}
    ks = sorted(int(onnx.numpy_helper.to_array(constants[node.input[1]].attribute[0].t)[0])
                for node in model.graph.node if node.op_type == "TopK")
    assert ks == [8, 190]
    # The size output carries the name validate looks for.
    values = [ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 16, d]))
              for name, d in (("x", C), ("metric", CK), ("size", 1))]
    out = Adjacent(r=3).build_onnx(tape.Tape(), values[0], values[1], values[2], None, 16, 1,
                                   name_prefix="tc_blk0_adjacent")
    assert out.size.name == "tc_blk0_adjacent_size_out" and validate.SIZE_OUTPUT.match(out.size.name)
    assert out.x.name == "tc_blk0_adjacent_x_out" and out.mask is None


def test_registry_tokens_and_fits():
    assert METHODS["adjacent"] is Adjacent and get("adjacent") is Adjacent and Adjacent.needs == {"keys"}
    assert repr(Adjacent(r=np.int64(4))) == "Adjacent(r=4)"
    assert Adjacent(r=8).tokens_out(128, 1) == 120 and Adjacent(r=1000).tokens_out(128, 1) == 65
    assert Adjacent(r=1000).tokens_out(128, 0) == 64 and Adjacent(r=3).tokens_out(2, 1) == 2
    Adjacent(r=98).check_fits(197, 1)
    with pytest.raises(UsageError, match="at most .* = 98"):
        Adjacent(r=99).check_fits(197, 1)


@pytest.mark.parametrize("params", [{}, {"r": -1}, {"r": 1.5}, {"r": "8"}, {"r": "4,8"}, {"r": True},
                                    {"r": None}, {"r": 4, "offset": 1}])
def test_bad_params_raise_usage_error(params):
    with pytest.raises(UsageError) as err:
        Adjacent(**params)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------- end to end


def _check_model(path, method, n0, blocks, layers):
    model = onnx.load(str(path))
    tokens = metadata.read(model, metadata.TOKENS)
    count, expected = n0, []
    for block in range(blocks):
        out = method.tokens_out(count, 1) if block in layers else count
        expected.append((count, out))
        count = out
    assert [(t["in"], t["out"]) for t in tokens] == expected
    record = metadata.read(model, metadata.COMPRESSION)
    assert record["method"] == "adjacent" and record["layers"] == layers
    assert record["params"] == [method.params] * len(layers)
    assert not [n for n in model.graph.node if n.op_type.startswith("Scatter")]
    report = validate.validate(path, samples=3, atol=1e-5, rtol=1e-4)
    assert not report.diverged, "a near-tie flipped; pick another seed"
    assert report.passed, validate.format_report(report)


def test_minilm_sequences_match_reference(minilm_onnx, tmp_path):
    out = tmp_path / "minilm_adjacent.onnx"
    compress.compress_file(minilm_onnx, out, method="adjacent", r="8", layers="0-2")
    _check_model(out, Adjacent(r=8), 128, 6, [0, 1, 2])


def test_vit_matches_reference(vit_onnx, tmp_path):
    out = tmp_path / "vit_adjacent.onnx"
    compress.compress_file(vit_onnx, out, method="adjacent", params={"r": 16}, layers="2,5,8")
    _check_model(out, Adjacent(r=16), 197, 12, [2, 5, 8])


def test_bad_cli_request_exits_2(vit_onnx, tmp_path):
    out = tmp_path / "o.onnx"  # the cap for 197 tokens with CLS is 98
    assert_usage_error(run_cli("compress", vit_onnx, "--method", "adjacent", "--r", "99", "-o", out))
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options", [dict(r=None), dict(r="-1"), dict(r="4,8", layers="1,2"),
                                     dict(r="4", schedule="decreasing")])
def test_bad_requests_in_process(vit_onnx, tmp_path, options):
    out = tmp_path / "o.onnx"
    with pytest.raises(UsageError):
        compress.compress_file(vit_onnx, out, method="adjacent", **options)
    assert not out.exists()
