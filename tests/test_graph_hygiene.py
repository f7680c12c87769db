"""Compressed graphs hold only what they compute: no initializer nothing uses, no node nothing reads, no function
nothing calls, so ONNX Runtime loads them without a warning (it used to log "Removing initializer
'tc_blk2_prop_attn_bias_shape'. It is not used by any node" for every compressed model).

Every registered method, every --impl it supports, on a tiny ViT and a tiny BERT (attention mask); the values
validate reads back from the graph (each stage's sizes and decision) must survive the cleanup.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from tcexport import methods
from tcexport.compress import rewrite as compress
from tcexport.core.errors import UsageError
from tests.conftest import exported

VIT_SPEC = "py:tests.fixtures.factories:vit_dim_equals_tokens"  # 65 tokens (CLS + 8x8), width 65, 3 blocks

# Parameters that compress the block chosen below on both models (65 and 25 tokens).
PARAMS = {
    "tome": {"r": "4"},
    "adjacent": {"r": "4"},
    "random": {"params": {"keep": 0.6}},
    "uniform": {"params": {"keep": 0.6}},
    "pool": {"params": {"kernel": 2}},
    "prune-merge": {"params": {"dominant": 12, "contextual": 4}},
    "query": {"params": {"keep": 0.6}},
    "topk": {"params": {"keep": 0.6}},
}
IMPLS = ("subgraph", "function", "plugin")


@pytest.fixture(scope="module")
def models(tmp_path_factory, bert_onnx) -> dict[str, Path]:
    vit = exported(tmp_path_factory, "hygiene_vit", VIT_SPEC, "tiny_vit.onnx", input_shape="3x32x32", seed=0)
    return {"vit": vit, "bert": bert_onnx}


@pytest.fixture(scope="module")
def compressed(models, tmp_path_factory) -> dict[tuple[str, str, str], Path]:
    """(model, method, impl) -> the compressed file; block 1 of 3, so block 2 gets proportional attention after it.
    --impl plugin only for the methods that have a TensorRT plugin (the others refuse it, which is checked)."""
    out_dir = tmp_path_factory.mktemp("hygiene")
    outputs = {}
    for model_name, source in models.items():
        for method in methods.encoder_methods():
            for impl in IMPLS:
                out = out_dir / f"{model_name}_{method}_{impl}.onnx"
                try:
                    compress.compress_file(source, out, method=method, layers="1", impl=impl, **PARAMS[method])
                except UsageError as exc:
                    assert impl == "plugin" and "no TensorRT plugin implements" in str(exc), (model_name, method,
                                                                                            impl, exc)
                    continue
                outputs[(model_name, method, impl)] = out
    return outputs


def test_every_registered_method_is_covered():
    assert set(PARAMS) == set(methods.encoder_methods()), "give the new method parameters in PARAMS"


def test_every_method_and_impl_was_compressed(compressed):
    for model_name in ("vit", "bert"):
        for method in methods.encoder_methods():
            assert (model_name, method, "subgraph") in compressed and (model_name, method, "function") in compressed
        assert (model_name, "tome", "plugin") in compressed  # the plugin path really ran


def _leftovers(model: onnx.ModelProto) -> list[str]:
    """What the graph holds but does not compute with, found without tcexport's cleanup code: initializers no node
    reads, nodes none of whose outputs is read (or a graph output, or a value validate reads back), functions no
    node calls."""
    from tcexport.validate.equality import DECISION_OUTPUTS, SIZE_OUTPUT

    def consumed(graph: onnx.GraphProto) -> set[str]:
        names = set()
        for node in graph.node:
            names.update(node.input)
            for attribute in node.attribute:
                for sub in ([attribute.g] if attribute.HasField("g") else []) + list(attribute.graphs):
                    names |= consumed(sub)  # a subgraph may read outer values
        return names

    def diagnostic(name: str) -> bool:
        match = SIZE_OUTPUT.match(name)
        blocks = {p.format(b) for b in range(64) for p in DECISION_OUTPUTS}
        return bool(match) or name in blocks

    used = consumed(model.graph) | {o.name for o in model.graph.output}
    found = [f"initializer {t.name}" for t in model.graph.initializer if t.name not in used]
    found += [f"node {n.name or n.op_type}" for n in model.graph.node
              if not any(o and (o in used or diagnostic(o)) for o in n.output)]
    for function in model.functions:
        inner = {i for n in function.node for i in n.input} | set(function.output)
        found += [f"node {n.name or n.op_type} in function {function.name}" for n in function.node
                  if not any(o and o in inner for o in n.output)]
    called = {(n.domain, n.op_type) for n in model.graph.node}
    called |= {(n.domain, n.op_type) for f in model.functions for n in f.node}
    found += [f"function {f.domain}::{f.name}" for f in model.functions if (f.domain, f.name) not in called]
    return found


def test_compressed_graphs_hold_no_leftovers(compressed):
    dirty = {}
    for key, path in compressed.items():
        left = _leftovers(onnx.load(str(path)))
        if left:
            dirty[key] = left
    assert not dirty, dirty


def test_onnx_runtime_loads_them_without_a_warning(compressed, capfd):
    """ONNX Runtime logs from C++ to fd 2; capfd reads it. Severity 1 (info is 0) keeps warnings and errors."""
    import onnxruntime as ort

    noisy = {}
    capfd.readouterr()
    for key, path in compressed.items():
        if key[2] == "plugin":
            continue  # only a TensorRT plugin runs those nodes (test_functions checks ORT refuses them)
        options = ort.SessionOptions()
        options.log_severity_level = 1
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if "[W:" in line or "[E:" in line]
        if lines:
            noisy[key] = lines
    assert not noisy, noisy


def test_validate_still_finds_every_stage_size(models, tmp_path):
    """The last stage's sizes feed no later node, yet validate reads them back: the cleanup keeps them."""
    from tcexport.validate.equality import SIZE_OUTPUT

    out = tmp_path / "all.onnx"
    compress.compress_file(models["vit"], out, method="tome", r="4", layers="all", prop_attn=False)
    model = onnx.load(str(out))
    produced = sorted(o for n in model.graph.node for o in n.output if SIZE_OUTPUT.match(o))
    assert produced == ["tc_blk0_tome_size_out", "tc_blk1_tome_size_out", "tc_blk2_tome_size_out"]
    assert not _leftovers(model)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_conversions_are_clean_too(compressed, tmp_path, capfd, precision):
    """The fp16/bf16 conversion (the TensorRT build's first step) rewrites the graph too."""
    import onnxruntime as ort

    from tcexport.backends import precision as precision_mod

    for impl in ("subgraph", "function"):
        out = tmp_path / f"{impl}_{precision}.onnx"
        precision_mod.convert_file(compressed[("vit", "tome", impl)], out, precision)
        assert not _leftovers(onnx.load(str(out))), (impl, precision)
        if precision == "fp16":  # ONNX Runtime's CPU provider runs float16, not bfloat16
            capfd.readouterr()
            options = ort.SessionOptions()
            options.log_severity_level = 1
            ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
            err = capfd.readouterr().err
            assert not [line for line in err.splitlines() if "[W:" in line or "[E:" in line], err
