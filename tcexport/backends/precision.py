"""Convert an ONNX graph's float32 tensors to float16 or bfloat16, keeping precision-sensitive ops in float32.

TensorRT 11 builds strongly typed networks only: precision comes from the types written in the ONNX graph, not
from builder flags. This module writes those types. The conversion itself is ONNX Runtime's well-kept
`onnxruntime.transformers.float16.convert_float_to_float16` (op block list, Casts around blocked nodes, float32
graph inputs/outputs with Casts at the boundary); tcexport adds what that converter leaves out:

- a block list tuned for transformers on TensorRT (normalisations, softmax, accumulating reductions, Pow/Sqrt/
  Erf/Exp, TopK for token ranking) on top of ONNX Runtime's own list;
- calls to model-local functions and custom-domain nodes stay float32 (their bodies are not converted), so a
  token-compression function keeps its ranking exact and its plugin contract unchanged: a tcexport plugin node
  (--impl plugin / function) gets fp32 x, metric, size and mask in a converted graph, with Casts around it;
- the nodes tcexport inserted to compress tokens (names tc_blk*, tc/*, tc_stage*: the metric, the score MatMul,
  TopK/ArgMax/ReduceMax, the size and mask arithmetic, the merge itself) stay float32, so which tokens merge or
  survive is decided in fp32 on every TensorRT version (10.x builds the converted graph strongly typed too);
- a clean graph afterwards: duplicate Casts merged, nodes topologically sorted (the converter appends its Casts
  at the end, and TensorRT's parser, like the ONNX checker, wants a sorted graph), stale value_info dropped;
- bfloat16: the converter only knows float16, so its float16 types are retagged as bfloat16 and every converted
  constant is re-rounded from the original float32 values (no detour through float16's range).

The result runs on ONNX Runtime's CPU provider for float16, which is how the tests check it.
"""

from __future__ import annotations

import copy
import heapq
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from tcexport.core import metadata
from tcexport.core import onnxfile
from tcexport.core.errors import UsageError
from tcexport.graph import hygiene

PRECISIONS = ("fp32", "fp16", "bf16")
PRECISION_RECORD = "tcexport.precision"

# Kept in float32 with Casts around them (in addition to ONNX Runtime's DEFAULT_OP_BLOCK_LIST).
SENSITIVE_OPS = (
    # normalisations: variance in float16 loses the small differences they exist to measure
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization",
    "BatchNormalization", "LpNormalization", "MeanVarianceNormalization",
    # softmax and its parts
    "Softmax", "LogSoftmax", "Exp",
    # accumulating reductions overflow or lose digits in float16
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp",
    "ReduceProd", "CumSum",
    # elementwise spots with steep error growth
    "Pow", "Sqrt", "Erf",
    # token ranking: a float16 score changes which tokens win ties
    "TopK", "ArgMax", "ArgMin",
)

_LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_SIZE_LIMIT_FOR_INFERENCE = 1_800_000_000


@dataclass
class ConversionReport:
    precision: str
    keep_io_types: bool
    blocked_ops: list[str]
    blocked_nodes: list[str] = field(default_factory=list)
    casts_added: int = 0
    tensors_low: int = 0  # initializers now in the low-precision type
    tensors_fp32: int = 0  # float32 initializers left as they were

    def to_json(self) -> dict:
        return {
            "precision": self.precision,
            "keep_io_types": self.keep_io_types,
            "blocked_ops": self.blocked_ops,
            "blocked_nodes": len(self.blocked_nodes),
            "casts_added": self.casts_added,
            "initializers_low_precision": self.tensors_low,
            "initializers_fp32": self.tensors_fp32,
        }


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    return precision


def default_block_ops() -> list[str]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return sorted(set(DEFAULT_OP_BLOCK_LIST) | set(SENSITIVE_OPS))


def convert(model: onnx.ModelProto, precision: str, *, keep_io_types: bool = True,
            block_ops: list[str] | tuple[str, ...] | None = None, extra_block_ops: tuple[str, ...] = (),
            block_nodes: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, ConversionReport]:
    """Return (converted copy of `model`, report). `precision` "fp32" returns an unchanged copy.

    keep_io_types: graph inputs/outputs stay float32 with Casts at the boundary (the default), so callers
    feed and read float32 whatever the engine computes in.
    block_ops: op types kept in float32 (default: ONNX Runtime's list + SENSITIVE_OPS); extra_block_ops adds to it.
    block_nodes: node names kept in float32.
    """
    check_precision(precision)
    model = copy.deepcopy(model)
    ops = sorted(set(block_ops if block_ops is not None else default_block_ops()) | set(extra_block_ops))
    report = ConversionReport(precision, keep_io_types, ops)
    if precision == "fp32":
        return model, report
    _refuse_reduced_precision(model)

    from onnxruntime.transformers.float16 import convert_float_to_float16

    _name_unnamed_nodes(model.graph)
    nodes = set(block_nodes) | _function_and_custom_nodes(model) | compression_nodes(model)
    if precision == "bf16":
        nodes |= _nodes_without_bfloat16(model)
    report.blocked_nodes = sorted(nodes)
    originals = _float_constants(model) if precision == "bf16" else {}
    nodes_before = len(model.graph.node)
    model = convert_float_to_float16(model, keep_io_types=keep_io_types, op_block_list=ops,
                                     node_block_list=sorted(nodes),
                                     disable_shape_infer=model.ByteSize() > _SIZE_LIMIT_FOR_INFERENCE)
    _dedupe_nodes(model.graph)
    _topological_sort(model.graph)
    del model.graph.value_info[:]  # the converter leaves stale float16 entries for tensors it kept in float32
    if precision == "bf16":
        _retag_float16_as_bfloat16(model, originals)
    report.casts_added = len(model.graph.node) - nodes_before
    model = hygiene.remove_unused_proto(model)  # what the conversion left unused (tcexport.graph.hygiene)
    low = _LOW_TYPES[precision]
    report.tensors_low = sum(1 for t in model.graph.initializer if t.data_type == low)
    report.tensors_fp32 = sum(1 for t in model.graph.initializer if t.data_type == TensorProto.FLOAT)
    if model.ByteSize() <= _SIZE_LIMIT_FOR_INFERENCE:
        model = onnx.shape_inference.infer_shapes(model)
    metadata.write(model, PRECISION_RECORD, report.to_json())
    return model, report


def convert_file(src: str | Path, dst: str | Path, precision: str, **options) -> ConversionReport:
    """Load `src`, convert it, save to `dst` (atomically). Returns the report."""
    from tcexport.core.atomic import atomic_file

    model = onnxfile.load(src)
    converted, report = convert(model, precision, **options)
    with atomic_file(dst) as tmp:
        onnxfile.save(converted, tmp)
    return report


def float_types(model: onnx.ModelProto) -> dict[str, int]:
    """How many initializers of each floating type the main graph holds, e.g. {"FLOAT16": 70, "FLOAT": 12}."""
    counts: dict[str, int] = {}
    for tensor in model.graph.initializer:
        if tensor.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE):
            name = TensorProto.DataType.Name(tensor.data_type)
            counts[name] = counts.get(name, 0) + 1
    return counts


# --- helpers ---------------------------------------------------------------------------------------------------


def _refuse_reduced_precision(model: onnx.ModelProto) -> None:
    reduced = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
    values = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    if any(t.data_type in reduced for t in model.graph.initializer) or any(
            v.type.tensor_type.elem_type in reduced for v in values):
        raise UsageError("the model already holds float16/bfloat16 tensors; convert from the float32 export instead")


def _name_unnamed_nodes(graph: onnx.GraphProto) -> None:
    """The converter blocks nodes by name; an empty name would match every unnamed node."""
    taken = {n.name for n in graph.node if n.name}
    for index, node in enumerate(graph.node):
        if not node.name:
            name = f"tcexport_{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


COMPRESSION_PREFIXES = ("tc_blk", "tc/", "tc_stage")  # graph/insert.py's names for what decides and merges tokens


def compression_nodes(model: onnx.ModelProto) -> set[str]:
    """Names of the token-compression nodes tcexport inserted (kept float32 by convert)."""
    return {n.name for n in model.graph.node if n.name.startswith(COMPRESSION_PREFIXES)}


def _function_and_custom_nodes(model: onnx.ModelProto) -> set[str]:
    """Main-graph nodes that call a model-local function or a custom-domain op: their bodies are not converted."""
    return {n.name for n in model.graph.node if n.domain not in ("", "ai.onnx")}


def _nodes_without_bfloat16(model: onnx.ModelProto) -> set[str]:
    """Nodes whose op, at the model's opset, does not accept bfloat16 data (e.g. Conv before opset 22)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        return set()
    names = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx") or not _float_input_allows(node.op_type, opset, "tensor(bfloat16)"):
            names.add(node.name)
    return names


def _float_input_allows(op_type: str, opset: int, type_str: str) -> bool:
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    params = [i.type_str for i in schema.inputs] + [o.type_str for o in schema.outputs]
    float_params = [p for p in params if "tensor(float)" in allowed.get(p, {p})]
    return all(type_str in allowed.get(p, {p}) for p in float_params)


def _float_constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The float32 values of initializers and Constant outputs, keyed by tensor name (for bfloat16 rounding)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _dedupe_nodes(graph: onnx.GraphProto) -> None:
    """Drop exact duplicates (the converter emits one Cast per consumer of a shared tensor, all with one name)."""
    seen: set[bytes] = set()
    keep = []
    for node in graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            keep.append(node)
    if len(keep) != len(graph.node):
        _replace_nodes(graph, keep)


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Stable topological order (Kahn's algorithm, ties broken by original position)."""
    producer = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name:
                producer[name] = index
    users: list[list[int]] = [[] for _ in graph.node]
    pending = [0] * len(graph.node)
    for index, node in enumerate(graph.node):
        for source in {producer[name] for name in _consumed_names(node) if name in producer} - {index}:
            users[source].append(index)
            pending[index] += 1
    ready = [i for i, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for user in users[index]:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(graph.node):
        raise UsageError("the converted graph has a cycle; this is a tcexport bug, please report it")
    if order != sorted(order):
        _replace_nodes(graph, [graph.node[i] for i in order])


def _consumed_names(node: onnx.NodeProto) -> set[str]:
    """Inputs of a node, including names its subgraphs read from the outer scope."""
    names = {name for name in node.input if name}
    for attr in node.attribute:
        for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for inner in sub.node:
                local |= set(inner.output)
            for inner in sub.node:
                names |= {n for n in _consumed_names(inner) if n not in local}
    return names


def _replace_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    copies = []
    for node in nodes:
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        copies.append(clone)
    del graph.node[:]
    graph.node.extend(copies)


def _to_bfloat16(values: np.ndarray, name: str, dims) -> TensorProto:
    import ml_dtypes

    array = np.asarray(values, dtype=np.float32).astype(ml_dtypes.bfloat16).reshape(tuple(dims))
    tensor = numpy_helper.from_array(array, name)
    return tensor


def _retag_float16_as_bfloat16(model: onnx.ModelProto, originals: dict[str, np.ndarray]) -> None:
    """Turn every float16 the converter wrote into bfloat16, re-rounding constants from their float32 values."""
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        for index, tensor in enumerate(graph.initializer):
            if tensor.data_type == TensorProto.FLOAT16:
                values = originals.get(tensor.name, numpy_helper.to_array(tensor).astype(np.float32))
                graph.initializer[index].CopyFrom(_to_bfloat16(values, tensor.name, tensor.dims))
        for value in list(graph.input) + list(graph.output) + list(graph.value_info):
            if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
                value.type.tensor_type.elem_type = TensorProto.BFLOAT16
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.INT and attr.i == TensorProto.FLOAT16 and (
                        (node.op_type == "Cast" and attr.name == "to") or attr.name == "dtype"):
                    attr.i = TensorProto.BFLOAT16
                elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                    key = node.output[0] if node.op_type == "Constant" and node.output else None
                    values = originals.get(key) if key else None
                    if values is None:
                        values = numpy_helper.to_array(attr.t).astype(np.float32)
                    attr.t.CopyFrom(_to_bfloat16(values, attr.t.name, attr.t.dims))
                elif attr.type == onnx.AttributeProto.GRAPH:
                    graphs.append(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    graphs.extend(attr.graphs)
