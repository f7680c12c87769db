"""Concrete shapes of every value in a graph, measured by running it once.

Static shape inference cannot see through the dynamic Reshapes that exporters emit for attention (their shape
comes from Shape ops), so the token-axis tracker works from real shapes: the graph runs once at batch 2 on
ONNX Runtime with every intermediate value exposed as an output.

static_types runs it at two batch sizes to tell static dims from the batch axis: compress writes those into the
rewritten graph, so strict shape inference (and TensorRT's builder) sees every value's shape.
"""

from __future__ import annotations

import onnx
import onnxruntime as ort

from tcexport.models import inputs as inputs_mod

PROBE_BATCH = 2  # not 1: a batch of 1 would look like any other size-1 axis


def concrete_shapes(model: onnx.ModelProto, batch: int = PROBE_BATCH) -> dict[str, tuple[int, ...]]:
    """Map value name -> shape for every graph input, node output and initializer of the top-level graph."""
    (run,) = _runs(model, [batch])
    shapes = {name: shape for name, (_, shape) in run.items()}
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    return shapes


def static_types(model: onnx.ModelProto) -> dict[str, tuple[int, list]]:
    """Map node output name -> (ONNX element type, dims), from runs at batch 2 and 3: a dim the same in both is
    static, a dim equal to the batch in both is the graph inputs' batch symbol, any other (batch x heads) None."""
    symbol = next((v.type.tensor_type.shape.dim[0].dim_param for v in model.graph.input
                   if v.type.tensor_type.shape.dim and v.type.tensor_type.shape.dim[0].dim_param), "batch")
    batches = [PROBE_BATCH, PROBE_BATCH + 1]
    first, second = _runs(model, batches, inputs=False)
    types = {}
    for name, (dtype, a) in first.items():
        b = second[name][1]
        if len(a) != len(b):
            continue
        dims = [x if x == y else symbol if (x, y) == tuple(batches) else None for x, y in zip(a, b)]
        types[name] = (onnx.helper.np_dtype_to_tensor_dtype(dtype), dims)
    return types


def exposing(model: onnx.ModelProto, names: list[str]) -> ort.InferenceSession:
    """A session of `model` whose outputs are the values `names`, unoptimised so every one of them exists."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in dict.fromkeys(names))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every value
    options.log_severity_level = 3
    return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])


def values(model: onnx.ModelProto, names: list[str], batch: int) -> dict:
    """The values `names` (name -> array) from one run on random inputs at `batch` (text: every token real at 1)."""
    names = list(dict.fromkeys(names))
    feeds = inputs_mod.random_feeds(inputs_mod.specs_from_graph(model), batch)
    return dict(zip(names, exposing(model, names).run(names, feeds)))


def _runs(model: onnx.ModelProto, batches: list[int], inputs: bool = True) -> list[dict]:
    """One dict name -> (numpy dtype, shape) per batch: every node output (and the feeds, with `inputs`), from one
    session."""
    session = exposing(model, [out for node in model.graph.node for out in node.output if out])
    specs = inputs_mod.specs_from_graph(model)
    runs = []
    for batch in batches:
        feeds = inputs_mod.random_feeds(specs, batch)
        values = zip((out.name for out in session.get_outputs()), session.run(None, feeds))
        run = {name: (value.dtype, tuple(value.shape)) for name, value in values}
        run.update({name: (feed.dtype, tuple(feed.shape)) for name, feed in feeds.items()} if inputs else {})
        runs.append(run)
    return runs
