"""Graph hygiene after a rewrite: drop the nodes nothing reads, the initializers nothing uses and the model-local
functions nothing calls, so a written graph holds only what it computes.

A rewrite leaves such leftovers behind (a shape constant built for a block that ended up not needing it, say),
and ONNX Runtime warns about each when it loads the model ("Removing initializer ... It is not used by any
node"). Every graph tcexport rewrites and writes goes through `remove_unused` (compress, the fp16/bf16
conversion).

What stays, besides everything the outputs depend on:
  * the graph's inputs and outputs, used or not (validate feeds every input; the query method adds one);
  * functions that some call node uses (--impl function), and their bodies' nodes that reach the outputs;
  * the per-stage values `tcexport validate` reads back from the graph: each stage's token sizes
    (`tc_blk{b}_{method}_size_out`) and what it decided on (`tc_blk{b}_metric`, `tc_blk{b}_cls_attention`),
    and what computes them, even when no later node reads them (the last stage's sizes, for one). They tell a
    near-tie divergence from a numeric failure (tcexport.validate.equality, SIZE_OUTPUT / DECISION_OUTPUTS).
"""

from __future__ import annotations

import re

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass

# Values validate exposes as extra outputs (tcexport.validate.equality SIZE_OUTPUT and DECISION_OUTPUTS).
DIAGNOSTIC_VALUE = re.compile(r"^tc_blk\d+_([a-z_-]+_size_out|metric|cls_attention)$")


def remove_unused(model: ir.Model) -> bool:
    """In place: remove dead nodes (main graph, subgraphs, function bodies), unused initializers and uncalled
    functions, keeping the values listed in the module docstring. Returns whether anything was removed."""
    graph = model.graph
    outputs = set(graph.outputs)
    kept = [value for node in graph for value in node.outputs
            if value.name and DIAGNOSTIC_VALUE.match(value.name) and value not in outputs]
    graph.outputs.extend(kept)  # a graph output is never dead: this keeps them and what computes them
    try:
        modified = RemoveUnusedNodesPass()(model).modified
    finally:
        for _ in kept:
            graph.outputs.pop()
    return RemoveUnusedFunctionsPass()(model).modified or modified


def remove_unused_proto(model: onnx.ModelProto) -> onnx.ModelProto:
    """`remove_unused` for a ModelProto; returns the cleaned model (the input when nothing was removed)."""
    ir_model = ir.from_proto(model)
    if not remove_unused(ir_model):
        return model
    return ir.to_proto(ir_model)
