"""pool (size-weighted average pooling of the token grid or sequence): the ONNX builder (run by ONNX Runtime)
against the PyTorch reference and a brute-force loop over the spec's windows, parameters and token counts, and a
whole ViT pooled at one block against its eager reference."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tcexport.compress import rewrite as compress
from tcexport.core import metadata
from tcexport.validate import equality as validate
from tcexport.core.errors import UsageError
from tcexport.methods import METHODS, get
from tcexport.methods.pool import Pool
from tcexport.methods.standalone import build_standalone_model
from tests.conftest import assert_usage_error, run_cli

C = 12
TOL = 1e-5
# (tokens, protected, params, tokens out)
CASES = [
    (197, 1, {"kernel": 2}, 1 + 49),  # 1 + 14x14
    (197, 1, {"kernel": 7}, 1 + 4),
    (65, 1, {"kernel": 2}, 1 + 16),  # 1 + 8x8
    (66, 2, {"kernel": 2}, 2 + 16),
    (64, 0, {"kernel": 4}, 4),
    (197, 1, {"kernel": 2, "grid": "1d"}, 1 + 98),
    (128, 1, {"kernel": 2}, 1 + 64),  # 127: 1-D, short last window of 1
    (20, 2, {"kernel": 4, "grid": "1d"}, 2 + 5),  # 18 = 4 * 4 + 2
    (23, 0, {"kernel": 3}, 8),
    (5, 1, {"kernel": 8, "grid": "1d"}, 1 + 1),  # fewer tokens than the kernel: one window
    (65, 1, {"kernel": 1}, 65),  # no-op
]
OPS = {"Constant", "Slice", "Mul", "Pad", "Reshape", "ReduceSum", "ReduceMax", "Div", "Concat", "Identity"}


def key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


@functools.lru_cache(maxsize=None)
def compiled(n: int, protected: int, params: tuple, with_mask: bool):
    model = build_standalone_model(Pool(**dict(params)), n, C, 4, protected, with_mask, name_prefix="tc_blk6_pool")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return model, ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def make_inputs(seed: int, batch: int, n: int, protected: int, with_mask: bool):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n, C)).astype(np.float32)
    size = rng.integers(1, 5, (batch, n, 1)).astype(np.float32)
    size[:, :protected] = 1.0
    mask = None
    if with_mask:
        lengths = rng.integers(max(protected, 1), n + 1, batch)
        mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)
    return x, size, mask


def brute_force(method: Pool, x, size, mask, protected):
    """The spec read literally: loop over the windows of Pool.window_index."""
    window = method.window_index(x.shape[1], protected)
    outs_x, outs_s, outs_m = [x[:, :protected]], [size[:, :protected]], [None if mask is None else mask[:, :protected]]
    for w in range(window.max() + 1):
        members = protected + np.flatnonzero(window == w)
        s = size[:, members]
        outs_x.append(((x[:, members] * s).sum(1) / s.sum(1))[:, None])
        outs_s.append(s.sum(1)[:, None])
        if mask is not None:
            outs_m.append(mask[:, members].max(1)[:, None])
    return (np.concatenate(outs_x, 1), np.concatenate(outs_s, 1),
            None if mask is None else np.concatenate(outs_m, 1))


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("n,protected,params,n_out", CASES)
def test_onnx_matches_reference(n, protected, params, n_out, with_mask):
    method = Pool(**params)
    assert method.tokens_out(n, protected) == n_out
    model, session = compiled(n, protected, key(params), with_mask)
    assert [o.type.tensor_type.shape.dim[1].dim_value for o in model.graph.output] == [n_out] * (2 + with_mask)
    for batch in (1, 3):
        for seed in range(2):
            x, size, mask = make_inputs(seed, batch, n, protected, with_mask)
            feeds = {"x": x, "size": size, **({"mask": mask} if with_mask else {})}
            got = session.run(None, feeds)
            ref = method.reference(torch.from_numpy(x), None, torch.from_numpy(size),
                                   None if mask is None else torch.from_numpy(mask), protected)
            want = brute_force(method, x, size, mask, protected) if method.kernel > 1 else (x, size, mask)
            for name, g, r, w in zip(("x", "size", "mask"), got, ref, want):
                assert g.shape == (batch, n_out, *g.shape[2:]), name
                np.testing.assert_allclose(g, r.numpy(), rtol=0, atol=TOL, err_msg=name)
                np.testing.assert_allclose(g, w, rtol=0, atol=TOL, err_msg=name)
            assert np.array_equal(got[0][:, :protected], x[:, :protected])  # protected tokens pass through
            np.testing.assert_allclose(got[1].sum((1, 2)), size.sum((1, 2)), rtol=1e-6)  # sizes are conserved


def test_window_layout():
    # 1 + 4x4 grid, kernel 2: windows are the 2x2 quadrants in row-major order.
    assert Pool(kernel=2).window_index(17, 1).reshape(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1],
                                                                         [2, 2, 3, 3], [2, 2, 3, 3]]
    assert Pool(kernel=2, grid="1d").window_index(17, 1).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7]
    assert Pool(kernel=3).window_index(8, 1).tolist() == [0, 0, 0, 1, 1, 1, 2]  # 7 tokens: 1-D, tail of 1
    assert Pool(kernel=2).tokens_out(1, 1) == 1 and Pool(kernel=2).tokens_out(198, 2) == 51


@pytest.mark.parametrize("with_mask", [False, True])
def test_graph_is_plain_onnx(with_mask):
    for n, protected, params in [(197, 1, {"kernel": 2}), (128, 1, {"kernel": 2}), (64, 0, {"kernel": 4})]:
        model, _ = compiled(n, protected, key(params), with_mask)
        onnx.checker.check_model(model, full_check=True)
        assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
        op_types = {node.op_type for node in model.graph.node}
        assert op_types <= OPS, op_types - OPS
        assert all(node.name.startswith("tc_blk6_pool/") for node in model.graph.node)
        assert max(onnx.numpy_helper.to_array(node.attribute[0].t).size for node in model.graph.node
                   if node.op_type == "Constant") <= 6  # nothing grows with the token count


def test_output_values_are_named_for_validate():
    """In a model (no renaming by the standalone wrapper) the outputs are '<prefix>_x_out', '_size_out', ..."""
    import onnx_ir as ir
    from onnx_ir import tape

    def value(name, *dims):
        return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["b", *dims]))

    for protected in (0, 1):
        n = 16 + protected
        out = Pool(kernel=2).build_onnx(tape.Tape(), value("x", n, C), None, value("s", n, 1), value("m", n), n,
                                        protected, name_prefix="tc_blk2_pool")
        assert [v.name for v in out] == ["tc_blk2_pool_x_out", "tc_blk2_pool_size_out", "tc_blk2_pool_mask_out"]
        assert [v.shape[1] for v in out] == [protected + 4] * 3


@pytest.mark.parametrize("params", [{"kernel": 0}, {"kernel": -2}, {"kernel": 1.5}, {"kernel": "2"}, {"kernel": True},
                                    {}, {"kernel": 2, "grid": "3d"}, {"kernel": 2, "keep": 0.5}])
def test_bad_params_raise_usage_error(params):
    with pytest.raises(UsageError) as err:
        Pool(**params)
    assert "\n" not in str(err.value)


def test_grid_must_fit():
    with pytest.raises(UsageError, match="kernel 3 does not tile the 14x14 patch grid"):
        Pool(kernel=3).check_fits(197, 1)
    with pytest.raises(UsageError, match="square grid"):
        Pool(kernel=2, grid="2d").check_fits(128, 1)
    with pytest.raises(UsageError):
        Pool(kernel=3).tokens_out(197, 1)
    Pool(kernel=3, grid="1d").check_fits(197, 1)
    assert Pool(kernel=3, grid="1d").tokens_out(197, 1) == 1 + 66


def test_registry():
    assert METHODS["pool"] is Pool and get("pool") is Pool and Pool.needs == frozenset()
    assert repr(Pool(kernel=np.int64(2))) == "Pool(kernel=2, grid='auto')"
    assert Pool(**Pool(kernel=2, grid="1d").params).params == {"kernel": 2, "grid": "1d"}


def test_vit_pool_at_block_6_matches_reference(vit_onnx, tmp_path):
    out = tmp_path / "vit_pool.onnx"
    schedule = compress.compress_file(vit_onnx, out, method="pool", params={"kernel": 2}, layers="6")
    model = onnx.load(str(out))
    tokens = metadata.read(model, metadata.TOKENS)
    assert tokens == schedule
    assert [(b["in"], b["out"]) for b in tokens] == [(197, 197)] * 6 + [(197, 50)] + [(50, 50)] * 5
    assert tokens[6]["out"] == Pool(kernel=2).tokens_out(197, 1)
    record = metadata.read(model, metadata.COMPRESSION)
    assert record["method"] == "pool" and record["params"] == [{"kernel": 2, "grid": "auto"}]
    assert not [n for n in model.graph.node if n.op_type.startswith("Scatter")]
    report = validate.validate(out, samples=3, atol=1e-5, rtol=1e-4)
    assert report.passed, validate.format_report(report)


def test_kernel_not_tiling_the_grid_exits_2_from_the_cli(vit_onnx, tmp_path):
    out = tmp_path / "o.onnx"
    result = run_cli("compress", vit_onnx, "--method", "pool", "--kernel", "3", "--layers", "6", "-o", out)
    assert_usage_error(result)
    assert "kernel 3 does not tile the 14x14 patch grid" in result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("params", [{"kernel": 0}, {}, {"kernel": 2, "keep": 0.5}, {"kernel": 2, "grid": "2d"}])
def test_bad_requests_write_nothing(vit_onnx, tmp_path, params):
    out = tmp_path / "o.onnx"
    grid = params.pop("grid", None)
    layers = "6"
    if grid:  # grid=2d after ToMe at block 0: 189 tokens, 188 unprotected are no square
        with pytest.raises(UsageError, match="square grid"):
            compress.compress_file(vit_onnx, out, stages=["tome:r=8@0", f"pool:kernel=2,grid={grid}@{layers}"])
    else:
        with pytest.raises(UsageError):
            compress.compress_file(vit_onnx, out, method="pool", params=params, layers=layers)
    assert list(tmp_path.iterdir()) == []
