"""Wall-clock cost of the ops tcexport inserted into a model, measured without a profiler.

ONNX Runtime's profiler adds several microseconds to every node it times (it records an event per node per run),
so for a merge made of dozens of small nodes the profiled share of node time mostly measures the profiler. This
module measures the inserted ops the way they run: it cuts them out of the model as one subgraph (every node
whose name starts with INSERTED_PREFIX), feeds that subgraph the very tensors the whole model gives it (captured
from one run of the whole model), and times it in turns with the whole model, no profiler on either (run by run
with idle threads asleep, or in blocks with them spinning: `inserted_wall_time`). The per-run overhead of `session.run` itself is measured on a graph with the same inputs and subtracted.

What it cannot see: a fusion ONNX Runtime would make across the cut (a model op fused with an inserted op), and
cache effects (alone, the subgraph's inputs are hotter than inside the model, so the figure leans low).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from tcexport.models import inputs
from tcexport.core import onnxfile

INSERTED_PREFIX = "tc_"
BLOCK_RUNS = 4     # timed runs per turn when worker threads spin
PAUSE_S = 0.02    # before each turn: the previous session's spinning threads go idle within it


@dataclass
class Cut:
    """The inserted nodes as their own model, and the tensors that cross the cut."""

    model: onnx.ModelProto
    inputs: list[str]    # produced by the model's own ops (or graph inputs), read by inserted ops
    outputs: list[str]   # produced by inserted ops, read by the model's own ops (or graph outputs)
    nodes: int


def _is_inserted(node: onnx.NodeProto) -> bool:
    return node.name.startswith(INSERTED_PREFIX)


def value_types(model: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    graph = inferred.graph
    return {v.name: v for v in [*graph.value_info, *graph.input, *graph.output]}


def cut_inserted(model: onnx.ModelProto, types: dict[str, onnx.ValueInfoProto] | None = None) -> Cut:
    """Split off the inserted nodes of `model` (weights loaded) as a model of their own.

    types: the model's value types (`value_types`), when the caller already has them."""
    graph = model.graph
    mine = [node for node in graph.node if _is_inserted(node)]
    if not mine:
        raise ValueError(f"the model has no nodes named {INSERTED_PREFIX}*: nothing was inserted")
    produced_by_mine = {out for node in mine for out in node.output}
    initializers = {init.name: init for init in graph.initializer}
    crossing_in, crossing_out = [], []
    for node in graph.node:
        inserted = _is_inserted(node)
        for name in node.input:
            if not name:
                continue
            if inserted and name not in produced_by_mine and name not in initializers and name not in crossing_in:
                crossing_in.append(name)
            if not inserted and name in produced_by_mine and name not in crossing_out:
                crossing_out.append(name)
    crossing_out += [o.name for o in graph.output if o.name in produced_by_mine and o.name not in crossing_out]
    # A subgraph attribute (If/Loop) could read outer values by name; inserted ops never use them.
    types = types or value_types(model)
    used = {name for node in mine for name in node.input}
    sub = helper.make_graph(
        mine, "inserted_ops",
        [_typed(types, name) for name in crossing_in], [_typed(types, name) for name in crossing_out],
        initializer=[initializers[name] for name in initializers if name in used])
    cut_model = helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return Cut(cut_model, crossing_in, crossing_out, len(mine))


def _typed(types: dict[str, onnx.ValueInfoProto], name: str) -> onnx.ValueInfoProto:
    info = types.get(name)
    if info is None or not info.type.tensor_type.elem_type:
        raise ValueError(f"no type is known for {name}, which crosses the cut; run shape inference on the model")
    return helper.make_tensor_value_info(name, info.type.tensor_type.elem_type, None)


def with_outputs(model: onnx.ModelProto, names: list[str],
                 types: dict[str, onnx.ValueInfoProto] | None = None) -> bytes:
    """`model`, serialized, also returning `names` (to capture what crosses the cut in a real run). The model
    itself is left as it was (no copy of its weights is made)."""
    types = types or value_types(model)
    have = {o.name for o in model.graph.output}
    added = [_typed(types, name) for name in names if name not in have]
    model.graph.output.extend(added)
    try:
        return model.SerializeToString()
    finally:
        del model.graph.output[len(model.graph.output) - len(added):]


def _control(cut: Cut) -> onnx.ModelProto:
    """A graph with the cut's inputs and one trivial output: the per-run cost of session.run with those feeds."""
    first = cut.model.graph.input[0]
    node = helper.make_node("Shape", [first.name], ["shape"], name="control")
    graph = helper.make_graph([node], "control", list(cut.model.graph.input),
                              [helper.make_tensor_value_info("shape", onnx.TensorProto.INT64, None)])
    return helper.make_model(graph, opset_imports=list(cut.model.opset_import), ir_version=cut.model.ir_version)


def inserted_wall_time(model: str | Path | onnx.ModelProto, batch: int, iters: int = 30, warmup: int = 3,
                       threads: int | None = None, spinning: bool = False) -> dict:
    """Median wall time per run of the whole model and of its inserted ops alone (ms), and their ratio.

    spinning=False (as `tcexport bench` times): the three sessions (whole model, inserted ops, control) take turns
    run by run, their idle worker threads asleep, so a slow spell of a shared machine falls on all three.
    spinning=True (ONNX Runtime's default, what a deployed session runs): worker threads spin between runs, which
    spares each parallel op a thread wake-up; the sessions then take turns in blocks of BLOCK_RUNS runs, after a
    pause that lets the previous session's threads go idle and one untimed run.
    """
    import onnxruntime as ort

    from tcexport.backends import ort as ort_backend

    if not isinstance(model, onnx.ModelProto):
        model = onnxfile.load(model)  # weights too: the cut's constants may sit in external data
    types = value_types(model)
    cut = cut_inserted(model, types)
    feeds = inputs.random_feeds(inputs.specs_from_graph(model), batch)

    def session(proto: onnx.ModelProto | bytes) -> ort.InferenceSession:
        options = ort_backend.session_options(threads, interleaved=not spinning,
                                              model=model if isinstance(proto, bytes) else proto)
        serialized = proto if isinstance(proto, bytes) else proto.SerializeToString()
        return ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])

    widened = session(with_outputs(model, cut.inputs, types))
    captured = dict(zip(cut.inputs, widened.run(cut.inputs, feeds)))
    del widened
    runs = [(session(model), feeds), (session(cut.model), captured), (session(_control(cut)), captured)]
    for sess, feed in runs:
        for _ in range(warmup):
            sess.run(None, feed)
    times: list[list[float]] = [[], [], []]
    block = BLOCK_RUNS if spinning else 1
    for _ in range(-(-iters // block)):
        for slot, (sess, feed) in enumerate(runs):
            if spinning:
                time.sleep(PAUSE_S)
                sess.run(None, feed)
            for _ in range(block):
                start = time.perf_counter()
                sess.run(None, feed)
                times[slot].append(time.perf_counter() - start)
    whole_ms, alone_ms, control_ms = (1000 * float(np.median(t)) for t in times)
    inserted_ms = max(0.0, alone_ms - control_ms)
    return {"model_ms": whole_ms, "inserted_ms": inserted_ms, "run_overhead_ms": control_ms,
            "share": inserted_ms / whole_ms, "spinning": spinning, "inserted_nodes": cut.nodes,
            "crossing_inputs": len(cut.inputs), "crossing_outputs": len(cut.outputs)}
