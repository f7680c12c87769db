"""The cut of the inserted ops (tcexport.bench.inserted_cost): it holds every inserted node and nothing else, and fed what
the whole model feeds it, it computes what the whole model computes at the cut."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tcexport.compress import rewrite as compress
from tcexport.models import inputs
from tcexport.bench import inserted_cost
from tests.families import export_zoo


@pytest.fixture(scope="module", params=[("timm", "vit_tiny_patch16_224", 1), ("hf", "bert", 3)],
                ids=["vit", "bert-masked"])
def compressed(request, tmp_path_factory):
    family, kind, batch = request.param
    model = export_zoo(tmp_path_factory, family, kind)
    out = tmp_path_factory.mktemp("cut") / "tome.onnx"
    compress.compress_file(model, out, method="tome", r="2")
    return out, batch


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_the_cut_recomputes_what_the_model_computes_there(compressed):
    path, batch = compressed
    model = onnx.load(str(path))
    cut = inserted_cost.cut_inserted(model)
    inserted = [n.name for n in model.graph.node if n.name.startswith(inserted_cost.INSERTED_PREFIX)]
    assert sorted(n.name for n in cut.model.graph.node) == sorted(inserted)
    assert cut.nodes == len(inserted) and cut.inputs and cut.outputs

    feeds = inputs.random_feeds(inputs.specs_from_graph(model), batch, seed=4)
    outputs_before = len(model.graph.output)
    wide = ort.InferenceSession(inserted_cost.with_outputs(model, cut.inputs + cut.outputs),
                                providers=["CPUExecutionProvider"])
    assert len(model.graph.output) == outputs_before  # the model itself is left as it was
    names = cut.inputs + cut.outputs
    values = dict(zip(names, wide.run(names, feeds)))
    alone = _session(cut.model).run(cut.outputs, {name: values[name] for name in cut.inputs})
    for name, value in zip(cut.outputs, alone):
        np.testing.assert_allclose(value, values[name], rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("spinning", [False, True], ids=["interleaved", "blocks"])
def test_wall_time_is_measured_for_both_and_the_share_is_their_ratio(compressed, spinning):
    path, batch = compressed
    result = inserted_cost.inserted_wall_time(path, batch, iters=5, warmup=1, threads=1, spinning=spinning)
    assert 0 < result["inserted_ms"] < result["model_ms"]
    assert result["share"] == pytest.approx(result["inserted_ms"] / result["model_ms"])
    assert result["run_overhead_ms"] > 0 and result["spinning"] is spinning


def test_a_model_with_nothing_inserted_is_refused(tmp_path_factory):
    model = onnx.load(str(export_zoo(tmp_path_factory, "timm", "vit_tiny_patch16_224")))
    with pytest.raises(ValueError, match="nothing was inserted"):
        inserted_cost.cut_inserted(model)
