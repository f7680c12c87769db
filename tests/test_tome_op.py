"""ToMe: the ONNX builder (run by ONNX Runtime) against the PyTorch reference, plus params and schedule."""

from __future__ import annotations

import functools
from fractions import Fraction

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tcexport.core.errors import UsageError
from tcexport.methods import METHODS, get
from tcexport.methods.standalone import build_standalone_model
from tcexport.methods.tome import ToMe, log_size_bias, schedule

C, CK = 24, 16
SHAPES = [(197, 1), (198, 2), (64, 0), (11, 1), (5, 1)]  # (tokens, protected)
RS = [0, 1, 8, 16, 1000]  # 1000: above the cap for every shape
TOL = 1e-5
# Plain ops that ONNX Runtime and TensorRT 10.3 (without its plugin library) both run.
GEMM_OPS = {"Constant", "ReduceL2", "Max", "Div", "Slice", "Transpose", "MatMul", "Sub", "Unsqueeze", "Mul",
            "Add", "Where", "ReduceMax", "ReduceSum", "ArgMax", "TopK", "Equal", "Cast", "Neg", "GatherND", "GatherElements",
            "Concat", "Squeeze", "Greater", "Identity", "Pad", "Gather", "Split"}


@functools.lru_cache(maxsize=None)
def compiled(n: int, protected: int, r: int, with_mask: bool):
    model = build_standalone_model(ToMe(r=r), n, C, CK, protected, with_mask, name_prefix="tome_blk5")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1  # tiny graphs: threads only add overhead
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return model, session


def make_inputs(seed: int, batch: int, n: int, protected: int, with_mask: bool, ones: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n, C)).astype(np.float32)
    metric = rng.standard_normal((batch, n, CK)).astype(np.float32)
    # Sizes are token counts; protected tokens are never merged, so theirs stay 1.
    size = np.ones((batch, n, 1), np.float32) if ones else rng.integers(1, 5, (batch, n, 1)).astype(np.float32)
    size[:, :protected] = 1.0
    mask = None
    if with_mask:
        lengths = rng.integers(max(protected, 1), n + 1, batch)
        lengths[0] = n if batch > 1 else lengths[0]  # one row without padding
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
    ref = ToMe(r=r).reference(torch.from_numpy(x), torch.from_numpy(metric), torch.from_numpy(size),
                              None if mask is None else torch.from_numpy(mask), protected)
    ref_out = [None if t is None else t.numpy() for t in ref]
    return onnx_out, ref_out


def assert_agree(onnx_out, ref_out, n_out):
    for name, got, want in zip(("x", "size", "mask"), onnx_out, ref_out):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape and got.shape[1] == n_out, name
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=name)


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("r", RS)
@pytest.mark.parametrize("n,protected", SHAPES)
def test_onnx_matches_reference(n, protected, r, with_mask):
    n_out = ToMe(r=r).tokens_out(n, protected)
    for batch in (1, 3):
        for seed in range(3):
            x, metric, size, mask = make_inputs(seed, batch, n, protected, with_mask)
            onnx_out, ref_out = run_both(n, protected, r, x, metric, size, mask)
            assert_agree(onnx_out, ref_out, n_out)
            for out in (onnx_out, ref_out):
                x_new, size_new, mask_new = out
                assert np.array_equal(x_new[:, :protected], x[:, :protected])
                assert np.array_equal(size_new[:, :protected], size[:, :protected])
                np.testing.assert_allclose(size_new.sum(axis=(1, 2)), size.sum(axis=(1, 2)), rtol=1e-6)
                if mask is not None:
                    assert np.array_equal(mask_new[:, :protected], mask[:, :protected])


def removable_padding(n: int, length: int) -> int:
    """Padding A tokens (even index >= length) that can merge with a padding B token (odd index >= length)."""
    pad = np.arange(length, n)
    return int((pad % 2 == 0).sum()) if (pad % 2 == 1).any() else 0


@pytest.mark.parametrize("n", [64, 197])
def test_real_tokens_untouched_while_padding_lasts(n):
    protected = 1
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        lengths = rng.integers(2, n - 8, 3)
        r = min(removable_padding(n, int(length)) for length in lengths)
        assert r > 0
        x, metric, size, _ = make_inputs(seed, 3, n, protected, False, ones=True)
        mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)
        onnx_out, ref_out = run_both(n, protected, r, x, metric, size, mask)
        assert_agree(onnx_out, ref_out, n - r)
        for x_new, size_new, mask_new in (onnx_out, ref_out):
            for row, length in enumerate(lengths):
                real = mask_new[row] == 1
                assert real.sum() == length
                assert np.all(size_new[row][real] == 1.0)
                got = x_new[row][real]
                want = x[row, :length]
                assert np.array_equal(got[np.lexsort(got.T)], want[np.lexsort(want.T)])


def tied_metric(seed: int, batch: int, n: int, palette_size: int) -> np.ndarray:
    """Rows drawn from a few vectors whose normalised dot products are exact (0, 0.5, 1): many exact ties."""
    palette = np.zeros((4, CK), np.float32)
    palette[0, 0] = 1.0
    palette[1, 1] = 1.0
    palette[2, 2] = 2.0  # norm 2 -> normalised exactly to e2
    palette[3, :4] = 1.0  # norm 2 -> (0.5, 0.5, 0.5, 0.5, 0, ...)
    choice = np.random.default_rng(seed).integers(0, palette_size, (batch, n))
    return palette[choice]


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("palette_size", [1, 4])
@pytest.mark.parametrize("n,protected", [(197, 1), (198, 2), (11, 1)])
def test_ties_agree(n, protected, palette_size, with_mask):
    for r in (1, 8, 1000):
        for seed in range(2):
            x, _, size, mask = make_inputs(seed, 3, n, protected, with_mask)
            metric = tied_metric(seed, 3, n, palette_size)
            onnx_out, ref_out = run_both(n, protected, r, x, metric, size, mask)
            assert_agree(onnx_out, ref_out, ToMe(r=r).tokens_out(n, protected))


def test_all_equal_scores_merge_first_a_tokens_into_first_b_token():
    # Every score ties: the first r unprotected A tokens merge into the first unprotected B token.
    n, protected, r = 11, 1, 3
    x, _, size, _ = make_inputs(0, 1, n, protected, False, ones=True)
    metric = tied_metric(0, 1, n, 1)
    onnx_out, ref_out = run_both(n, protected, r, x, metric, size, None)
    assert_agree(onnx_out, ref_out, n - r)
    # A = 0,2,4,6,8,10 (0 protected) -> 2,4,6 merge into token 1; out: [0, 8, 10, 1+2+4+6, 3, 5, 7, 9]
    x_new, size_new, _ = onnx_out
    assert size_new[0, :, 0].tolist() == [1, 1, 1, 4, 1, 1, 1, 1]
    np.testing.assert_allclose(x_new[0, 3], x[0, [1, 2, 4, 6]].mean(axis=0), atol=TOL)
    assert np.array_equal(x_new[0, [0, 1, 2, 4, 5, 6, 7]], x[0, [0, 8, 10, 3, 5, 7, 9]])


def test_equal_shares_stay_exactly_equal_on_one_hot_rows():
    # graph/positions.py reads which input token holds the largest share of each output row (one-hot rows in,
    # first argmax out, as the reference reads it). Three tokens of size 1 merged into one must hold exactly
    # 1/3 each, bit for bit as in the reference, or the argmax picks another token than the reference does.
    n, protected, r = 11, 1, 2
    x = np.zeros((1, n, C), np.float32)
    x[0, :, :n] = np.eye(n, dtype=np.float32)
    _, _, size, _ = make_inputs(0, 1, n, protected, False, ones=True)
    onnx_out, ref_out = run_both(n, protected, r, x, tied_metric(0, 1, n, 1), size, None)
    # As in the test above, the first r unprotected A tokens (2, 4) merge into token 1: out [0, 6, 8, 10, 1+2+4, ...]
    merged = onnx_out[0][0, 4, :n]
    assert np.array_equal(merged, ref_out[0][0, 4, :n])
    assert len(set(merged[[1, 2, 4]].tolist())) == 1 and merged[[1, 2, 4]].sum() == pytest.approx(1)
    assert int(np.argmax(merged)) == 1


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("r", [0, 8])
def test_graph_is_clean_gemm_onnx(r, with_mask):
    model, _ = compiled(198, 2, r, with_mask)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    op_types = {node.op_type for node in model.graph.node}
    assert not any(t.startswith("Scatter") for t in op_types)
    assert op_types <= GEMM_OPS, op_types - GEMM_OPS
    assert all(node.name.startswith("tome_blk5/") for node in model.graph.node)
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    n_out = ToMe(r=r).tokens_out(198, 2)
    assert [o.type.tensor_type.shape.dim[1].dim_value for o in model.graph.output] == [n_out] * len(model.graph.output)
    if r:
        # Static shapes: every k and split size is a constant. The ranking holds every token: its first r entries
        # are merged, the rest are the N - r output tokens.
        producers = {out: node for node in model.graph.node for out in node.output}
        for node in model.graph.node:
            if node.op_type in ("TopK", "Split"):
                assert producers[node.input[1]].op_type == "Constant"
        split = next(node for node in model.graph.node if node.op_type == "Split")
        sizes = onnx.numpy_helper.to_array(producers[split.input[1]].attribute[0].t).tolist()
        assert sizes == [r, 198 - r]


def test_tokens_out_and_cap():
    assert ToMe(r=16).tokens_out(197, 1) == 181
    assert ToMe(r=1000).tokens_out(197, 1) == 99
    assert ToMe(r=1000).tokens_out(198, 2) == 100
    assert ToMe(r=1000).tokens_out(5, 1) == 3
    assert ToMe(r=0).tokens_out(64, 0) == 64
    assert ToMe(r=3).tokens_out(2, 1) == 2


@pytest.mark.parametrize("params", [{"r": -1}, {"r": 1.5}, {"r": "8"}, {"r": True}, {"r": None}, {},
                                    {"r": 4, "ratio": 0.5}])
def test_bad_params_raise_usage_error(params):
    with pytest.raises(UsageError) as err:
        ToMe(**params)
    assert "\n" not in str(err.value)


def test_registry():
    assert METHODS["tome"] is ToMe and get("tome") is ToMe
    assert repr(get("tome")(r=np.int64(4))) == "ToMe(r=4)"
    with pytest.raises(UsageError, match="unknown method 'nope'; choose one of .*tome"):
        get("nope")


def tome_parse_r_decreasing(r: int, num_layers: int) -> list[int]:
    # ToMe's parse_r((r, -1)): from int(r * 2) down to 2r - int(r * 2) = 0 in equal float steps, truncated.
    start = int(r * (1.0 - -1.0))
    stop = 2 * r - start
    step = (stop - start) / (num_layers - 1)
    return [int(start + step * i) for i in range(num_layers)]


@pytest.mark.parametrize("r,layers", [(8, 12), (16, 12), (13, 24), (25, 23), (29, 15), (0, 12), (5, 2)])
def test_schedule(r, layers):
    assert schedule(r, layers, "constant") == [r] * layers
    decreasing = schedule(r, layers, "decreasing")
    assert decreasing == tome_parse_r_decreasing(r, layers)
    assert sum(decreasing) == sum(tome_parse_r_decreasing(r, layers))
    assert decreasing[0] == 2 * r and decreasing[-1] == 0
    assert all(a >= b for a, b in zip(decreasing, decreasing[1:]))
    exact = sum(int(Fraction(2 * r * (layers - 1 - i), layers - 1)) for i in range(layers))
    assert exact - layers <= sum(decreasing) <= exact  # float truncation may drop 1 where exact is integral


def test_schedule_float_truncation_like_tome_and_errors():
    # 2r * i / (L-1) is integral at i = 11 for r=25, L=23, but ToMe's float steps land just below it.
    assert sum(schedule(25, 23, "decreasing")) == 564
    assert schedule(4, 1, "decreasing") == [8] and schedule(4, 1, "constant") == [4]
    for args in [(4, 12, "increasing"), (-1, 12, "constant"), (4, 0, "constant")]:
        with pytest.raises(UsageError):
            schedule(*args)


def test_log_size_bias_shape():
    size = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = log_size_bias(size)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias[0, 0, 0], torch.log(torch.tensor([1.0, 2.0, 4.0])))
