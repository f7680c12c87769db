"""Position terms and pooling in the rewritten graph: what follows the tokens besides x, size and mask.

Positions: each token's original index, [B,N] int64, built only when a position term needs it. A stage's
origin (which input token each output token stands at) is measured as the reference measures it
(reference/flow.py): the method's own ONNX builder runs once more on one-hot rows (x = identity), and each output
row's first argmax is the input token with the largest share of it. positions_s = positions_{s-1}[origin_s].

A position term (relative position bias [1,H,N,N], rotary cos/sin [N,d], a position embedding) met by the
compressed tokens is gathered at the current positions, per batch row: aligned to the rank of the op it feeds,
expanded over the batch, and each token axis moved next to the batch for a GatherND with batch_dims=1.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from tcexport.core.errors import UsageError
from tcexport.graph.probe import PROBE_BATCH


class Positions:
    """Builds the positions of each stage on demand (once), and gathers position terms at them."""

    def __init__(self, build, states, protected: int, skip: set):
        self.build = build
        self.states = states
        self.protected = protected
        self.skip = skip  # the tracker must not walk the probe's nodes (they hold their own token counts)
        self.cache: dict[int, ir.Value] = {}

    def of_stage(self, stage: int) -> ir.Value:
        """[B, tokens after `stage`] int64."""
        if stage in self.cache:
            return self.cache[stage]
        build = self.build
        state = self.states[stage]
        inputs = state.inputs
        if stage == 0:
            n0 = inputs.count
            shape = build.op("tc_positions/shape", "Concat", [
                build.op("tc_positions/batch", "Shape", [inputs.x], None, start=0, end=1),
                build.const("tc_positions/n0", np.array([n0], dtype=np.int64))], None, axis=0)
            before = build.op("tc_positions/blk", "Expand", [build.const("tc_positions/arange",
                                                                          np.arange(n0, dtype=np.int64)[None]),
                                                              shape], (PROBE_BATCH, n0))
        else:
            before = self.of_stage(stage - 1)
        origin = self._origin(inputs)
        self.cache[stage] = build.op(f"tc_positions/blk{inputs.block}", "GatherElements", [before, origin],
                                     (PROBE_BATCH, state.count), axis=1)
        return self.cache[stage]

    def _origin(self, inputs) -> ir.Value:
        method, build, n = inputs.method, self.build, inputs.count
        method.check_positions_measurable()
        prefix = build.unique(f"tc_pos{inputs.block}_{method.name}")
        shape = build.op(f"{prefix}/eye_shape", "Concat", [
            build.op(f"{prefix}/batch", "Shape", [inputs.x], None, start=0, end=1),
            build.const(f"{prefix}/dims", np.array([n, n], dtype=np.int64))], None, axis=0)
        eye = build.op(f"{prefix}/eye", "Expand", [build.const(f"{prefix}/identity",
                                                                np.eye(n, dtype=np.float32)[None]), shape], None)
        eye.dtype, eye.shape = ir.DataType.FLOAT, ir.Shape([None, n, n])
        op = tape.Tape()
        shares, _, _ = method.build_onnx(op, eye, inputs.metric, inputs.size, inputs.mask, n, self.protected,
                                         name_prefix=prefix, signals=inputs.signals)
        for node in op.nodes:
            build.graph.append(node)
            self.skip.add(node)
        origin = build.op(f"{prefix}/origin", "ArgMax", [shares], None, axis=2, keepdims=0, select_last_index=0)
        _drop_unused(build.graph, op.nodes)
        return origin

    def gather(self, operand: ir.Value, shape: tuple[int, ...], axes: list[int], delta: int, stage: int,
               out_rank: int) -> ir.Value:
        """`operand` (run-time `shape`) with its token `axes` (n0 + delta long) at the current positions."""
        build = self.build
        positions = self.of_stage(stage)
        count = self.states[stage].count
        prefix = build.unique(f"tc_stage{stage}/position_term")
        skipped = -delta  # a term over the tokens after a fixed prefix (x[:, 1:]) counts from there
        if not 0 <= skipped <= self.protected:
            raise UsageError(f"a position term holds {shape[axes[0]]} tokens, but tcexport follows terms over all "
                             f"tokens or all but the first {self.protected} (the protected ones)")
        if skipped:
            positions = build.op(f"{prefix}/after_prefix", "Sub", [
                build.op(f"{prefix}/tail", "Slice", [positions, build.const(f"{prefix}/start", np.array([skipped])),
                                                     build.const(f"{prefix}/end", np.array([count])),
                                                     build.const(f"{prefix}/axis", np.array([1]))], None),
                build.const(f"{prefix}/skipped", np.array(skipped, dtype=np.int64))], None)
        lead = out_rank - len(shape)
        value, dims = operand, list(shape)
        if lead:
            value = build.op(f"{prefix}/aligned", "Unsqueeze", [value, build.const(f"{prefix}/lead",
                                                                                    np.arange(lead))], None)
            dims = [1] * lead + dims
        axes = [a + lead for a in axes]
        if 0 in axes or dims[0] not in (1, PROBE_BATCH):
            raise UsageError(f"the position term '{operand.name}' of shape {list(shape)} has no batch axis tcexport "
                             "can follow; expected [1 or batch, ..., tokens, ...]")
        if dims[0] == 1 and axes == [len(dims) - 2, len(dims) - 1]:
            return self._gather_pairs(prefix, value, dims, positions)
        batch = build.op(f"{prefix}/batch", "Concat", [
            build.op(f"{prefix}/batch_dim", "Shape", [positions], None, start=0, end=1),
            build.const(f"{prefix}/ones", np.ones(len(dims) - 1, dtype=np.int64))], None, axis=0)
        value = build.op(f"{prefix}/batched", "Expand", [value, batch], None)
        index = build.op(f"{prefix}/index", "Unsqueeze", [positions, build.const(f"{prefix}/last", np.array([2]))],
                         None)
        for axis in axes:
            perm = [0, axis] + [a for a in range(1, len(dims)) if a != axis]
            inverse = list(np.argsort(perm))
            moved = build.op(f"{prefix}/to_front{axis}", "Transpose", [value], None, perm=perm)
            picked = build.op(f"{prefix}/gather{axis}", "GatherND", [moved, index], None, batch_dims=1)
            value = build.op(f"{prefix}/back{axis}", "Transpose", [picked], None, perm=[int(i) for i in inverse])
        return value

    def _gather_pairs(self, prefix: str, value: ir.Value, dims: list[int], positions: ir.Value) -> ir.Value:
        """A term over token pairs shared by the batch ([1, ..., N, N], an attention bias): laid out pairs-first
        ([N * N, ...]: ONNX Runtime folds that when the term is constant, as relative position biases are), one
        Gather of the kept pairs at pos_i * N + pos_j, each a contiguous run of the other axes, then the batch
        and the other axes back in front. The general path expands the term to the batch and transposes each
        token axis to the front and back: five full copies of [B, H, N, N] per block."""
        build, n, middle = self.build, dims[-1], dims[1:-2]
        k = len(middle)
        pairs_first = build.op(f"{prefix}/pairs_first", "Transpose", [value], None,
                               perm=[k + 1, k + 2, 0, *range(1, k + 1)])  # [N, N, 1, middle...]
        flat = build.op(f"{prefix}/pairs", "Reshape", [pairs_first, build.const(
            f"{prefix}/pairs_shape", np.array([n * n, *middle], dtype=np.int64))], None)
        row = build.op(f"{prefix}/row", "Mul", [
            build.op(f"{prefix}/row_col", "Unsqueeze", [positions, build.const(f"{prefix}/axis2", np.array([2]))],
                     None), build.const(f"{prefix}/n", np.array(n, dtype=np.int64))], None)
        column = build.op(f"{prefix}/column", "Unsqueeze", [positions, build.const(f"{prefix}/axis1",
                                                                                    np.array([1]))], None)
        pair = build.op(f"{prefix}/pair", "Add", [row, column], None)  # [B, N', N']
        picked = build.op(f"{prefix}/gather_pairs", "Gather", [flat, pair], None, axis=0)  # [B, N', N', middle...]
        return build.op(f"{prefix}/batch_first", "Transpose", [picked], None, perm=[0, *range(3, k + 3), 1, 2])


def weighted_mean(build, node: ir.Node, state, axis: int, delta: int, shape: tuple[int, ...]) -> ir.Value:
    """sum(x * size) / sum(size) over token `axis` of node's input (the tokens after -delta prefix tokens)."""
    keepdims = node.attributes["keepdims"].as_int() if "keepdims" in node.attributes else 1
    prefix = build.unique(f"{node.name or 'mean'}/size_weighted")
    if axis != 1 or shape[0] != PROBE_BATCH:
        raise UsageError(f"the mean '{node.name}' averages tokens laid out {list(shape)}; tcexport weights means over "
                         "[batch, tokens, ...]")
    size = state.size  # [B, N, 1]
    if delta:
        size = build.op(f"{prefix}/tail", "Slice", [size, build.const(f"{prefix}/start", np.array([-delta])),
                                                    build.const(f"{prefix}/end", np.array([state.count])),
                                                    build.const(f"{prefix}/axis", np.array([1]))], None)
    weights = size
    if len(shape) != 3:  # [B, N, 1] -> [B, N, 1, ..., 1]
        weights = build.op(f"{prefix}/weights", "Reshape", [size, build.const(
            f"{prefix}/weights_shape", np.array([0, -1] + [1] * (len(shape) - 2), dtype=np.int64))], None)
    x = node.inputs[0]
    if x.dtype not in (None, ir.DataType.FLOAT):
        weights = build.op(f"{prefix}/cast", "Cast", [weights], None, to=x.dtype)
    axes = build.const(f"{prefix}/axes", np.array([1], dtype=np.int64))
    total = build.op(f"{prefix}/sum", "ReduceSum", [build.op(f"{prefix}/weighted", "Mul", [x, weights], None), axes],
                     None, keepdims=keepdims)
    mass = build.op(f"{prefix}/mass", "ReduceSum", [weights, axes], None, keepdims=1)
    if not keepdims:
        mass = build.op(f"{prefix}/mass_flat", "Squeeze", [mass, axes], None)
    return build.op(prefix, "Div", [total, mass], None)


def _drop_unused(graph: ir.Graph, nodes) -> None:
    """Remove the probe's nodes nobody reads (its size and mask outputs), last first."""
    for node in reversed(list(nodes)):
        if not any(out.uses() or out.is_graph_output() for out in node.outputs):
            graph.remove(node, safe=True)
