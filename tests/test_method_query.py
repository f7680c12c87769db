"""query (query-guided pruning): the ONNX builder (run by ONNX Runtime) against the PyTorch reference, the
parameters and token counts, and whole models compressed with it (they take an extra input "query") against
their eager reference."""

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
from tcexport.models import inputs
from tcexport.core import metadata
from tcexport.models import sources
from tcexport.validate import equality as validate
from tcexport.core.errors import UsageError
from tcexport.methods import METHODS, get
from tcexport.methods.query import PAD_PENALTY, QueryPrune
from tcexport.methods.standalone import build_standalone_model
from tcexport.reference import compressed_reference
from tests.conftest import assert_usage_error, cli_here, run_cli

C = 16
TOL = 1e-5
SHAPES = [(n, p) for n in (197, 65, 11) for p in (0, 1, 2)]
RATES = [{"keep": 0.5}, {"keep": 0.25}, {"keep_count": 1}, {"keep_count": 5}]
OPS = {"Constant", "Slice", "ReduceL2", "Max", "Div", "Unsqueeze", "Mul", "ReduceSum", "Sub", "TopK", "Cast", "Neg",
       "GatherElements", "Add", "GatherND", "Concat"}


def key(params: dict) -> tuple:
    return tuple(sorted(params.items()))


@functools.lru_cache(maxsize=None)
def compiled(n: int, protected: int, params: tuple, with_mask: bool):
    model = build_standalone_model(QueryPrune(**dict(params)), n, C, 4, protected, with_mask,
                                   name_prefix="tc_blk3_query")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return model, session


def make_inputs(seed: int, batch: int, n: int, protected: int, with_mask: bool, ties: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, n, C)).astype(np.float32)
    if ties:  # three distinct rows, repeated and scaled by 1 or 2 (exact in float32): exactly equal cosines
        x = x[:, rng.integers(0, 3, n)] * rng.integers(1, 3, (batch, n, 1)).astype(np.float32)
    size = rng.integers(1, 5, (batch, n, 1)).astype(np.float32)
    size[:, :protected] = 1.0
    query = rng.standard_normal((batch, C)).astype(np.float32)
    mask = None
    if with_mask:
        lengths = rng.integers(max(protected, 1), n + 1, batch)
        if batch > 1:
            lengths[0] = n  # one row without padding
            lengths[-1] = max(protected, 1)  # one row that is nearly all padding
        mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)
    return x, size, query, mask


def run_both(n, protected, params, x, size, query, mask):
    _, session = compiled(n, protected, key(params), mask is not None)
    feeds = {"x": x, "size": size, "query": query}
    if mask is not None:
        feeds["mask"] = mask
    onnx_out = session.run(None, feeds)
    if mask is None:
        onnx_out.append(None)
    ref = QueryPrune(**params).reference(torch.from_numpy(x), None, torch.from_numpy(size),
                                         None if mask is None else torch.from_numpy(mask), protected,
                                         signals={"query": torch.from_numpy(query)})
    return onnx_out, [None if t is None else t.numpy() for t in ref]


def assert_agree(onnx_out, ref_out, n_out):
    for name, got, want in zip(("x", "size", "mask"), onnx_out, ref_out):
        if want is None:
            assert got is None
            continue
        assert got.shape == want.shape and got.shape[1] == n_out, (name, got.shape, want.shape, n_out)
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL, err_msg=name)


def expected_rows(x, query, mask, protected, k):
    """Token indices kept, by the spec in plain numpy (float64 cosines; inputs here have no near-ties)."""
    tokens = x[:, protected:].astype(np.float64)
    unit = tokens / np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-6)
    q = query.astype(np.float64)
    score = unit @ (q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-6))[..., None]
    score = score[..., 0]
    if mask is not None:
        score = score - (1 - mask[:, protected:]) * PAD_PENALTY
    rows = []
    for b in range(x.shape[0]):
        order = sorted(range(score.shape[1]), key=lambda i: (-score[b, i], i))[:k]
        rows.append(list(range(protected)) + [protected + i for i in sorted(order)])
    return rows


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("n,protected", SHAPES)
def test_onnx_matches_reference(n, protected, with_mask):
    for params in RATES:
        method = QueryPrune(**params)
        n_out = method.tokens_out(n, protected)
        for batch in (1, 3):
            for seed in range(3):
                x, size, query, mask = make_inputs(seed, batch, n, protected, with_mask, ties=seed == 2)
                onnx_out, ref_out = run_both(n, protected, params, x, size, query, mask)
                assert_agree(onnx_out, ref_out, n_out)
                x_new, size_new, mask_new = onnx_out
                assert np.array_equal(x_new[:, :protected], x[:, :protected])  # protected first, untouched
                if seed != 2:  # the kept rows are the spec's, copied unchanged with their sizes
                    rows = expected_rows(x, query, mask, protected, n_out - protected)
                    for b, kept in enumerate(rows):
                        assert np.array_equal(x_new[b], x[b, kept])
                        assert np.array_equal(size_new[b], size[b, kept])
                        if mask is not None:
                            assert np.array_equal(mask_new[b], mask[b, kept])


def test_semantics_by_hand():
    # 1 protected token. Query e0. Cosines of tokens 1..6: [0.6, -1, 1, 0.6, 0 (zero row), 1 (2x e0)].
    # Keep 3: tokens 3 and 6 (cosine 1, both), then 1 (tie at 0.6 with 4: lower index), in original order.
    e0, e1 = np.eye(C, dtype=np.float32)[:2]
    rows = [e1, 0.6 * e0 + 0.8 * e1, -e0, e0, 0.6 * e0 + 0.8 * e1, 0 * e0, 2 * e0]
    x = np.stack(rows)[None].astype(np.float32)
    size = np.arange(1, 8, dtype=np.float32).reshape(1, 7, 1)
    query = (3 * e0)[None]
    onnx_out, ref_out = run_both(7, 1, {"keep_count": 3}, x, size, query, None)
    assert_agree(onnx_out, ref_out, 4)
    assert onnx_out[1][0, :, 0].tolist() == [1, 2, 4, 7]  # sizes name the tokens: 0, 1, 3, 6
    # Padding (tokens 5, 6) ranks below every real token, even with the best cosine: keep 4 of the 6 ->
    # the 4 real ones (1..4), although token 6 scores 1.
    mask = np.array([[1, 1, 1, 1, 1, 0, 0]], np.float32)
    onnx_out, ref_out = run_both(7, 1, {"keep_count": 4}, x, size, query, mask)
    assert_agree(onnx_out, ref_out, 5)
    assert onnx_out[1][0, :, 0].tolist() == [1, 2, 3, 4, 5]
    assert onnx_out[2][0].tolist() == [1] * 5
    # Keep 5: the real ones, then the better padding token (6: cosine 1 over 5: cosine 0).
    onnx_out, _ = run_both(7, 1, {"keep_count": 5}, x, size, query, mask)
    assert onnx_out[1][0, :, 0].tolist() == [1, 2, 3, 4, 5, 7]
    assert onnx_out[2][0].tolist() == [1] * 5 + [0]


def test_padding_is_never_kept_before_real_tokens():
    n, protected = 65, 1
    x, size, query, _ = make_inputs(3, 3, n, protected, False)
    lengths = np.array([20, 40, 65])
    mask = (np.arange(n)[None, :] < lengths[:, None]).astype(np.float32)
    onnx_out, ref_out = run_both(n, protected, {"keep_count": 30}, x, size, query, mask)
    assert_agree(onnx_out, ref_out, 31)
    x_new, _, mask_new = onnx_out
    # Row 0: all 19 real unprotected tokens kept (original order), then 11 padding tokens.
    assert mask_new[0].tolist() == [1.0] * 20 + [0.0] * 11
    np.testing.assert_array_equal(x_new[0, :20], x[0, :20])
    assert mask_new[1].tolist() == [1.0] * 31  # 39 real: only real ones kept
    assert mask_new[2].tolist() == [1.0] * 31


def test_zero_query_and_zero_rows_give_no_nan():
    """All-zero query: every cosine 0, the first K tokens are kept; zero rows score 0 too."""
    for n, protected in [(11, 1), (65, 0)]:
        x, size, _, mask = make_inputs(5, 3, n, protected, True)
        x[:, ::3] = 0.0
        query = np.zeros((3, C), np.float32)
        onnx_out, ref_out = run_both(n, protected, {"keep": 0.5}, x, size, query, mask)
        n_out = QueryPrune(keep=0.5).tokens_out(n, protected)
        assert_agree(onnx_out, ref_out, n_out)
        assert not np.isnan(onnx_out[0]).any()
        no_pad = np.ones_like(mask)
        onnx_out, _ = run_both(n, protected, {"keep": 0.5}, x, size, query, no_pad)
        np.testing.assert_array_equal(onnx_out[0], x[:, :n_out])


def test_nothing_dropped_is_a_no_op():
    op = tape.Tape()
    values = [ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
              for name, shape in [("x", [1, 11, C]), ("size", [1, 11, 1]), ("q", [1, C])]]
    for params in ({"keep": 1.0}, {"keep_count": 10}, {"keep_count": 50}):
        out = QueryPrune(**params).build_onnx(op, values[0], None, values[1], None, 11, 1,
                                              signals={"query": values[2]})
        assert out.x is values[0] and out.size is values[1] and out.mask is None
        assert QueryPrune(**params).tokens_out(11, 1) == 11
    assert not op.nodes
    x, size, query, mask = make_inputs(0, 2, 11, 1, True)
    onnx_out, _ = run_both(11, 1, {"keep": 1.0}, x, size, query, mask)
    np.testing.assert_array_equal(onnx_out[0], x)


def test_graph_is_clean_and_named():
    model, _ = compiled(197, 1, key({"keep": 0.5}), True)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    op_types = {node.op_type for node in model.graph.node}
    assert op_types <= OPS, op_types - OPS
    assert {"ReduceL2", "ReduceSum", "TopK", "GatherND"} <= op_types
    assert all(node.name.startswith("tc_blk3_query/") for node in model.graph.node)
    for node in model.graph.node:
        if node.op_type == "TopK":
            assert {a.name: a.i for a in node.attribute}["sorted"] == 1
        if node.op_type == "GatherND":
            assert {a.name: a.i for a in node.attribute}["batch_dims"] == 1
    assert [i.name for i in model.graph.input] == ["x", "size", "query", "mask"]
    assert [o.type.tensor_type.shape.dim[1].dim_value for o in model.graph.output] == [99] * 3
    for value in [*model.graph.input, *model.graph.output]:
        assert value.type.tensor_type.shape.dim[0].dim_param == "batch"
    op = tape.Tape()
    values = [ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))
              for name, shape in [("x", [1, 197, C]), ("size", [1, 197, 1]), ("q", [1, C])]]
    for protected in (0, 1):
        out = QueryPrune(keep=0.5).build_onnx(op, values[0], None, values[1], None, 197, protected,
                                              name_prefix=f"tc_blk{protected}_query", signals={"query": values[2]})
        assert validate.SIZE_OUTPUT.match(out.size.name) and out.size.name == f"tc_blk{protected}_query_size_out"
        assert out.x.name == f"tc_blk{protected}_query_x_out"


def test_tokens_out_and_rounding():
    assert QueryPrune(keep=0.5).tokens_out(197, 1) == 1 + 98
    assert QueryPrune(keep=0.7).tokens_out(11, 1) == 1 + 7  # 0.7 * 10 = 7.000000000000001: still 7
    assert QueryPrune(keep=0.6).tokens_out(128, 1) == 1 + 77  # ceil(76.2)
    assert QueryPrune(keep=0.001).tokens_out(65, 0) == 1  # at least one
    assert QueryPrune(keep_count=50).tokens_out(197, 2) == 52
    assert QueryPrune(keep_count=50).tokens_out(40, 1) == 40  # capped in later, smaller blocks
    QueryPrune(keep_count=196).check_fits(197, 1)
    for method, n, p in [(QueryPrune(keep_count=197), 197, 1), (QueryPrune(keep=0.5), 2, 2)]:
        with pytest.raises(UsageError):
            method.check_fits(n, p)


@pytest.mark.parametrize("params", [{}, {"keep": 0.5, "keep_count": 5}, {"keep": 1.5}, {"keep": 0}, {"keep": -0.1},
                                    {"keep": True}, {"keep": "0.5"}, {"keep_count": 0}, {"keep_count": 2.5},
                                    {"keep_count": True}, {"keep": 0.5, "fuse": True}, {"r": 8}])
def test_bad_params_raise_usage_error(params):
    with pytest.raises(UsageError) as err:
        QueryPrune(**params)
    assert "\n" not in str(err.value)


def test_registry_and_reference_checks_the_query():
    assert METHODS["query"] is QueryPrune and get("query") is QueryPrune
    assert QueryPrune.needs == frozenset({"query"})
    method = QueryPrune(keep_count=np.int64(5))
    assert method.params == {"keep_count": 5} and QueryPrune(**method.params).params == method.params
    assert repr(QueryPrune(keep=1)) == "QueryPrune(keep=1.0)"
    x, size, query, _ = make_inputs(0, 2, 11, 1, False)
    args = (torch.from_numpy(x), None, torch.from_numpy(size), None, 1)
    with pytest.raises(UsageError, match="query"):
        method.reference(*args)
    with pytest.raises(UsageError, match=r"\[2, 16\]"):
        method.reference(*args, signals={"query": torch.from_numpy(query[:, :8])})


# ---------------------------------------------------------------------- whole models


def _assert_validates(path, samples=3, seed=0):
    report = validate.validate(path, samples=samples, seed=seed, atol=1e-5, rtol=1e-4)
    assert not report.diverged, "a near-tie flipped; pick another seed"
    assert report.passed, validate.format_report(report)
    return report


def _inputs(model):
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}


def test_vit_takes_a_query_and_validates(vit_onnx, tmp_path):
    out = tmp_path / "vit_query.onnx"
    compress.compress_file(vit_onnx, out, method="query", params={"keep": 0.5}, layers="4")
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    assert _inputs(model) == {"pixel_values": ["batch", 3, 224, 224], "query": ["batch", 192]}
    tokens = metadata.read(model, metadata.TOKENS)
    assert [b["out"] for b in tokens] == [197] * 4 + [99] * 8
    record = metadata.read(model, metadata.COMPRESSION)
    assert record["methods"] == ["query"] and record["params"] == [{"keep": 0.5}]
    assert record["extra_inputs"] == [{"name": "query", "shape": ["batch", 192], "dtype": "float32", "kind": "float"}]
    assert [s.name for s in inputs.specs_from_graph(model)] == ["pixel_values", "query"]  # what bench/build feed
    _assert_validates(out)
    # The reference takes the query by keyword, and asks for it when it is missing.
    source = sources.load_from_record(metadata.read(model, metadata.SOURCE))
    reference = compressed_reference(source, {4: QueryPrune(keep=0.5)})
    assert reference.extra_inputs == ["query"]
    with pytest.raises(UsageError, match="query"):
        reference(*source.example_inputs(1))


def test_minilm_validates(minilm_onnx, tmp_path):
    """Text with padding: padding goes before any real token is dropped."""
    out = tmp_path / "minilm_query.onnx"
    compress.compress_file(minilm_onnx, out, method="query", params={"keep": 0.6}, layers="2")
    model = onnx.load(str(out))
    assert list(_inputs(model)) == ["input_ids", "attention_mask", "query"]
    assert _inputs(model)["query"] == ["batch", 384]
    assert [b["out"] for b in metadata.read(model, metadata.TOKENS)] == [128] * 2 + [78] * 4
    _assert_validates(out)


@pytest.mark.parametrize("args", [["--keep", "1.5"], [], ["--keep-count", "197"]],
                         ids=["keep-above-1", "neither", "count-beyond-tokens"])
def test_bad_cli_params_exit_2(vit_onnx, tmp_path, args):
    out = tmp_path / "o.onnx"
    assert_usage_error(cli_here("compress", vit_onnx, "--method", "query", *args, "--layers", "4", "-o", out))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
