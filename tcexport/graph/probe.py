"""Concrete shapes of every value in a graph, measured by running it once.

Static shape inference cannot see through the dynamic Reshapes that exporters emit for attention (their shape
comes from Shape ops), so the token-axis tracker works from real shapes: the graph runs once at batch 2 on
ONNX Runtime with every intermediate value exposed as an output.
"""

from __future__ import annotations

import onnx
import onnxruntime as ort

from tcexport.models import inputs as inputs_mod

PROBE_BATCH = 2  # not 1: a batch of 1 would look like any other size-1 axis


def concrete_shapes(model: onnx.ModelProto, batch: int = PROBE_BATCH) -> dict[str, tuple[int, ...]]:
    """Map value name -> shape for every graph input, node output and initializer of the top-level graph."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    names = [out for node in probe.graph.node for out in node.output if out]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in dict.fromkeys(names))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every value
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = inputs_mod.random_feeds(inputs_mod.specs_from_graph(model), batch)
    values = session.run(None, feeds)
    shapes = {out.name: tuple(value.shape) for out, value in zip(session.get_outputs(), values)}
    shapes.update({name: tuple(feed.shape) for name, feed in feeds.items()})
    shapes.update({t.name: tuple(t.dims) for t in model.graph.initializer})
    return shapes
