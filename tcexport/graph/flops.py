"""The FLOPs of an ONNX model at a given batch size: one accounting for the whole tool.

measure() is what every command reports (inspect, tune's flops budget, the model matrix, the benchmark scripts):
every value's shape comes from one ONNX Runtime run of the graph at the batch asked, so no two commands can
disagree on a model's FLOPs. Where the graph cannot run (an op ONNX Runtime lacks, such as a TensorRT plugin
node), the shapes come from shape inference instead, as estimate() works them out, and `shapes` says so.
When a node that may hold MatMul/Gemm/Conv compute is not counted, `total` is None and `not_derived` says why:
a partial sum is never reported as the total.

What is counted:
    total_flops   MatMul, Gemm, Conv, ConvTranspose at 2 FLOPs per multiply-accumulate (bias additions are not
                  included; a Linear exported as MatMul + Add counts its Add under other_flops).
    other_flops   cheap ops (elementwise, activations, softmax, normalisation, reductions, pooling) at a rough,
                  fixed number of FLOPs per element; reported apart from total_flops so the main figure stays
                  comparable with the usual "2 x MACs" numbers.
    unknown_nodes nodes that may carry compute but could not be estimated: shapes that inference could not
                  resolve, calls to model-local functions, control flow (If/Loop/Scan), ops outside the default
                  domain (com.microsoft ...), and default-domain ops this module does not model (Einsum, RNNs...).

How estimate() works: a light copy of the graph (nodes, inputs, outputs, value_info; large initializers keep
their dims but not their data) gets the symbolic batch dimension replaced by the concrete batch, then goes through
onnx.shape_inference.infer_shapes(strict_mode=False, data_prop=True). The weights themselves are never copied or
serialised, so a several-hundred-MB model costs little more than its node list.

Before counting, measure() decomposes fused opset-23 Attention nodes (graph.attention) and inlines calls to
model-local functions, each body's nodes named "<call node>/<body node>", so a compressed model written with
--impl function counts as its --impl subgraph twin does.

Per-node records (MatMul/Gemm/Conv/ConvTranspose) carry the node's module scope from its
"pkg.torch.onnx.name_scopes" metadata, so callers can aggregate per transformer block.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import onnx

SCOPES_KEY = "pkg.torch.onnx.name_scopes"

MAJOR_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")

# Rough FLOPs per output element for cheap ops.
_PER_OUTPUT_ELEMENT = {
    **dict.fromkeys(
        ["Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Erf", "Tanh",
         "Sigmoid", "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Gelu", "HardSigmoid", "HardSwish",
         "Softplus", "Mish", "Sin", "Cos", "Max", "Min", "Mean", "Sum", "Clip", "Where"], 1),
    "BatchNormalization": 2,  # inference: one scale and one shift
    "Softmax": 5,  # max, subtract, exp, sum, divide
    "LogSoftmax": 5,
    "RMSNormalization": 5,
    "LayerNormalization": 8,  # mean, subtract, square, mean, rsqrt, multiply, scale, shift
    "GroupNormalization": 8,
    "InstanceNormalization": 8,
}
# Ops costing about one FLOP per input element.
_PER_INPUT_ELEMENT = {
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare",
    "ReduceLogSum", "ReduceLogSumExp", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
}
_POOLS = {"AveragePool", "MaxPool", "LpPool"}  # FLOPs per output element = kernel area
_CONTROL_FLOW = {"If", "Loop", "Scan"}
# Default-domain ops that can be heavy but are not modelled here.
_NOT_MODELLED = {"Einsum", "Attention", "LSTM", "GRU", "RNN", "MatMulInteger", "ConvInteger", "QLinearMatMul",
                 "QLinearConv", "DeformConv"}

# Initializers up to this many elements keep their data in the inference copy (data propagation needs shape
# constants); larger ones keep only dims and type.
_KEEP_DATA_MAX_ELEMENTS = 1024

SHAPES_NOT_INFERRED = "shapes not inferred"


@dataclass
class NodeFlops:
    name: str
    op_type: str
    flops: int
    scope: list[str] | None  # module scopes, outermost first (e.g. ['', 'blocks', 'blocks.0', ...]); None if absent


@dataclass
class UnknownNode:
    name: str
    op_type: str
    reason: str


@dataclass
class FlopsResult:
    batch: int
    total_flops: int = 0  # MatMul + Gemm + Conv + ConvTranspose
    by_op_type: dict[str, int] = field(default_factory=dict)
    other_flops: int = 0  # cheap ops, rough
    other_by_op_type: dict[str, int] = field(default_factory=dict)
    nodes: list[NodeFlops] = field(default_factory=list)  # one record per counted MatMul/Gemm/Conv/ConvTranspose
    unknown: list[UnknownNode] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # e.g. "input 'x' has a static batch of 4"
    shapes: str = "inference"  # where the shapes came from: "run" (measure) or "inference"

    @property
    def unknown_nodes(self) -> int:
        return len(self.unknown)

    @property
    def uncounted(self) -> list[UnknownNode]:
        """Unknown nodes that may hold MatMul/Gemm/Conv compute (a cheap op without shapes only misses other_flops)."""
        return [u for u in self.unknown if u.op_type in MAJOR_OPS or u.reason != SHAPES_NOT_INFERRED]

    @property
    def not_derived(self) -> str | None:
        """Why total_flops is not the model's total (None when it is)."""
        missed = self.uncounted
        if not missed:
            return None
        first = missed[0]
        return (f"{len(missed)} node(s) that may hold MatMul/Gemm/Conv compute are not counted (shapes from "
                f"{self.shapes}), e.g. {first.name} ({first.op_type}): {first.reason}")

    @property
    def total(self) -> int | None:
        """total_flops when every node that may hold MatMul/Gemm/Conv compute is counted, else None."""
        return None if self.uncounted else self.total_flops

    @property
    def gflops(self) -> float:
        return self.total_flops / 1e9


def node_scope(node: onnx.NodeProto) -> list[str] | None:
    """The node's module scopes from the dynamo exporter's metadata, or None when absent or unreadable."""
    for prop in node.metadata_props:
        if prop.key == SCOPES_KEY:
            try:
                value = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return None
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return list(value)
            return None
    return None


def measure(model: onnx.ModelProto | str | Path, batch: int = 1) -> FlopsResult:
    """FLOPs of one run at `batch`, every value's shape from one ONNX Runtime run of the graph (see the module doc).

    A path is loaded with its external weights (the run needs them). The model passed in is not modified.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not isinstance(model, onnx.ModelProto):
        from tcexport.core import onnxfile

        model = onnxfile.load(model)
    notes: list[str] = []
    model = _countable(model, notes)
    try:
        from tcexport.graph import probe

        shapes = {name: list(shape) for name, shape in probe.concrete_shapes(model, batch=batch).items()}
    except Exception as exc:  # noqa: BLE001 - any failure to run (unknown op, missing weights, > 2 GB) falls back
        result = estimate(model, batch=batch)
        why = " ".join(str(exc).split())[:200] or type(exc).__name__
        result.notes[:0] = [*notes, f"the graph did not run on ONNX Runtime ({why}); shapes from shape inference"]
        return result
    result = FlopsResult(batch=batch, notes=notes, shapes="run")
    _count(model, shapes, result)
    return result


def _countable(model: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    """The model with fused Attention decomposed and local function calls inlined (the same object if neither)."""
    from tcexport.core.errors import UsageError
    from tcexport.graph import attention

    try:
        model = attention.decompose_attention(model)
    except UsageError as exc:  # a form it refuses: the Attention nodes stay, uncounted, and the result says so
        notes.append(str(exc))
    if not model.functions:
        return model
    local = {(f.domain, f.name): f for f in model.functions}
    calls = [n for n in model.graph.node if (n.domain, n.op_type) in local]
    if not calls:
        return model
    import onnx.inliner

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for index, node in enumerate(n for n in copy.graph.node if (n.domain, n.op_type) in local):
        body = copy.functions.add()
        body.CopyFrom(local[(node.domain, node.op_type)])
        body.name = node.op_type = f"{body.name}__call{index}"  # one body per call, its nodes named after the call
        call = node.name or f"{body.name}"
        for position, inner in enumerate(body.node):
            inner.name = f"{call}/{inner.name or f'{inner.op_type}_{position}'}"
    try:
        return onnx.inliner.inline_local_functions(copy)
    except Exception as exc:  # noqa: BLE001 - the calls stay uncounted, and the result says so
        notes.append(f"model-local functions could not be inlined ({type(exc).__name__}); their calls are not counted")
        return model


def estimate(model: onnx.ModelProto | str | Path, batch: int = 1, dims: Mapping[str, int] | None = None) -> FlopsResult:
    """FLOPs at `batch` from the shapes shape inference works out, without running the graph (measure() is the
    tool's accounting; this is its fallback). `dims` gives values for other symbolic dimensions (e.g.
    {"sequence": 128}).

    A path is loaded without external data (only dims are needed). The model passed in is not modified.
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if not isinstance(model, onnx.ModelProto):
        from tcexport.core import onnxfile

        model = onnxfile.load(model, load_external_data=False)
    result = FlopsResult(batch=batch)
    light = _light_copy(model)
    _fix_dims(light, batch, dims or {}, result.notes)
    inferred = _infer(light, result.notes)
    shapes = _shape_table(inferred, model)
    _count(model, shapes, result)
    return result


def _light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without large initializer data or node metadata: what shape inference needs, cheap to serialise."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    src, dst = model.graph, light.graph
    dst.name = src.name
    dst.input.extend(src.input)
    dst.output.extend(src.output)
    dst.value_info.extend(src.value_info)
    dst.sparse_initializer.extend(src.sparse_initializer)
    for node in src.node:
        copy = dst.node.add()
        copy.CopyFrom(node)
        del copy.metadata_props[:]
        copy.doc_string = ""
    for tensor in src.initializer:
        if math.prod(tensor.dims) <= _KEEP_DATA_MAX_ELEMENTS or tensor.data_location == onnx.TensorProto.EXTERNAL:
            dst.initializer.append(tensor)
        else:
            stub = dst.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims))
            stub.data_location = onnx.TensorProto.EXTERNAL  # inference reads dims only; data is never looked up
            stub.external_data.add(key="location", value="tcexport-flops-stripped")
    return light


def _fix_dims(light: onnx.ModelProto, batch: int, dims: Mapping[str, int], notes: list[str]) -> None:
    """Give dim 0 of each graph input the batch size; replace symbols with values wherever they appear."""
    initializers = {t.name for t in light.graph.initializer}
    symbols: dict[str, int] = {}
    for value in light.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        shape = value.type.tensor_type.shape
        if not value.type.tensor_type.HasField("shape") or not shape.dim:
            continue
        dim0 = shape.dim[0]
        if dim0.HasField("dim_value"):
            if dim0.dim_value != batch:
                notes.append(f"input '{value.name}' has a static batch of {dim0.dim_value}; "
                             f"its FLOPs are for that batch, not {batch}")
        elif dim0.dim_param:
            symbols[dim0.dim_param] = batch
        else:
            dim0.dim_value = batch
    symbols.update(dims)
    if not symbols:
        return
    graph = light.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if not value.type.HasField("tensor_type"):
            continue
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in symbols:
                dim.dim_value = symbols[dim.dim_param]  # clears dim_param (oneof)


def _infer(light: onnx.ModelProto, notes: list[str]) -> onnx.ModelProto:
    # Shape inference is best effort: strict_mode=False skips nodes it cannot handle. A model it rejects outright
    # (any exception type: InferenceError, ValidationError, RuntimeError ...) is retried without data propagation,
    # then counted from the shapes already stored in the file.
    try:
        return onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - see above
        notes.append(f"shape inference with data propagation failed ({type(exc).__name__}); retried without")
    try:
        return onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=False)
    except Exception as exc:  # noqa: BLE001
        notes.append(f"shape inference failed ({type(exc).__name__}); using the shapes stored in the model")
    return light


Shape = list  # of int (known) or None (unknown)


def _shape_table(inferred: onnx.ModelProto, original: onnx.ModelProto) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    graph = inferred.graph
    for value in [*graph.input, *graph.output, *graph.value_info]:
        tensor_type = value.type.tensor_type if value.type.HasField("tensor_type") else None
        if tensor_type is None or not tensor_type.HasField("shape"):
            continue
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    for tensor in original.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes


def _known(shape: Shape | None) -> bool:
    return shape is not None and all(d is not None for d in shape)


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _count(model: onnx.ModelProto, shapes: dict[str, Shape], result: FlopsResult) -> None:
    functions = {(f.domain, f.name) for f in model.functions}

    def shape_of(name: str) -> Shape | None:
        return shapes.get(name) if name else None

    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"

        def unknown(reason: str) -> None:
            result.unknown.append(UnknownNode(name, node.op_type, reason))

        if (node.domain, node.op_type) in functions:
            unknown("call to a model-local function")
            continue
        if node.domain not in ("", "ai.onnx"):
            unknown(f"op from domain '{node.domain}'")
            continue
        op = node.op_type
        if op in _CONTROL_FLOW:
            unknown("control flow (subgraphs are not counted)")
            continue
        if op in _NOT_MODELLED:
            unknown("op not modelled")
            continue
        if op in MAJOR_OPS:
            flops = _major_flops(node, shape_of)
            if flops is None:
                unknown(SHAPES_NOT_INFERRED)
                continue
            result.total_flops += flops
            result.by_op_type[op] = result.by_op_type.get(op, 0) + flops
            result.nodes.append(NodeFlops(name, op, flops, node_scope(node)))
            continue
        flops = _cheap_flops(node, shape_of)
        if flops is _FREE:
            continue
        if flops is None:
            unknown(SHAPES_NOT_INFERRED)
            continue
        result.other_flops += flops
        result.other_by_op_type[op] = result.other_by_op_type.get(op, 0) + flops


_FREE = object()  # data movement, shape arithmetic: no FLOPs


def _major_flops(node: onnx.NodeProto, shape_of) -> int | None:
    inputs = list(node.input)
    op = node.op_type
    if op == "MatMul":
        if len(inputs) < 2:
            return None
        return _matmul_flops(shape_of(inputs[0]), shape_of(inputs[1]), shape_of(node.output[0]))
    if op == "Gemm":
        if len(inputs) < 2:
            return None
        a, b = shape_of(inputs[0]), shape_of(inputs[1])
        if not (_known(a) and _known(b)) or len(a) != 2 or len(b) != 2:
            return None
        m, k = (a[1], a[0]) if _attr(node, "transA", 0) else (a[0], a[1])
        n = b[0] if _attr(node, "transB", 0) else b[1]
        return 2 * m * k * n
    if op == "Conv":
        w, y = shape_of(inputs[1]) if len(inputs) > 1 else None, shape_of(node.output[0])
        if not (_known(w) and _known(y)) or len(w) < 3:
            return None
        # weight: [C_out, C_in / group, k...]; each output element takes C_in/group * prod(k) MACs
        return 2 * _numel(y) * _numel(w[1:])
    if op == "ConvTranspose":
        x, w = shape_of(inputs[0]), shape_of(inputs[1]) if len(inputs) > 1 else None
        if not (_known(x) and _known(w)) or len(w) < 3:
            return None
        # weight: [C_in, C_out / group, k...]; each input element scatters into C_out/group * prod(k) outputs
        return 2 * _numel(x) * _numel(w[1:])
    return None


def _matmul_flops(a: Shape | None, b: Shape | None, y: Shape | None) -> int | None:
    if _known(a) and _known(b) and a and b:
        a2 = [1, *a] if len(a) == 1 else list(a)
        b2 = [*b, 1] if len(b) == 1 else list(b)
        m, k, n = a2[-2], a2[-1], b2[-1]
        try:
            batch_dims = _broadcast(a2[:-2], b2[:-2])
        except ValueError:
            return None
        return 2 * _numel(batch_dims) * m * k * n
    # Fall back on the output shape and the contracted size from whichever input knows it.
    candidates = [a[-1] if a else None, (b[-2] if len(b) >= 2 else b[0]) if b else None]
    k = next((c for c in candidates if c is not None), None)
    if _known(y) and k is not None:
        return 2 * _numel(y) * k
    return None


def _broadcast(a: list[int], b: list[int]) -> list[int]:
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x = a[-i] if i <= len(a) else 1
        y = b[-i] if i <= len(b) else 1
        if x != y and 1 not in (x, y):
            raise ValueError(f"cannot broadcast {a} and {b}")
        out.append(max(x, y) if 0 not in (x, y) else 0)
    return out[::-1]


def _cheap_flops(node: onnx.NodeProto, shape_of):
    op = node.op_type
    if op in _PER_OUTPUT_ELEMENT:
        y = shape_of(node.output[0]) if node.output else None
        return _PER_OUTPUT_ELEMENT[op] * _numel(y) if _known(y) else None
    if op in _PER_INPUT_ELEMENT:
        x = shape_of(node.input[0]) if node.input else None
        return _numel(x) if _known(x) else None
    if op in _POOLS:
        y = shape_of(node.output[0]) if node.output else None
        kernel = _attr(node, "kernel_shape", None)
        return _numel(y) * math.prod(kernel) if _known(y) and kernel else None
    return _FREE
