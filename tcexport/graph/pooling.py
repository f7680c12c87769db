"""Pooling over the tokens after a compression, in the rewritten graph: how a pooling that reads the attention
mask (sentence-transformers' Pooling, exported as plain ops) keeps its meaning. reference/pooling.py defines the
result for each mode; the rules here make the exported ops compute it.

- Mask data along the tokens (the mask, or what is computed from it token by token) is rebuilt from the current
  tokens (graph/insert.py): where it weights tokens that are summed (mean, mean_sqrt_len, weightedmean) as
  round(mask * size), where it multiplies tokens that are then picked one by one (lasttoken) as the current
  mask itself, 1 real and 0 padding.
- Per-row statistics of the mask (its leading padding: ArgMax; its sum) hold no token axis: they keep reading the
  input mask. A term that combines one with the original positions (weightedmean's arange(1, N + 1) - pad) is a
  position term: gathered at the current tokens' positions.
- A reduction over the tokens of the same mask data as a rebuilt operand (the denominator of a mean) that does
  not feed the blocks before the first compression sums the rebuilt data instead, so a weighted mean's weights
  are the ones its numerator used.
- A GatherElements that picks tokens at indices computed from the mask (cls: the first real token; lasttoken: the
  last) named an original position i; it now picks the real token at the largest position <= i (token 0 when
  there is none).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from tcexport.core.errors import UsageError
from tcexport.graph.probe import PROBE_BATCH
from tcexport.graph.tokens import const_array

PASS_THROUGH = {"Cast", "Identity", "CastLike"}


def mask_along_tokens(value: ir.Value, mask_input: ir.Value, shape_of: Callable, count: int) -> bool:
    """Whether `value` is computed from `mask_input` token by token: through values that all hold the original
    token `count` on some axis (so a per-row statistic such as ArgMax over the mask is not)."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v is mask_input:
            return True
        if v in seen:
            continue
        seen.add(v)
        producer = v.producer()
        if producer is None or producer.op_type in ("Shape", "Size"):
            continue
        for operand in producer.inputs:
            if operand is None or const_array(operand) is not None:
                continue
            shape = operand.shape if operand is mask_input else shape_of(operand)
            if operand is mask_input or (shape is not None and count in tuple(shape)):
                stack.append(operand)
    return False


def picks_tokens(node: ir.Node, token_axes: list[int], rank: int) -> bool:
    """Whether `node`'s output (of `rank`) reaches a GatherElements along one of its token axes, through casts."""
    stack = [node.outputs[0]]
    while stack:
        value = stack.pop()
        for user, index in value.uses():
            if user.op_type in PASS_THROUGH:
                stack.append(user.outputs[0])
            elif user.op_type == "GatherElements" and index == 0:
                axis = user.attributes["axis"].as_int() if "axis" in user.attributes else 0
                if axis % rank in token_axes:
                    return True
    return False


def ancestors(value: ir.Value) -> set[ir.Node]:
    """Every node `value` is computed from."""
    found: set[ir.Node] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        node = v.producer() if v is not None else None
        if node is None or node in found:
            continue
        found.add(node)
        stack.extend(node.inputs)
    return found


def reductions_of(operand: ir.Value, met: ir.Node, token_axes: list[int], rank: int,
                  upstream: set[ir.Node]) -> list[tuple[ir.Node, int]]:
    """(node, input index) of the ReduceSums over `operand`'s token axes (it has `rank`) besides `met`, outside
    `upstream` (what the first compression is computed from): sums of the mask data a rebuilt operand replaces."""
    found = []
    for user, index in operand.uses():
        if user is met or user in upstream or user.op_type != "ReduceSum" or index != 0 or len(user.inputs) < 2:
            continue
        axes = const_array(user.inputs[1])
        if axes is not None and set(token_axes) <= {int(a) % rank for a in axes.reshape(-1)}:
            found.append((user, index))
    return found


def token_index(build, node: ir.Node, state, positions: ir.Value, from_mask: bool, shape: tuple[int, ...]) -> ir.Value:
    """Replacement indices for a GatherElements along axis 1 that picks tokens where the original mask says
    (module doc): for each original position i in its indices, the real token at the largest position <= i."""
    indices = node.inputs[1]
    if not from_mask or state.mask is None:
        raise UsageError(f"cannot carry the token axis through GatherElements node '{node.name}': it picks tokens at "
                         "run-time indices that do not come from the attention mask, so tcexport cannot tell which "
                         "of the compressed tokens they mean")
    if len(shape) < 2 or shape[0] != PROBE_BATCH:
        raise UsageError(f"cannot carry the token axis through GatherElements node '{node.name}': it picks tokens "
                         f"from a value laid out {list(shape)}; tcexport follows picks from [batch, tokens, ...]")
    prefix = build.unique(f"{node.name}/token_index")
    rank = len(shape)
    spread = np.array([0, 1, -1] + [1] * (rank - 2), dtype=np.int64)  # [B, N'] -> [B, 1, N', 1...]
    target = build.op(f"{prefix}/target", "Unsqueeze", [
        build.op(f"{prefix}/int64", "Cast", [indices], None, to=ir.DataType.INT64),
        build.const(f"{prefix}/axis2", np.array([2]))], None)  # [B, K, 1, ...]: the original position each pick names
    where = build.op(f"{prefix}/positions", "Reshape", [positions, build.const(f"{prefix}/spread", spread)], None)
    real = build.op(f"{prefix}/is_real", "Greater", [state.mask, build.const(f"{prefix}/half", np.float32(0.5))],
                    None)
    real = build.op(f"{prefix}/real", "Reshape", [real, build.const(f"{prefix}/spread_real", spread)], None)
    ok = build.op(f"{prefix}/ok", "And", [build.op(f"{prefix}/not_after", "LessOrEqual", [where, target], None),
                                         real], None)
    score = build.op(f"{prefix}/score", "Where", [ok, where, build.const(f"{prefix}/none", np.int64(-1))], None)
    return build.op(prefix, "ArgMax", [score], None, axis=2, keepdims=0, select_last_index=0)
