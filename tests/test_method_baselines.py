"""random and uniform (fixed token subsets): the ONNX builder (run by ONNX Runtime) against the PyTorch reference,
the exact subsets, parameters and token counts, and whole models (ViT, MiniLM) against their eager reference."""

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
from tcexport.methods.baselines import RandomSubset, UniformSubset
from tcexport.methods.standalone import build_standalone_model
from tests.conftest import assert_usage_error, run_cli

C = 8
SHAPES = [(197, 1), (65, 1), (198, 2), (11, 1), (64, 0), (3, 2)]
PARAMS = [("random", {"keep": 0.6}), ("random", {"keep": 0.25, "seed": 7}), ("random", {"keep_count": 5, "seed": 1}),
          ("uniform", {"keep": 0.6}), ("uniform", {"keep_count": 5}), ("uniform", {"keep": 1.0})]


def make(name: str, params: dict):
    return get(name)(**params)


@functools.lru_cache(maxsize=None)
def compiled(name: str, params: tuple, n: int, protected: int, with_mask: bool):
    model = build_standalone_model(make(name, dict(params)), n, C, 4, protected, with_mask,
                                   name_prefix=f"tc_blk4_{name}")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return model, ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("name,params", PARAMS, ids=[f"{n}-{p}" for n, p in PARAMS])
@pytest.mark.parametrize("n,protected", SHAPES)
def test_onnx_matches_reference(name, params, n, protected, with_mask):
    method = make(name, params)
    n_out = method.tokens_out(n, protected)
    model, session = compiled(name, tuple(sorted(params.items())), n, protected, with_mask)
    assert [o.type.tensor_type.shape.dim[1].dim_value for o in model.graph.output] == [n_out] * (2 + with_mask)
    index = method.indices(n, protected)
    if index is None:
        index = np.arange(n)  # nothing to drop: a no-op
    assert len(index) == n_out
    for batch in (1, 3):
        for seed in range(2):
            rng = np.random.default_rng(seed)
            x = rng.standard_normal((batch, n, C)).astype(np.float32)
            size = rng.integers(1, 5, (batch, n, 1)).astype(np.float32)
            mask = (rng.random((batch, n)) > 0.3).astype(np.float32) if with_mask else None
            feeds = {"x": x, "size": size, **({"mask": mask} if with_mask else {})}
            got = session.run(None, feeds)
            ref = method.reference(torch.from_numpy(x), None, torch.from_numpy(size),
                                   None if mask is None else torch.from_numpy(mask), protected)
            for name_, g, r, original in zip(("x", "size", "mask"), got, ref, (x, size, mask)):
                assert g.shape[:2] == (batch, n_out), name_
                np.testing.assert_allclose(g, r.numpy(), rtol=0, atol=1e-5, err_msg=name_)
                assert np.array_equal(g, original[:, index]), name_  # plain copies, sizes unchanged


def test_subsets_are_exact():
    # uniform: ((2i + 1) * M) // (2 * n_keep), the centres of n_keep equal segments, after the protected tokens.
    assert UniformSubset(keep_count=5).indices(11, 1).tolist() == [0, 2, 4, 6, 8, 10]
    assert UniformSubset(keep_count=4).indices(197, 1).tolist() == [0, 1 + 24, 1 + 73, 1 + 122, 1 + 171]
    assert UniformSubset(keep_count=1).indices(9, 0).tolist() == [4]
    assert UniformSubset(keep=0.5).indices(12, 2).tolist() == [0, 1, 2 + 1, 2 + 3, 2 + 5, 2 + 7, 2 + 9]
    # random: sorted(default_rng(seed).permutation(M)[:n_keep]).
    for seed in (0, 3):
        want = np.sort(np.random.default_rng(seed).permutation(196)[:118]) + 1
        assert RandomSubset(keep=0.6, seed=seed).indices(197, 1).tolist() == [0, *want.tolist()]
    a, b = RandomSubset(keep=0.6).indices(197, 1), RandomSubset(keep=0.6, seed=1).indices(197, 1)
    assert not np.array_equal(a, b)
    for method in (RandomSubset(keep=0.3, seed=5), UniformSubset(keep=0.3)):
        for n, protected in SHAPES:
            index = method.indices(n, protected)
            if index is None:
                continue
            assert index[:protected].tolist() == list(range(protected))
            assert np.all(np.diff(index) > 0) and index[-1] < n  # distinct, in original order


def test_token_counts():
    # keep: ceil(keep * M) with 1e-9 slack, at least one; keep_count: capped at M.
    assert UniformSubset(keep=0.6).tokens_out(197, 1) == 1 + 118
    assert RandomSubset(keep=0.7).tokens_out(11, 1) == 1 + 7  # 0.7 * 10 = 7.000000000000001
    assert RandomSubset(keep=0.01).tokens_out(11, 1) == 2
    assert UniformSubset(keep_count=50).tokens_out(11, 1) == 11 and UniformSubset(keep_count=50).indices(11, 1) is None
    assert UniformSubset(keep=1.0).tokens_out(197, 1) == 197
    assert RandomSubset(keep=0.5).tokens_out(2, 2) == 2
    UniformSubset(keep_count=196).check_fits(197, 1)
    with pytest.raises(UsageError, match="at most N - protected = 196"):
        UniformSubset(keep_count=197).check_fits(197, 1)


def test_graph_is_one_gather_per_tensor():
    for name in ("random", "uniform"):
        model, _ = compiled(name, (("keep", 0.6),), 197, 1, True)
        onnx.checker.check_model(model, full_check=True)
        assert sorted(node.op_type for node in model.graph.node) == ["Constant"] + ["Gather"] * 3
        assert all(node.attribute[0].i == 1 for node in model.graph.node if node.op_type == "Gather")
        assert all(node.name.startswith(f"tc_blk4_{name}/") for node in model.graph.node)


@pytest.mark.parametrize("name", ["random", "uniform"])
@pytest.mark.parametrize("params", [{}, {"keep": 0}, {"keep": 1.5}, {"keep": -0.2}, {"keep": "0.5"}, {"keep": True},
                                    {"keep": float("nan")}, {"keep_count": 0}, {"keep_count": 2.5},
                                    {"keep": 0.5, "keep_count": 3}, {"keep": 0.5, "kernel": 2}])
def test_bad_params_raise_usage_error(name, params):
    with pytest.raises(UsageError) as err:
        make(name, params)
    assert "\n" not in str(err.value)


def test_seed_is_random_only():
    for seed in (-1, 1.5, "3", True):
        with pytest.raises(UsageError):
            RandomSubset(keep=0.5, seed=seed)
    with pytest.raises(UsageError, match="unknown uniform parameter"):
        UniformSubset(keep=0.5, seed=0)


def test_registry():
    assert METHODS["random"] is RandomSubset and METHODS["uniform"] is UniformSubset
    assert RandomSubset.needs == UniformSubset.needs == frozenset()
    assert RandomSubset(keep=0.6).params == {"keep": 0.6, "seed": 0}
    assert UniformSubset(keep_count=np.int64(9)).params == {"keep_count": 9}
    assert repr(UniformSubset(keep=1)) == "UniformSubset(keep=1.0)"


def _compress_and_validate(source, tmp_path, name, layers, n_in, samples):
    out = tmp_path / f"{source.stem}_{name}.onnx"
    schedule = compress.compress_file(source, out, method=name, params={"keep": 0.6}, layers=layers)
    model = onnx.load(str(out))
    tokens = metadata.read(model, metadata.TOKENS)
    record = metadata.read(model, metadata.COMPRESSION)
    assert tokens == schedule and record["method"] == name
    method = get(name)(**record["params"][0])
    block = int(layers)
    assert tokens[block]["in"] == n_in
    assert tokens[block]["out"] == method.tokens_out(n_in, record["protected"]) < n_in
    assert all(b["out"] == tokens[block]["out"] for b in tokens[block:])
    report = validate.validate(out, samples=samples, atol=1e-5, rtol=1e-4)
    assert report.passed, validate.format_report(report)


@pytest.mark.parametrize("name", ["random", "uniform"])
def test_vit_matches_reference(vit_onnx, tmp_path, name):
    _compress_and_validate(vit_onnx, tmp_path, name, "4", 197, samples=2)


@pytest.mark.parametrize("name", ["random", "uniform"])
def test_minilm_matches_reference(minilm_onnx, tmp_path, name):
    _compress_and_validate(minilm_onnx, tmp_path, name, "2", 128, samples=2)


def test_bad_cli_request_exits_2(vit_onnx, tmp_path):
    out = tmp_path / "o.onnx"
    result = run_cli("compress", vit_onnx, "--method", "random", "--keep", "0", "-o", out)
    assert_usage_error(result)
    assert "keep" in result.stderr
    with pytest.raises(UsageError, match="keep_count=197 is more than"):  # 196 unprotected tokens at block 4
        compress.compress_file(vit_onnx, out, method="uniform", params={"keep_count": 197}, layers="4")
    assert not out.exists() and list(tmp_path.iterdir()) == []
