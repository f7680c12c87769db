"""Track the token axis through a graph after a block changed the token count, and fix what hard-codes it.

A static export bakes the token count into shape constants (Reshape to [-1, 197, 3, 3, 64], Expand shapes,
Slice ends). After a method shrinks the tokens, every such constant downstream must change, and only those:
a 197 that is not on the token axis stays. So the tracker follows the token axis value by value, op by op,
from the method's outputs, using the shapes the original graph had at run time (graph/probe.py) to align axes,
and rewrites a constant only where the axis it tracks lands in it.

Values carry a stage: the index of the last method they descend from, which says how many tokens they hold.
Operands that carry the original token axis but do not descend from any method (an attention mask computed
from the model input, the mask used for mean pooling, a relative position bias, rotary tables) are "side
inputs": the caller supplies a replacement with the current token count (SideInputs), or the rewrite stops
with a message naming the node. A mean over the token axis is the caller's too: it becomes size-weighted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx_ir as ir

from tcexport.core.errors import UsageError

UNARY = {"Identity", "Cast", "CastLike", "Erf", "Relu", "Gelu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt", "Neg",
         "Abs", "Reciprocal", "Softmax", "LogSoftmax", "LayerNormalization", "Dropout", "IsNaN", "IsInf", "Not",
         "Clip", "HardSigmoid", "HardSwish", "Softplus", "Floor", "Ceil", "Round", "Sign", "Elu", "LeakyRelu",
         "SkipLayerNormalization", "RMSNormalization", "Mish", "BiasGelu", "FastGelu"}
BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Equal", "Less", "LessOrEqual",
             "Greater", "GreaterOrEqual", "And", "Or", "Xor", "Where", "PRelu", "Mod", "BitwiseAnd", "BitwiseOr"}
REDUCE = {"ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
          "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin"}


@dataclass(frozen=True)
class Tokens:
    """Where a value holds tokens: its token axes, the method stage it descends from, and an offset.

    The value holds stage_counts[stage] + delta tokens (delta < 0 after e.g. x[:, 1:] drops the CLS token);
    in the original graph it held n0 + delta.
    """

    axes: frozenset[int]
    stage: int
    delta: int = 0


class SideInputs(Protocol):
    """What the tracker asks its caller (graph/insert.py) for, when the original token count shows up."""

    def __call__(self, node: ir.Node, index: int, stage: int, axes: list[int], delta: int) -> ir.Value:
        """A replacement for node.inputs[index], whose `axes` (in its own rank) hold n0 + delta tokens."""

    def mean(self, node: ir.Node, stage: int, axis: int, delta: int) -> ir.Value:
        """A size-weighted replacement for `node`'s output, a ReduceMean over token `axis` only."""

    def token_index(self, node: ir.Node, stage: int) -> ir.Value:
        """Replacement indices for a GatherElements that picks tokens along axis 1 at run-time indices."""


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant data, from an initializer or a Constant node; None when it is computed."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].as_tensor().numpy()
    return None


class TokenTracker:
    """Follows token axes from the values in `starts` through `graph`, fixing constants as it goes.

    shapes: run-time shapes of the original graph (value -> shape); new values borrow the shape of the value
            they stand in for via `alias`.
    n0:     the token count in the original graph; stage_counts[s] is the count after method stage s.
    """

    def __init__(self, graph: ir.Graph, shapes: dict[str, tuple[int, ...]], n0: int, stage_counts: list[int],
                 side_input: SideInputs, skip: set[ir.Node]):
        self.graph = graph
        self.shapes_by_name = shapes
        self.alias: dict[ir.Value, tuple[int, ...]] = {}
        self.n0 = n0
        self.stage_counts = stage_counts
        self.side_input = side_input
        self.skip = skip
        self.tracked: dict[ir.Value, Tokens] = {}
        self.fixed_constants = 0

    # ------------------------------------------------------------------------------------------ shapes

    def shape(self, value: ir.Value) -> tuple[int, ...] | None:
        if value in self.alias:
            return self.alias[value]
        return self.shapes_by_name.get(value.name)

    def rank(self, value: ir.Value) -> int:
        shape = self.shape(value)
        if shape is None:
            raise UsageError(f"no run-time shape for value '{value.name}'; tcexport cannot follow the token axis")
        return len(shape)

    # ------------------------------------------------------------------------------------------ driver

    def run(self, starts: dict[ir.Value, Tokens]) -> None:
        self.tracked.update(starts)
        self.graph.sort()
        for node in list(self.graph):
            self.visit(node)

    def visit(self, node: ir.Node) -> None:
        if node in self.skip:
            return
        tracked_inputs = {i: self.tracked[v] for i, v in enumerate(node.inputs) if v is not None and v in self.tracked}
        if not tracked_inputs:
            return
        stages = {(t.stage, t.delta) for t in tracked_inputs.values()}
        if len(stages) > 1:
            raise UsageError(f"node '{node.name}' ({node.op_type}) mixes token sets of different sizes (e.g. a skip "
                             "connection across a compressed block); tcexport cannot rewrite this graph")
        stage, self.delta = stages.pop()
        self.out_delta = self.delta
        rule = getattr(self, f"_rule_{node.op_type}", None)
        if rule is None:
            if node.op_type in UNARY:
                rule = self._rule_unary
            elif node.op_type in BROADCAST:
                rule = self._rule_broadcast
            elif node.op_type in REDUCE:
                rule = self._rule_reduce
            else:
                rule = self._rule_unknown
        out_axes = rule(node, tracked_inputs, stage)
        for out, axes in zip(node.outputs, out_axes):
            if axes:
                self.tracked[out] = Tokens(frozenset(axes), stage, self.out_delta)

    # ------------------------------------------------------------------------------------------ helpers

    def count(self, stage: int) -> int:
        """Tokens held now by a value of this stage (and the node being visited's delta)."""
        return self.stage_counts[stage] + self.delta

    @property
    def original(self) -> int:
        """Tokens the value held in the original graph."""
        return self.n0 + self.delta

    def _replace_constant(self, node: ir.Node, index: int, array: np.ndarray) -> None:
        constant = ir.node("Constant", [], attributes={"value": ir.tensor(array)},
                           name=f"{node.name}/tokens_const{index}")
        constant.outputs[0].name = f"{node.name}_tokens_const{index}"
        self.graph.insert_before(node, constant)
        node.replace_input_with(index, constant.outputs[0])
        self.fixed_constants += 1

    def _fail(self, node: ir.Node, why: str) -> None:
        raise UsageError(f"cannot carry the token axis through {node.op_type} node '{node.name}': {why}")

    # ------------------------------------------------------------------------------------------ rules
    # Each rule returns, per output, the set of token axes (empty: the output carries no tokens).

    def _rule_unary(self, node, tracked, stage):
        if 0 not in tracked:
            return [set() for _ in node.outputs]
        return [set(tracked[0].axes)] + [set() for _ in node.outputs[1:]]

    def _rule_broadcast(self, node, tracked, stage):
        out_rank = self.rank(node.outputs[0])
        axes = set()
        for index, tokens in tracked.items():
            shift = out_rank - self.rank(node.inputs[index])
            axes |= {a + shift for a in tokens.axes}
        for index, operand in enumerate(node.inputs):
            if operand is None or index in tracked:
                continue
            shape = self.shape(operand)
            if shape is None:
                continue
            shift = out_rank - len(shape)
            hits = [a for a in axes if a - shift >= 0 and shape[a - shift] == self.original != 1]
            if not hits:
                continue
            replacement = self.side_input(node, index, stage, sorted(a - shift for a in hits), self.delta)
            node.replace_input_with(index, replacement)
        return [axes] + [set() for _ in node.outputs[1:]]

    def _rule_Transpose(self, node, tracked, stage):
        perm = list(node.attributes["perm"].as_ints()) if "perm" in node.attributes else None
        rank = self.rank(node.inputs[0])
        perm = perm or list(reversed(range(rank)))
        return [{perm.index(a) for a in tracked[0].axes}]

    def _rule_MatMul(self, node, tracked, stage):
        out_rank = self.rank(node.outputs[0])
        axes = set()
        if 0 in tracked:
            rank = self.rank(node.inputs[0])
            for a in tracked[0].axes:
                if a == rank - 2:
                    axes.add(out_rank - 2)
                elif a < rank - 2:
                    axes.add(a + out_rank - rank)
        if 1 in tracked:
            rank = self.rank(node.inputs[1])
            for a in tracked[1].axes:
                if a == rank - 1:
                    axes.add(out_rank - 1)
                elif a < rank - 2:
                    axes.add(a + out_rank - rank)
        return [axes]

    def _rule_Reshape(self, node, tracked, stage):
        if 0 not in tracked:
            self._fail(node, "the token count flows into a Reshape's shape input")
        in_shape, out_shape = self.shape(node.inputs[0]), self.shape(node.outputs[0])
        axes = set()
        for a in tracked[0].axes:
            before = int(np.prod(in_shape[:a]))
            matches = [j for j in range(len(out_shape))
                       if out_shape[j] == in_shape[a] and int(np.prod(out_shape[:j])) == before]
            if not matches:
                self._fail(node, f"the token axis is folded into another axis ({list(in_shape)} -> {list(out_shape)})")
            axes.add(matches[0])
        target = const_array(node.inputs[1])
        if target is not None:
            fixed = target.copy()
            for j in axes:
                if fixed[j] > 0:
                    fixed[j] = self.count(stage)
            if not np.array_equal(fixed, target):
                self._replace_constant(node, 1, fixed)
        return [axes]

    def _rule_Expand(self, node, tracked, stage):
        if 0 not in tracked:
            self._fail(node, "the token count flows into an Expand's shape input")
        out_rank = self.rank(node.outputs[0])
        shift = out_rank - self.rank(node.inputs[0])
        axes = {a + shift for a in tracked[0].axes}
        target = const_array(node.inputs[1])
        if target is not None:
            fixed = target.copy()
            for j in axes:
                if fixed[j] > 1:
                    fixed[j] = self.count(stage)
            if not np.array_equal(fixed, target):
                self._replace_constant(node, 1, fixed)
        else:
            self._fix_concat_shape(node, 1, axes, self.count(stage))
        return [axes]

    def _fix_concat_shape(self, node, index: int, axes: set[int], count: int) -> None:
        """A shape input computed as Concat([batch from Shape(...)], [16], [32]) (expand_as with a dynamic batch):
        the constant pieces where the token axes land get the current count, in a copy of the Concat for this node
        alone. Pieces computed at run time (read off a tensor's shape) adapt by themselves."""
        concat = node.inputs[index].producer()
        if concat is None or concat.op_type != "Concat" or concat.attributes["axis"].as_int() != 0:
            return
        pieces, offset, changed = [], 0, False
        for piece in concat.inputs:
            array = const_array(piece)
            shape = self.shape(piece) if array is None else array.shape
            if shape is None or len(shape) != 1:
                return  # cannot tell where the token axis lands; leave the shape as it was
            if array is not None:
                fixed = array.copy()
                for j in axes:
                    if offset <= j < offset + len(fixed) and fixed[j - offset] > 1:
                        fixed[j - offset] = count
                if not np.array_equal(fixed, array):
                    constant = ir.node("Constant", [], attributes={"value": ir.tensor(fixed)},
                                       name=f"{node.name}/tokens_shape{len(pieces)}")
                    constant.outputs[0].name = f"{node.name}_tokens_shape{len(pieces)}"
                    self.graph.insert_before(node, constant)
                    piece, changed = constant.outputs[0], True
            pieces.append(piece)
            offset += int(shape[0])
        if changed:
            copy = ir.node("Concat", pieces, attributes={"axis": 0}, name=f"{node.name}/tokens_shape")
            copy.outputs[0].name = f"{node.name}_tokens_shape"
            self.graph.insert_before(node, copy)
            node.replace_input_with(index, copy.outputs[0])
            self.fixed_constants += 1

    def _axes_input(self, node, position: int, attribute: str = "axes") -> list[int] | None:
        if len(node.inputs) > position and node.inputs[position] is not None:
            array = const_array(node.inputs[position])
            if array is None:
                self._fail(node, "its axes are computed at run time")
            return [int(a) for a in array.reshape(-1)]
        if attribute in node.attributes:
            return list(node.attributes[attribute].as_ints())
        return None

    def _rule_Unsqueeze(self, node, tracked, stage):
        out_rank = self.rank(node.outputs[0])
        inserted = sorted(a % out_rank for a in self._axes_input(node, 1))
        axes = set()
        for a in tracked[0].axes:
            position, kept = 0, -1
            for j in range(out_rank):
                if j in inserted:
                    continue
                kept += 1
                if kept == a:
                    position = j
                    break
            axes.add(position)
        return [axes]

    def _rule_Squeeze(self, node, tracked, stage):
        rank = self.rank(node.inputs[0])
        removed = self._axes_input(node, 1)
        if removed is None:
            removed = [j for j, d in enumerate(self.shape(node.inputs[0])) if d == 1]
        removed = {a % rank for a in removed}
        if removed & set(tracked[0].axes):
            self._fail(node, "it squeezes the token axis")
        return [{a - sum(1 for r in removed if r < a) for a in tracked[0].axes}]

    def _rule_Slice(self, node, tracked, stage):
        if 0 not in tracked:
            self._fail(node, "the token count flows into Slice bounds")
        rank = self.rank(node.inputs[0])
        starts, ends = const_array(node.inputs[1]), const_array(node.inputs[2])
        has_axes = len(node.inputs) > 3 and node.inputs[3] is not None
        axes_array = const_array(node.inputs[3]) if has_axes else None
        steps = const_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
        if starts is None or ends is None or (has_axes and axes_array is None):
            self._fail(node, "its bounds are computed at run time")
        sliced = [int(a) % rank for a in (axes_array if axes_array is not None else range(len(starts)))]
        axes = set()
        for a in tracked[0].axes:
            if a not in sliced:
                axes.add(a)
                continue
            k = sliced.index(a)
            start, end = int(starts[k]), int(ends[k])
            if steps is not None and int(steps[k]) != 1:
                self._fail(node, "it slices the token axis with a stride")
            if start < 0 or end < 0:
                self._fail(node, "it slices the token axis from the end")
            if end >= self.original:
                # To the end (Slice clamps ends, so no constant changes): tokens minus a fixed prefix.
                axes.add(a)
                self.out_delta = self.delta - start
            elif end > self.count(stage):
                self._fail(node, f"it takes tokens up to {end}, more than the {self.count(stage)} left")
            # else: a fixed prefix such as x[:, 0:1]; protected tokens stay first, so it stays right.
        return [axes]

    def _rule_Gather(self, node, tracked, stage):
        if 0 not in tracked:
            self._fail(node, "token-carrying indices")
        axis = int(node.attributes["axis"].as_int()) if "axis" in node.attributes else 0
        rank = self.rank(node.inputs[0])
        axis %= rank
        index_rank = self.rank(node.inputs[1])
        axes = set()
        for a in tracked[0].axes:
            if a == axis:
                indices = const_array(node.inputs[1])
                if indices is None or indices.size == self.original:
                    self._fail(node, "it gathers along the token axis with run-time or full-length indices")
                if (indices >= self.count(stage)).any():
                    self._fail(node, f"it gathers token {int(indices.max())}, beyond the {self.count(stage)} left")
            elif a < axis:
                axes.add(a)
            else:
                axes.add(a - 1 + index_rank)
        return [axes]

    def _rule_GatherElements(self, node, tracked, stage):
        if 0 not in tracked:
            self._fail(node, "token-carrying indices")
        rank = self.rank(node.inputs[0])
        axis = (node.attributes["axis"].as_int() if "axis" in node.attributes else 0) % rank
        axes = set(tracked[0].axes)
        if 1 in tracked:  # indices over the same tokens (the output is laid out as they are)
            if axis in axes:
                self._fail(node, "it picks tokens at indices that hold tokens themselves")
            return [set(tracked[1].axes)]
        index_shape = self.shape(node.inputs[1])
        if axis not in axes:
            if index_shape is None or any(index_shape[a] == self.original for a in axes):
                self._fail(node, "its indices span the original tokens")
            return [set()]
        if len(axes) != 1 or self.delta or axis != 1:
            self._fail(node, "it picks from a value with other token axes, a prefix left out or tokens not on axis 1")
        if index_shape is None or index_shape[axis] == self.original:
            self._fail(node, "it gathers as many tokens as there were originally (a reordering, not a pick)")
        indices = const_array(node.inputs[1])
        if indices is None:  # picks named by the mask (a pooling's first or last real token): graph/pooling.py
            node.replace_input_with(1, self.side_input.token_index(node, stage))
        elif (indices >= self.count(stage)).any():
            self._fail(node, f"it picks token {int(indices.max())}, beyond the {self.count(stage)} left")
        return [set()]

    def _rule_reduce(self, node, tracked, stage):
        rank = self.rank(node.inputs[0])
        reduced = self._axes_input(node, 1) if node.op_type.startswith("Reduce") else None
        if node.op_type.startswith("Arg"):
            reduced = [int(node.attributes["axis"].as_int()) if "axis" in node.attributes else 0]
        if reduced is None:
            reduced = list(range(rank))
        reduced = {a % rank for a in reduced}
        keepdims = node.attributes["keepdims"].as_int() if "keepdims" in node.attributes else 1
        token_axes = set(tracked[0].axes)
        if reduced & token_axes and node.op_type == "ReduceMean":
            if reduced != token_axes or len(token_axes) != 1:
                self._fail(node, "it averages over the token axis together with other axes")
            weighted = self.side_input.mean(node, stage, next(iter(token_axes)), self.delta)
            out = node.outputs[0]
            if out.is_graph_output():  # the weighted mean takes the output's name
                weighted.name, out.name = out.name, f"{out.name}_unweighted"
            out.replace_all_uses_with(weighted, replace_graph_outputs=True)
            return [set()]
        axes = set()
        for a in token_axes - reduced:
            axes.add(a if keepdims else a - sum(1 for r in reduced if r < a))
        return [axes]

    def _rule_Concat(self, node, tracked, stage):
        axis = int(node.attributes["axis"].as_int()) % self.rank(node.outputs[0])
        axes = set().union(*(t.axes for t in tracked.values()))
        if axis in axes:
            # Fixed leading tokens put back in front of the rest (EVA: cat([q[:, :, :1], rope(q[:, :, 1:])])):
            # the output holds the tokens after the prefix plus the prefix.
            index = next(iter(tracked)) if len(tracked) == 1 else None
            if index is None or index != len(node.inputs) - 1:
                self._fail(node, "it concatenates along the token axis (only a fixed prefix in front of the tokens "
                                 "is supported)")
            prefix = sum(self.shape(v)[axis] for v in node.inputs[:index])
            if self.delta + prefix > 0:
                self._fail(node, "it puts more tokens in front than the tokens it extends left out")
            self.out_delta = self.delta + prefix
        return [axes]

    def _rule_Split(self, node, tracked, stage):
        axis = int(node.attributes["axis"].as_int()) if "axis" in node.attributes else 0
        axis %= self.rank(node.inputs[0])
        if axis in tracked[0].axes:
            self._fail(node, "it splits the token axis")
        return [set(tracked[0].axes) for _ in node.outputs]

    def _rule_Shape(self, node, tracked, stage):
        return [set()]  # shape data adapts at run time; it carries no token axis itself

    def _rule_unknown(self, node, tracked, stage):
        for out in node.outputs:
            shape = self.shape(out)
            if shape and self.original in shape:
                self._fail(node, "tcexport has no rule for this op")
        return [set() for _ in node.outputs]
