"""Legalize a graph for its own opset: rewrite nodes written in another opset's form into the model's.

The methods and the rewriter emit opset-18 forms. Between opsets 17 and 23 the ops they use changed signature
in two places (tests/test_opsets.py checks every op they emit against onnx.defs):

    Reduce* (all but ReduceSum)   axes is an input from 18, an attribute before 18
    Split                         num_outputs (an attribute) exists from 18; before it, no split input means
                                  equal parts, one per output

Every node of the main graph and of each model-local function (--impl function) is rewritten into the form its
own opset_import defines; nodes already in that form are left alone, so the pass is safe to run on any model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tcexport.core.errors import UsageError

AXES_INPUT_SINCE = 18
REDUCE_AXES_CHANGED = frozenset({"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
                                 "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"})
SPLIT_NUM_OUTPUTS_SINCE = 18
# Op types whose signature this pass adapts; tests compare this set with onnx.defs.
HANDLED = REDUCE_AXES_CHANGED | {"Split"}


def default_opset(opset_imports: dict[str, int]) -> int | None:
    return opset_imports.get("", opset_imports.get("ai.onnx"))


def legalize(model: ir.Model) -> int:
    """Rewrite every node of `model` (graph and local functions) into its opset's form; returns how many changed."""
    changed = _legalize_graph(model.graph, default_opset(model.opset_imports))
    for function in model.functions.values():
        changed += _legalize_graph(function, default_opset(function.opset_imports) or
                                   default_opset(model.opset_imports))
    return changed


def _legalize_graph(graph: ir.Graph | ir.Function, opset: int | None) -> int:
    if opset is None:
        return 0
    changed = 0
    for node in list(graph):
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in REDUCE_AXES_CHANGED:
            changed += _reduce_axes(graph, node, opset)
        elif node.op_type == "Split":
            changed += _split(graph, node, opset)
    return changed


def _reduce_axes(graph, node: ir.Node, opset: int) -> bool:
    if opset < AXES_INPUT_SINCE:
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return False
        axes_value = node.inputs[1]
        axes = constant_array(axes_value)
        if axes is None:
            raise UsageError(f"{node.op_type} node '{node.name}' reduces over axes computed at run time, which "
                             f"opset {opset} cannot express; export at opset 18 or later")
        if not axes.size and _attribute(node, "noop_with_empty_axes", 0):
            raise UsageError(f"{node.op_type} node '{node.name}' is a no-op reduction (empty axes), which opset "
                             f"{opset} cannot express; export at opset 18 or later")
        node.replace_input_with(1, None)
        node.resize_inputs(1)
        if axes.size:  # no axes attribute: reduce over all axes, as empty axes do from 18
            node.attributes["axes"] = ir.AttrInt64s("axes", [int(a) for a in axes.reshape(-1)])
        node.attributes.pop("noop_with_empty_axes", None)  # an opset-18 attribute
        _drop_if_unused(graph, axes_value)
        return True
    if "axes" not in node.attributes:
        return False
    axes = list(node.attributes.pop("axes").as_ints())
    _set_input(graph, node, 1, _constant(graph, node, "axes", np.array(axes, dtype=np.int64)))
    return True


def _split(graph, node: ir.Node, opset: int) -> bool:
    has_split_input = len(node.inputs) > 1 and node.inputs[1] is not None
    if opset < SPLIT_NUM_OUTPUTS_SINCE:
        if "num_outputs" not in node.attributes:
            return False
        count = node.attributes.pop("num_outputs").as_int()
        length = _axis_length(node)
        if length is None:
            raise UsageError(f"Split node '{node.name}' splits an axis of unknown length into {count} parts, which "
                             f"opset {opset} cannot express; export at opset 18 or later")
        if length % count:
            # opset 18 makes the last part smaller; below 18 that needs explicit sizes.
            part = -(-length // count)
            sizes = [part] * (count - 1) + [length - part * (count - 1)]
            _set_input(graph, node, 1, _constant(graph, node, "split", np.array(sizes, dtype=np.int64)))
        return True
    if has_split_input or "num_outputs" in node.attributes:
        return False
    node.attributes["num_outputs"] = ir.AttrInt64("num_outputs", len(node.outputs))
    return True


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's contents when it is an initializer or a Constant node's output (else None)."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is None or producer.op_type != "Constant":
        return None
    attribute = producer.attributes.get("value")
    if attribute is None or attribute.is_ref():
        return None
    return attribute.as_tensor().numpy()


def _attribute(node: ir.Node, name: str, default: int) -> int:
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.as_int()


def _axis_length(node: ir.Node) -> int | None:
    data = node.inputs[0]
    if data is None or data.shape is None:
        return None
    axis = _attribute(node, "axis", 0)
    dims = data.shape.dims
    if not -len(dims) <= axis < len(dims):
        return None
    dim = dims[axis]
    return dim if isinstance(dim, int) else None


def _constant(graph, before: ir.Node, label: str, array: np.ndarray) -> ir.Value:
    base = f"{before.name or f'{before.op_type}_{id(before):x}'}_{label}"
    constant = ir.node("Constant", [], attributes={"value": ir.tensor(array, name=base)}, name=f"{base}/const")
    constant.outputs[0].name = base
    constant.outputs[0].dtype = ir.DataType.INT64
    constant.outputs[0].shape = ir.Shape(list(array.shape))
    graph.insert_before(before, constant)
    return constant.outputs[0]


def _set_input(graph, node: ir.Node, index: int, value: ir.Value) -> None:
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def _drop_if_unused(graph, value: ir.Value) -> None:
    producer = value.producer()
    if producer is None or producer.op_type != "Constant" or value.uses():
        return
    if value in list(getattr(graph, "outputs", [])):
        return
    graph.remove(producer, safe=True)
