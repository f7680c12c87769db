"""tcexport's ONNX Runtime custom-op library (plugins/ort), built from source here by the install's own build hook
(setup.py build_ext) against ../shared/onnxruntime-include, then:

1. every op (ToMeMerge, TokenPrune, TokenPruneMerge), run by ONNX Runtime as a one-node graph, equals its method's
   PyTorch reference on random inputs with deliberate ties, at several token counts, protected counts, amounts,
   batch 1 and 3, with and without a mask: sizes and masks exactly, x within 1e-5; the same bits on 1 and 3
   intra-op threads; fp16 x/metric make the reference's decisions on the rounded inputs;
2. the output shapes ONNX Runtime infers are the reference's (the batch symbol kept); a node with fewer
   outputs works; attributes that do not fit are an error from the op, not a crash;
3. the commands: --impl plugin graphs of all three methods compress, validate (tcexport validate, exit 0), build
   with --backend ort (the sidecar names the library) and bench on ONNX Runtime CPU; an --impl function graph
   does not load the library (its bodies run); without the library every command that would need it exits 2
   with one line naming what is missing and how to get it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from tcexport.methods.prune_merge import PruneMerge
from tcexport.methods.tome import ToMe
from tcexport.methods.topk import TopK
from tcexport.plugins import ort_library
from tests.conftest import assert_usage_error, cli_here, run_cli

ROOT = Path(__file__).resolve().parents[1]
HEADERS = ROOT.parent / "shared" / "onnxruntime-include"
TINY_SPEC = "py:tests.fixtures.factories:vit_dim_equals_tokens"  # 65 tokens, width 65, 3 blocks


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """The library as pip install builds it: setup.py's build_ext, headers from ../shared/onnxruntime-include."""
    if shutil.which("g++") is None:
        pytest.skip("g++ not found")
    if not any(HEADERS.glob("**/onnxruntime_c_api.h")):
        pytest.skip(f"no ONNX Runtime C API headers at {HEADERS}")
    out = tmp_path_factory.mktemp("ort_ops")
    env = {**os.environ, "ORT_INCLUDE_DIR": str(HEADERS)}
    result = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out / "lib"),
                             "--build-temp", str(out / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    built = sorted((out / "lib" / "tcexport" / "plugins").glob("_ort_ops*.so"))
    assert result.returncode == 0 and built, result.stderr[-2000:]
    return built[0]


def test_library_exports_the_entry_point(library):
    handle = ctypes.CDLL(str(library))
    assert hasattr(handle, "RegisterCustomOps")
    names = handle.tcexport_ort_ops_names
    names.restype = ctypes.c_char_p
    assert names().decode().split(",") == list(ort_library.OPS)
    if shutil.which("nm"):  # the library's own functions stay hidden: exported code is the two entry points
        exported = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True)
        code = {line.split()[-1] for line in exported.stdout.splitlines() if " T " in line}
        assert code == {"RegisterCustomOps", "tcexport_ort_ops_names"}


# ---------------------------------------------------------------- one-node graphs


INPUTS = {"ToMeMerge": ("x", "metric", "size", "mask"), "TokenPrune": ("x", "cls_attention", "size", "mask"),
          "TokenPruneMerge": ("x", "metric", "cls_attention", "size", "mask")}


def one_node(op: str, arrays: dict, attributes: dict, outputs: int = 3) -> bytes:
    names = [name for name in INPUTS[op] if arrays.get(name) is not None]
    types = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
    graph_inputs = [helper.make_tensor_value_info(name, types[arrays[name].dtype],
                                                  ["batch", *arrays[name].shape[1:]]) for name in names]
    out_names = ["x_out", "size_out", "mask_out"][:outputs]
    out_types = [types[arrays["x"].dtype], TensorProto.FLOAT, TensorProto.FLOAT]
    node = helper.make_node(op, names, out_names, domain="tcexport", plugin_namespace="tcexport",
                            plugin_version="1", **attributes)
    graph = helper.make_graph([node], op, graph_inputs,
                              [helper.make_tensor_value_info(n, t, None) for n, t in zip(out_names, out_types)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("tcexport", 1)])
    return model.SerializeToString()


def session(library: Path, model: bytes, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_op(library, op, arrays, attributes, threads=1, outputs=3):
    sess = session(library, one_node(op, arrays, attributes, outputs), threads)
    feeds = {i.name: arrays[i.name] for i in sess.get_inputs()}
    return sess.run(None, feeds), sess


def _t(array):
    return None if array is None else torch.from_numpy(array.astype(np.float32))


def assert_same(got, ref, context):
    x_out, size_out, mask_out = got
    assert x_out.shape == tuple(ref.x.shape), context
    np.testing.assert_array_equal(size_out, ref.size.numpy(), err_msg=f"sizes {context}")
    np.testing.assert_allclose(x_out, ref.x.numpy(), rtol=0, atol=1e-5, err_msg=f"x {context}")
    if ref.mask is None:
        np.testing.assert_array_equal(mask_out, np.ones_like(mask_out), err_msg=f"mask without input {context}")
    else:
        np.testing.assert_array_equal(mask_out, ref.mask.numpy(), err_msg=f"mask {context}")


def check_threads(library, op, arrays, attributes, ref, context):
    """The reference's result on one thread, and the same bits on three."""
    one, _ = run_op(library, op, arrays, attributes, threads=1)
    assert_same(one, ref, context)
    three, _ = run_op(library, op, arrays, attributes, threads=3)
    for a, b in zip(one, three):
        np.testing.assert_array_equal(a, b, err_msg=f"1 vs 3 threads {context}")


def token_inputs(rng, batch, n, c, ck, with_mask):
    x = rng.standard_normal((batch, n, c)).astype(np.float32)
    metric = rng.standard_normal((batch, n, ck)).astype(np.float32)
    if n >= 6:  # ties: a duplicated B row (equal scores for every A token) and a duplicated A row
        metric[:, 5] = metric[:, 3]
        metric[:, 4] = metric[:, 2]
    if n >= 8:
        metric[:, 7] = 0.0  # an all-zero row: the clamped norm gives zero scores, not NaN
    size = rng.integers(1, 5, (batch, n, 1)).astype(np.float32)
    mask = None
    if with_mask:
        mask = (rng.random((batch, n)) < 0.8).astype(np.float32)
        mask[:, -max(1, n // 3):] = 0.0  # padding at the end, as a tokenizer pads
        mask[:, 0] = 1.0
    return x, metric, size, mask


@pytest.mark.parametrize("n", [7, 8, 13, 24, 197])
@pytest.mark.parametrize("protected", [0, 1, 2])
def test_tome_op_equals_reference(library, n, protected):
    rng = np.random.default_rng(1000 * n + protected)
    cap = (n - protected) // 2
    c, ck = (6, 4) if n < 20 else (48, 20)  # ck 20: the vector loop's remainder lanes take part
    for r in sorted({0, 1, cap // 2, cap}):
        for batch, with_mask in ((1, False), (1, True), (3, False), (3, True)):
            x, metric, size, mask = token_inputs(rng, batch, n, c, ck, with_mask)
            ref = ToMe(r=r).reference(_t(x), _t(metric), _t(size), _t(mask), protected)
            arrays = {"x": x, "metric": metric, "size": size, "mask": mask}
            check_threads(library, "ToMeMerge", arrays, {"r": r, "protected": protected}, ref,
                          dict(n=n, p=protected, r=r, batch=batch, mask=with_mask))


def test_tome_op_breaks_ties_like_the_reference(library):
    """Every metric row equal: all scores tie, so only the tie rules decide (first argmax, lower A index)."""
    n, protected, r = 11, 1, 4
    x = np.random.default_rng(3).standard_normal((2, n, 5)).astype(np.float32)
    metric = np.ones((2, n, 4), np.float32)
    size = np.ones((2, n, 1), np.float32)
    ref = ToMe(r=r).reference(_t(x), _t(metric), _t(size), None, protected)
    got, _ = run_op(library, "ToMeMerge", {"x": x, "metric": metric, "size": size}, {"r": r, "protected": 1})
    assert_same(got, ref, "all ties")
    reverse = ToMe(r=r).reference(_t(x[:, ::-1].copy()), _t(metric), _t(size), None, protected)
    assert not torch.equal(reverse.x, ref.x)  # the tie rule decides something


@pytest.mark.parametrize("n", [6, 9, 16, 50])
@pytest.mark.parametrize("protected", [0, 1, 2])
def test_prune_op_equals_reference(library, n, protected):
    rng = np.random.default_rng(2000 * n + protected)
    m = n - protected
    for k in sorted({1, m // 2, m - 1}):
        for fuse in (False, True):
            for keep_order in (False, True):
                for batch, with_mask in ((1, False), (3, True), (3, False)):
                    x = rng.standard_normal((batch, n, 5)).astype(np.float32)
                    score = rng.random((batch, n)).astype(np.float32)
                    score[:, -3:] = score[:, protected:protected + 1]  # ties with an earlier token
                    score[0] = np.round(score[0] * 2) / 2  # many equal scores in row 0
                    if batch > 1:
                        score[1, protected:] = 0.0  # every score zero: the fused token is the plain mean
                    size = rng.integers(1, 5, (batch, n, 1)).astype(np.float32)
                    mask = (rng.random((batch, n)) < 0.7).astype(np.float32) if with_mask else None
                    method = TopK(keep_count=k, fuse=fuse, keep_order=keep_order)
                    ref = method.reference(_t(x), None, _t(size), _t(mask), protected, {"cls_attention": _t(score)})
                    arrays = {"x": x, "cls_attention": score, "size": size, "mask": mask}
                    attributes = {"k": k, "protected": protected, "fuse": int(fuse), "keep_order": int(keep_order)}
                    check_threads(library, "TokenPrune", arrays, attributes, ref,
                                  dict(n=n, p=protected, k=k, fuse=fuse, keep_order=keep_order, batch=batch,
                                       mask=with_mask))


@pytest.mark.parametrize("n", [9, 16, 41])
@pytest.mark.parametrize("protected", [0, 1, 2])
def test_prune_merge_op_equals_reference(library, n, protected):
    rng = np.random.default_rng(3000 * n + protected)
    u = n - protected
    shapes = {(1, 1), (2, 3), (u // 3, u // 4 or 1), (u - 3, 2), (u - 2, 2)}  # the last one: U == K + M, a no-op
    for dominant, contextual in sorted(s for s in shapes if s[0] >= 1 and s[1] >= 1 and sum(s) <= u):
        for batch, with_mask in ((1, False), (3, True), (3, False)):
            x, metric, size, mask = token_inputs(rng, batch, n, 7, 5, with_mask)
            score = rng.random((batch, n)).astype(np.float32)
            score[:, -2:] = score[:, protected:protected + 1]  # ties
            if with_mask:
                score = np.where(mask == 0, 0.0, score).astype(np.float32)  # padding gets no attention
            method = PruneMerge(dominant=dominant, contextual=contextual)
            ref = method.reference(_t(x), _t(metric), _t(size), _t(mask), protected, {"cls_attention": _t(score)})
            arrays = {"x": x, "metric": metric, "cls_attention": score, "size": size, "mask": mask}
            attributes = {"dominant": dominant, "contextual": contextual, "protected": protected}
            check_threads(library, "TokenPruneMerge", arrays, attributes, ref,
                          dict(n=n, p=protected, k=dominant, m=contextual, batch=batch, mask=with_mask))


def test_fp16_io_decides_in_fp32(library):
    """fp16 x and metric: the fp32 reference's decisions on the same rounded inputs; x rounded once."""
    rng = np.random.default_rng(7)
    x, metric, size, mask = token_inputs(rng, 3, 13, 16, 8, True)
    x16, metric16 = x.astype(np.float16), metric.astype(np.float16)
    ref = ToMe(r=5).reference(_t(x16), _t(metric16), _t(size), _t(mask), 1)
    (x_out, size_out, mask_out), sess = run_op(library, "ToMeMerge", {"x": x16, "metric": metric16, "size": size,
                                                                      "mask": mask}, {"r": 5, "protected": 1})
    assert x_out.dtype == np.float16
    np.testing.assert_array_equal(size_out, ref.size.numpy())
    np.testing.assert_array_equal(mask_out, ref.mask.numpy())
    np.testing.assert_allclose(x_out.astype(np.float32), ref.x.numpy(), rtol=2e-3, atol=2e-3)
    score = rng.random((3, 13)).astype(np.float16)
    ref = TopK(keep_count=6, fuse=True).reference(_t(x16), None, _t(size), None, 1, {"cls_attention": _t(score)})
    (x_out, size_out, _), _ = run_op(library, "TokenPrune", {"x": x16, "cls_attention": score, "size": size},
                                     {"k": 6, "protected": 1, "fuse": 1})
    np.testing.assert_array_equal(size_out, ref.size.numpy())
    np.testing.assert_array_equal(x_out[:, :7], ref.x.numpy()[:, :7].astype(np.float16))  # copied bit for bit


def test_inferred_shapes_keep_the_batch_symbol(library):
    rng = np.random.default_rng(1)
    x, metric, size, mask = token_inputs(rng, 2, 13, 6, 4, True)
    _, sess = run_op(library, "ToMeMerge", {"x": x, "metric": metric, "size": size, "mask": mask},
                     {"r": 4, "protected": 1})
    assert [o.shape for o in sess.get_outputs()] == [["batch", 9, 6], ["batch", 9, 1], ["batch", 9]]
    score = rng.random((2, 13)).astype(np.float32)
    _, sess = run_op(library, "TokenPruneMerge", {"x": x, "metric": metric, "cls_attention": score, "size": size},
                     {"dominant": 4, "contextual": 3, "protected": 1})
    assert [o.shape for o in sess.get_outputs()] == [["batch", 8, 6], ["batch", 8, 1], ["batch", 8]]


def test_a_node_with_fewer_outputs(library):
    rng = np.random.default_rng(2)
    x, metric, size, _ = token_inputs(rng, 3, 13, 6, 4, False)
    ref = ToMe(r=3).reference(_t(x), _t(metric), _t(size), None, 1)
    for outputs in (1, 2):
        got, _ = run_op(library, "ToMeMerge", {"x": x, "metric": metric, "size": size}, {"r": 3, "protected": 1},
                        outputs=outputs)
        assert len(got) == outputs
        np.testing.assert_allclose(got[0], ref.x.numpy(), rtol=0, atol=1e-5)
        if outputs == 2:
            np.testing.assert_array_equal(got[1], ref.size.numpy())


def test_attributes_that_do_not_fit_are_an_error(library):
    rng = np.random.default_rng(3)
    x, metric, size, _ = token_inputs(rng, 1, 13, 6, 4, False)
    sess = session(library, one_node("ToMeMerge", {"x": x, "metric": metric, "size": size}, {"r": 7, "protected": 1}))
    with pytest.raises(Exception, match=r"r=7 protected=1 do not fit 13 tokens"):
        sess.run(None, {"x": x, "metric": metric, "size": size})
    score = rng.random((1, 13)).astype(np.float32)
    sess = session(library, one_node("TokenPrune", {"x": x, "cls_attention": score, "size": size},
                                     {"k": 12, "protected": 1}))
    with pytest.raises(Exception, match=r"k=12 protected=1 do not fit"):
        sess.run(None, {"x": x, "cls_attention": score, "size": size})


# ---------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    from tcexport.export import exporter as export
    from tcexport.models import sources

    path = tmp_path_factory.mktemp("tiny_vit_ort_ops") / "tiny.onnx"
    export.export_to_file(sources.load(TINY_SPEC, input_shape="3x32x32", seed=0), path)
    return path


METHODS = {"tome": ["--method", "tome", "--r", "8"],
           "topk": ["--method", "topk", "--keep", "0.5", "--fuse", "--layers", "0,2"],
           "prune-merge": ["--method", "prune-merge", "--dominant", "20", "--contextual", "6", "--layers", "1"]}


# tome in the default run; topk and prune-merge (each ~1 min on 2 cores) with the slow tests
@pytest.mark.parametrize("method", ["tome", *(pytest.param(m, marks=pytest.mark.slow) for m in ("topk", "prune-merge"))])
def test_plugin_graphs_validate_build_and_bench_on_onnx_runtime(library, tiny_vit, tmp_path, monkeypatch, method):
    monkeypatch.setenv(ort_library.LIBRARY_ENV, str(library))
    out = tmp_path / "plugin.onnx"
    result = run_cli("compress", tiny_vit, *METHODS[method], "--impl", "plugin", "-o", out)
    assert result.returncode == 0, result.stderr
    assert ort_library.plugin_only_ops(onnx.load(str(out), load_external_data=False))
    result = run_cli("validate", out, "--samples", "2")
    assert result.returncode == 0 and "PASSED" in result.stdout, result.stdout + result.stderr
    result = run_cli("build", out, "-o", tmp_path / "build")
    assert result.returncode == 0, result.stderr
    sidecar = json.loads((tmp_path / "build" / "tcexport-build.json").read_text())
    assert sidecar["custom_ops"]["library"] == str(library) and len(sidecar["custom_ops"]["sha256"]) == 64
    result = run_cli("bench", tmp_path / "build", out, "--iters", "2", "--warmup", "1", "--batch", "1")
    assert result.returncode == 0, result.stderr


def test_function_graphs_do_not_load_the_library(library, tiny_vit, tmp_path, monkeypatch):
    """With the library registered ONNX Runtime would run its kernel instead of the body: only plugin graphs get it."""
    from tcexport.backends import ort as ort_backend
    from tcexport.compress import rewrite as compress

    monkeypatch.setenv(ort_library.LIBRARY_ENV, str(library))
    function, plugin = tmp_path / "function.onnx", tmp_path / "plugin.onnx"
    compress.compress_file(tiny_vit, function, r="8", impl="function")
    compress.compress_file(tiny_vit, plugin, r="8", impl="plugin")
    options = ort_backend.session_options(model=onnx.load(str(function)))
    assert options not in ort_library._REGISTERED
    options = ort_backend.session_options(model=onnx.load(str(plugin)))
    assert options in ort_library._REGISTERED
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    outputs = [ort_backend.open_session(path).run(None, feeds)[0] for path in (function, plugin)]
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)


def test_without_the_library_plugin_graphs_are_one_line_errors(tiny_vit, tmp_path, monkeypatch):
    out = tmp_path / "plugin.onnx"
    result = cli_here("compress", tiny_vit, "--r", "8", "--impl", "plugin", "-o", out)
    assert result.returncode == 0, result.stderr
    monkeypatch.setenv(ort_library.LIBRARY_ENV, "none")
    for args in (("build", out, "-o", tmp_path / "build"), ("validate", out), ("bench", out, "--iters", "1")):
        result = cli_here(*args)
        assert_usage_error(result)
        assert "--impl plugin nodes (tcexport::ToMeMerge)" in result.stderr, result.stderr
        assert "ORT_INCLUDE_DIR" in result.stderr and "onnxruntime_c_api.h" in result.stderr
    assert not (tmp_path / "build").exists()
    # the standard-op paths need no library
    subgraph = tmp_path / "subgraph.onnx"
    assert cli_here("compress", tiny_vit, "--r", "8", "-o", subgraph).returncode == 0
    assert cli_here("validate", subgraph, "--samples", "1").returncode == 0
