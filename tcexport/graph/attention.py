"""Decompose the fused opset-23 `Attention` op into the MatMul / Softmax form the rewriter anchors blocks on.

From opset 23 the dynamo exporter writes scaled_dot_product_attention as one `Attention` node. Token
compression needs the attention logits and probabilities (a Softmax per block, the keys as the logits MatMul's
right operand), so each such node becomes, with exactly the op's semantics:

    Q, K, V 3-D [B, S, heads*d]  ->  Reshape [B, S, heads, d] -> Transpose [B, heads, S, d]
    kv_num_heads < q_num_heads   ->  each K/V head repeated q_num_heads/kv_num_heads times (interleaved)
    logits = MatMul(Q * sqrt(scale), Transpose(K)^ * sqrt(scale))     scale defaults to 1/sqrt(d)
           + Where(mask, 0, -inf) for a bool attn_mask, + attn_mask for a float one
           + Where(tril, 0, -inf) when is_causal (top-left aligned)
    P = Softmax(logits) (in softmax_precision when set), a fully masked row giving zeros
    Y = MatMul(P, V), back to [B, S, heads*dv] for 3-D inputs

which is the layout the exporter writes at opsets 17-22. present_key/present_value (when used) are K and V.
What the exporters do not emit for encoders is refused with one line: past_key/past_value, softcap, a used
qk_matmul_output, masks shorter than the key sequence.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from tcexport.core.errors import UsageError

FUSED = "Attention"


def decompose_attention(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every fused Attention node decomposed (the same model when it has none)."""
    if not any(n.op_type == FUSED and n.domain in ("", "ai.onnx") for n in model.graph.node):
        return model
    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    ir_model = ir.from_proto(inferred)
    graph = ir_model.graph
    taken = {v.name for n in graph for v in n.outputs} | {v.name for v in graph.inputs}
    taken |= set(graph.initializers)
    fused = [n for n in graph if n.op_type == FUSED and n.domain in ("", "ai.onnx")]
    for index, node in enumerate(fused):
        _decompose(graph, node, _unique_prefix(f"tc_attn{index}", taken))
    return ir.to_proto(ir_model)


def _unique_prefix(base: str, taken: set[str]) -> str:
    prefix, k = base, 0
    while any(name.startswith(prefix + "/") or name.startswith(prefix + "_") for name in taken):
        k += 1
        prefix = f"{base}x{k}"
    return prefix


class _Emit:
    """New nodes before the fused one, named '<prefix>/<label>', carrying its metadata (module scopes)."""

    def __init__(self, graph: ir.Graph, anchor: ir.Node, prefix: str):
        self.graph, self.anchor, self.prefix = graph, anchor, prefix

    def op(self, label: str, op_type: str, *inputs: ir.Value | None, **attributes) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes=attributes or None, name=f"{self.prefix}/{label}")
        node.outputs[0].name = f"{self.prefix}_{label}"
        node.metadata_props.update(self.anchor.metadata_props)
        self.graph.insert_before(self.anchor, node)
        return node.outputs[0]

    def const(self, label: str, array: np.ndarray) -> ir.Value:
        return self.op(label, "Constant", value=ir.tensor(array, name=f"{self.prefix}_{label}"))


def _refuse(node: ir.Node, what: str) -> None:
    raise UsageError(f"Attention node '{node.name}' uses {what}, which tcexport cannot decompose for token "
                     "compression; re-export with --opset 22 or lower")


def _int(node: ir.Node, name: str, default: int | None = None) -> int | None:
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.as_int()


def _check_supported(node: ir.Node) -> None:
    inputs = list(node.inputs) + [None] * (6 - len(node.inputs))
    if inputs[4] is not None or inputs[5] is not None:
        _refuse(node, "a key/value cache (past_key/past_value)")
    if len(node.inputs) > 6 and any(v is not None for v in node.inputs[6:]):
        _refuse(node, "nonpad_kv_seqlen")
    softcap = node.attributes.get("softcap")
    if softcap is not None and softcap.as_float() > 0:
        _refuse(node, f"softcap={softcap.as_float():g}")
    if len(node.outputs) > 3 and node.outputs[3].uses():
        _refuse(node, "its qk_matmul_output output")


def _static_dim(value: ir.Value, axis: int) -> int | None:
    if value.shape is None or len(value.shape) <= axis:
        return None
    dim = value.shape.dims[axis]
    return dim if isinstance(dim, int) else None


def _decompose(graph: ir.Graph, node: ir.Node, prefix: str) -> None:
    _check_supported(node)
    q, k, v = node.inputs[:3]
    mask = node.inputs[3] if len(node.inputs) > 3 else None
    rank = len(q.shape) if q.shape is not None else None
    if rank not in (3, 4):
        _refuse(node, f"inputs of rank {rank} (expected 3-D or 4-D with known rank)")
    ir_dtype = q.dtype or ir.DataType.FLOAT
    dtype = np.dtype(ir_dtype.numpy())
    emit = _Emit(graph, node, prefix)
    if rank == 3:
        q_heads, kv_heads = _int(node, "q_num_heads"), _int(node, "kv_num_heads")
        if not q_heads or not kv_heads:
            _refuse(node, "3-D inputs without q_num_heads/kv_num_heads")
        q = _split_heads(emit, "q", q, q_heads)
        k = _split_heads(emit, "k", k, kv_heads)
        v = _split_heads(emit, "v", v, kv_heads)
        head_size = _static_dim(node.inputs[0], 2)
        head_size = head_size // q_heads if head_size is not None else None
    else:
        q_heads, kv_heads = _static_dim(q, 1), _static_dim(k, 1)
        head_size = _static_dim(q, 3)
    present_key, present_value = k, v
    if q_heads is None or kv_heads is None:
        _refuse(node, "a head count that is not static")
    if q_heads != kv_heads:
        if q_heads % kv_heads:
            _refuse(node, f"{q_heads} query heads for {kv_heads} key/value heads (not a multiple)")
        k = _repeat_heads(emit, "k", k, q_heads // kv_heads)
        v = _repeat_heads(emit, "v", v, q_heads // kv_heads)
    scale_attr = node.attributes.get("scale")
    if scale_attr is not None:
        scale = scale_attr.as_float()
    elif head_size is not None:
        scale = 1.0 / np.sqrt(head_size)
    else:
        _refuse(node, "a head size that is not static (needed for the default scale)")
    root = emit.const("scale_sqrt", np.array(np.sqrt(scale), dtype=dtype))
    logits = emit.op("logits", "MatMul", emit.op("q_scaled", "Mul", q, root),
                     emit.op("k_scaled", "Mul", emit.op("k_t", "Transpose", k, perm=[0, 1, 3, 2]), root))
    masked = False
    if mask is not None:
        kv_len, mask_len = _static_dim(k, 2), _static_dim(mask, len(mask.shape) - 1) if mask.shape else None
        if mask_len is not None and kv_len is not None and mask_len not in (1, kv_len):
            _refuse(node, f"an attn_mask over {mask_len} keys for {kv_len} keys (padded masks)")
        if mask.dtype == ir.DataType.BOOL:
            bias = emit.op("mask_bias", "Where", mask, emit.const("zero", np.array(0, dtype=dtype)),
                           emit.const("neg_inf", np.array(-np.inf, dtype=dtype)))
            masked = True
        else:
            bias = mask
            masked = True  # a float mask may hold -inf as well
        logits = emit.op("logits_masked", "Add", logits, bias)
    if _int(node, "is_causal", 0):
        q_len, kv_len = _static_dim(q, 2), _static_dim(k, 2)
        if q_len is None or kv_len is None:
            _refuse(node, "is_causal with sequence lengths that are not static")
        allowed = np.tril(np.ones((q_len, kv_len), dtype=bool))
        causal = np.where(allowed, 0, -np.inf).astype(dtype)
        logits = emit.op("logits_causal", "Add", logits, emit.const("causal_bias", causal))
        masked = True
    probs = _softmax(emit, node, logits, ir_dtype)
    if masked:  # a fully masked row is all -inf: NaN from Softmax, zeros by the op's definition
        probs = emit.op("probs_safe", "Where", emit.op("probs_nan", "IsNaN", probs),
                        emit.const("zero_p", np.array(0, dtype=dtype)), probs)
    y = emit.op("output", "MatMul", probs, v)
    if rank == 3:
        y = emit.op("output_3d", "Reshape", emit.op("output_t", "Transpose", y, perm=[0, 2, 1, 3]),
                    emit.const("output_shape", np.array([0, 0, -1], dtype=np.int64)))
    results = [y]
    for index, (label, value) in enumerate((("present_key", present_key), ("present_value", present_value)), 1):
        used = len(node.outputs) > index and (node.outputs[index].uses() or node.outputs[index].is_graph_output())
        results.append(emit.op(label, "Identity", value) if used else None)
    _replace(graph, node, results)


def _split_heads(emit: _Emit, label: str, value: ir.Value, heads: int) -> ir.Value:
    shape = emit.const(f"{label}_heads_shape", np.array([0, 0, heads, -1], dtype=np.int64))
    return emit.op(f"{label}_heads", "Transpose", emit.op(f"{label}_split", "Reshape", value, shape),
                   perm=[0, 2, 1, 3])


def _repeat_heads(emit: _Emit, label: str, value: ir.Value, times: int) -> ir.Value:
    """[B, H, S, d] -> [B, H*times, S, d] with each head repeated in place (h0, h0, h1, h1, ...)."""
    wide = emit.op(f"{label}_rep_unsq", "Unsqueeze", value, emit.const(f"{label}_rep_axis", np.array([2])))
    tiled = emit.op(f"{label}_rep_tile", "Tile", wide,
                    emit.const(f"{label}_rep_times", np.array([1, 1, times, 1, 1], dtype=np.int64)))
    heads_shape = emit.op(f"{label}_rep_dims", "Shape", value)
    b = emit.op(f"{label}_rep_b", "Slice", heads_shape, emit.const(f"{label}_rep_s0", np.array([0])),
                emit.const(f"{label}_rep_e1", np.array([1])))
    rest = emit.op(f"{label}_rep_rest", "Slice", heads_shape, emit.const(f"{label}_rep_s2", np.array([2])),
                   emit.const(f"{label}_rep_e4", np.array([4])))
    target = emit.op(f"{label}_rep_shape", "Concat", b, emit.const(f"{label}_rep_m1", np.array([-1])), rest, axis=0)
    return emit.op(f"{label}_rep", "Reshape", tiled, target)


def _softmax(emit: _Emit, node: ir.Node, logits: ir.Value, dtype: ir.DataType) -> ir.Value:
    precision = _int(node, "softmax_precision")
    if precision is None or precision == dtype.value:
        return emit.op("probs", "Softmax", logits, axis=-1)
    cast = emit.op("logits_cast", "Cast", logits, to=ir.DataType(precision))
    return emit.op("probs_cast", "Cast", emit.op("probs", "Softmax", cast, axis=-1), to=dtype)


def _replace(graph: ir.Graph, node: ir.Node, results: list[ir.Value]) -> None:
    for old, new in zip(node.outputs, results):
        if new is None:
            continue
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = f"{name}__fused"
        new.name = name
        new.type, new.shape = old.type, old.shape
    graph.remove(node, safe=True)
