"""`tcexport lint`: check an ONNX graph against what TensorRT's ONNX parser documents for a given version.

No GPU and no TensorRT needed: the rules come from onnx-tensorrt's docs/operators.md and docs/Changelog.md and
from the TensorRT plugin docs, written down below as tables with their sources. Every graph is checked: the main
graph, subgraphs of If/Loop/Scan, and the bodies of model-local functions (TensorRT inlines those).

Rules (id: what it checks):
    opset          model opset outside the range the parser documents for that version (warning)
    op-version     a node's op version is newer than the newest opset the parser documents (warning)
    unsupported-op op with no importer in that version (error), ONNX-ML ops (error)
    topk           TopK with sorted=0 (error); constant K >= 3840 (error); K computed at run time (warning)
    scatter-reduction  ScatterElements with a reduction: runs only through libnvinfer_plugin's ScatterElements
                   plugin with int64 indices (warning when int64 or unknown, error for int32 or bf16/int8 data)
    scatternd-reduction ScatterND with a reduction: unsupported (error)
    attention      the opset-23 Attention op: needs TensorRT >= 10.14 (error), and its documented restrictions
    dtype          data types TensorRT lacks (error) or handles partly (warning)
    custom-op      custom-domain nodes: a model-local function (inlined; a warning says whether tcexport's plugin
                   of that name can replace it; an error when the parser would resolve it to another function or
                   a built-in op), a tcexport plugin (which plugin kinds the version runs: C++ IPluginV3 from
                   10.0, Python JIT 10.6, AOT 10.9; its INT32 fields; `aot`), or an op no plugin implements (error)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from tcexport.core import onnxfile
from tcexport.backends import trt_versions
from tcexport.backends.trt_versions import TrtVersion
from tcexport.core.errors import ValidationFailed
from tcexport.methods import registry

ERROR = "error"
WARNING = "warning"
DEFAULT_DOMAINS = ("", "ai.onnx")
TOPK_MAX_K = 3840  # "K input must be less than 3840" (operators.md, TopK)

# --- what the parser supports ------------------------------------------------------------------------------------

# Operators TensorRT 10.0's ONNX parser imports: the "Y" rows of onnx-tensorrt release/10.0-GA docs/operators.md
# ("TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20"); release/10.1-GA lists the same.
SUPPORTED_10_0 = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu
Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear
Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid
HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization
Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign
Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile
TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Importers added later: first TensorRT version, per onnx-tensorrt docs/Changelog.md (10.4: window functions;
# 10.5: real-valued STFT; 10.14: Attention; 10.15: RotaryEmbedding, RMSNormalization, TensorScatter; the 10.15
# operators.md marks all of these "Y") and the TensorRT 11.0 release notes (Swish).
ADDED_IN = {
    "BlackmanWindow": (10, 4), "HammingWindow": (10, 4), "HannWindow": (10, 4),
    "STFT": (10, 5),
    "Attention": (10, 14),
    "RotaryEmbedding": (10, 15), "RMSNormalization": (10, 15), "TensorScatter": (10, 15),
    "Swish": (11, 0),
}

# Marked "N" (no importer) in operators.md from 10.0 through 10.15.
UNSUPPORTED = frozenset("""
AffineGrid Bernoulli BitShift BitwiseAnd BitwiseNot BitwiseOr BitwiseXor CenterCropPad Col2Im Compress
ConcatFromSequence ConvInteger DFT Det DynamicQuantizeLinear ImageDecoder MatMulInteger MaxRoiPool MaxUnpool
MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement OptionalHasElement QLinearConv
QLinearMatMul RegexFullMatch SequenceAt SequenceConstruct SequenceEmpty SequenceErase SequenceInsert SequenceLength
SequenceMap SoftmaxCrossEntropyLoss SplitToSequence StringConcat StringNormalizer StringSplit TfIdfVectorizer Unique
""".split())

# Newest opset documented per TensorRT version, as (first version, max opset). Documented: 10.0 -> 20 (operators.md
# 10.0-GA), 10.15 -> 24 (operators.md 10.15), 11.5 -> 25 (TensorRT 11.5 release notes: "Added support for ONNX opset
# 25"). Inferred from the changelog where operators.md of that release was not available: 10.6 updated the parser's
# ONNX to 1.17 (opset 22; 10.9 added opset-21 GroupNormalization); 10.14 imports the opset-23 Attention op.
MAX_OPSET = (((10, 0), 20), ((10, 6), 22), ((10, 14), 23), ((10, 15), 24), ((11, 5), 25))
MIN_OPSET = 9  # "inclusive range of opset 9 to ..." in every 10.x operators.md

# TensorRT's ONNX data types (operators.md 10.x): DOUBLE (cast down to FLOAT), FLOAT32, FLOAT16, BFLOAT16, FP8
# (E4M3FN), FP4 (E2M1, from 10.8 per the changelog), INT32, INT64 (native since 9.0, no longer cast to INT32),
# INT8/INT4 (quantized types, through Q/DQ only), UINT8 (network input/output only), BOOL.
_T = TensorProto
NATIVE_TYPES = frozenset({_T.FLOAT, _T.FLOAT16, _T.BFLOAT16, _T.INT32, _T.INT64, _T.BOOL})
QUANTIZED_TYPES = {_T.INT8: (10, 0), _T.INT4: (10, 0), _T.FLOAT8E4M3FN: (10, 0), _T.FLOAT4E2M1: (10, 8)}


def max_opset(version: TrtVersion) -> int:
    best = MAX_OPSET[0][1]
    for since, opset in MAX_OPSET:
        if version.at_least(*since):
            best = opset
    return best


def supported_ops(version: TrtVersion) -> frozenset[str]:
    return SUPPORTED_10_0 | {op for op, since in ADDED_IN.items() if version.at_least(*since)}


# --- findings ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" or "warning"
    rule: str
    node: str  # node name ("" for model-level findings)
    op_type: str
    message: str
    scope: str = "graph"  # "graph", "function DOMAIN:NAME", or "graph/If_1.then_branch"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class LintReport:
    model: str
    trt_version: str
    opset: int | None
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        return (f"{len(self.errors)} error(s), {len(self.warnings)} warning(s) for TensorRT {self.trt_version} "
                f"in {self.model}")

    def to_json(self) -> dict:
        return {"model": self.model, "trt_version": self.trt_version, "opset": self.opset,
                "errors": len(self.errors), "warnings": len(self.warnings),
                "findings": [f.to_json() for f in self.findings]}


# --- walking graphs ----------------------------------------------------------------------------------------------


@dataclass
class Scope:
    """One graph body being checked: its nodes, the constants it can see, and the tensor types known in it."""

    name: str
    nodes: list[onnx.NodeProto]
    opset: int | None
    constants: dict[str, TensorProto]  # name -> value (initializers, Constant outputs), outer scopes included
    types: dict[str, int]  # tensor name -> elem_type, where known
    io: set[str] = field(default_factory=set)  # names of the model's graph inputs/outputs (main graph only)
    own: set[str] | None = None  # names whose types this scope reports (None: all of `types`)


def _default_opset(opset_import) -> int | None:
    return next((o.version for o in opset_import if o.domain in DEFAULT_DOMAINS), None)


def _constant_values(nodes, initializers) -> dict[str, TensorProto]:
    values = {t.name: t for t in initializers}
    for node in nodes:
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output:
            for attr in node.attribute:
                # (a function body's Constant may take its value from the call: ref_attr_name, no tensor here)
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR and not attr.ref_attr_name:
                    values[node.output[0]] = attr.t
    return values


def _value_types(values) -> dict[str, int]:
    return {v.name: v.type.tensor_type.elem_type for v in values
            if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}


def _node_output_types(nodes) -> dict[str, int]:
    """Types that follow from a node alone: Cast's `to`, Constant values."""
    types = {}
    for node in nodes:
        if node.domain not in DEFAULT_DOMAINS or not node.output:
            continue
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to:
                types[node.output[0]] = to
        elif node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR and not attr.ref_attr_name:
                    types[node.output[0]] = attr.t.data_type
    return types


def _scopes(model: onnx.ModelProto, inferred: onnx.ModelProto) -> Iterator[Scope]:
    graph = model.graph
    opset = _default_opset(model.opset_import)
    types = _value_types(list(inferred.graph.value_info) + list(graph.input) + list(graph.output))
    types.update({t.name: t.data_type for t in graph.initializer})
    types.update(_node_output_types(graph.node))
    io = {v.name for v in graph.input} | {v.name for v in graph.output}
    main = Scope("graph", list(graph.node), opset, _constant_values(graph.node, graph.initializer), types, io)
    yield from _with_subgraphs(main)
    for function in model.functions:
        fn_opset = _default_opset(function.opset_import) or opset
        fn_types = _value_types(getattr(function, "value_info", []))
        fn_types.update(_node_output_types(function.node))
        constants = _constant_values(function.node, [])
        constants.update(_call_constants(function, graph.node))
        yield from _with_subgraphs(Scope(f"function {function.domain}:{function.name}", list(function.node),
                                         fn_opset, constants, fn_types))


def _call_constants(function: onnx.FunctionProto, nodes) -> dict[str, TensorProto]:
    """Body Constants whose value each call passes (ref_attr_name): the largest single value the calls pass, so a
    check on it (TopK's K) holds for every call. Unknown unless every call passes a one-element tensor."""
    calls = [n for n in nodes if (n.domain, n.op_type) == (function.domain, function.name)]
    values = {}
    for node in function.node:
        for attr in node.attribute:
            if node.op_type != "Constant" or attr.name != "value" or not attr.ref_attr_name or not node.output:
                continue
            passed = [a.t for call in calls for a in call.attribute
                      if a.name == attr.ref_attr_name and a.type == onnx.AttributeProto.TENSOR]
            scalars = [_scalar(t) for t in passed]
            if calls and len(passed) == len(calls) and None not in scalars:
                values[node.output[0]] = passed[scalars.index(max(scalars))]
    return values


def _with_subgraphs(scope: Scope) -> Iterator[Scope]:
    yield scope
    for node in scope.nodes:
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                constants = dict(scope.constants)
                constants.update(_constant_values(sub.node, sub.initializer))
                own_types = _value_types(list(sub.value_info) + list(sub.input) + list(sub.output))
                own_types.update({t.name: t.data_type for t in sub.initializer})
                own_types.update(_node_output_types(sub.node))
                types = {**scope.types, **own_types}
                own = set(own_types) | {o for n in sub.node for o in n.output if o}
                label = f"{scope.name}/{node.name or node.op_type}.{attr.name}"
                yield from _with_subgraphs(Scope(label, list(sub.node), scope.opset, constants, types, own=own))


# --- rules -------------------------------------------------------------------------------------------------------


class Linter:
    def __init__(self, model: onnx.ModelProto, version: TrtVersion, model_name: str = "model"):
        self.model = model
        self.version = version
        self.functions = {(f.domain, f.name) for f in model.functions}
        self._op_versions: dict[tuple[str, str, str], tuple[int, int]] = {}
        self.report = LintReport(model_name, f"{version.major}.{version.minor}", _default_opset(model.opset_import))

    def add(self, severity: str, rule: str, node: onnx.NodeProto | None, message: str, scope: str = "graph",
            name: str | None = None) -> None:
        node_name = name if name is not None else (node.name if node is not None else "")
        self.report.findings.append(Finding(severity, rule, node_name, node.op_type if node is not None else "",
                                            message, scope))

    def run(self) -> LintReport:
        self.check_opset()
        self.check_function_names()
        inferred = _infer(self.model)
        for scope in _scopes(self.model, inferred):
            for index, node in enumerate(scope.nodes):
                if not node.name:
                    node = _named_copy(node, f"#{index}")
                self.check_node(scope, node)
            self.check_types(scope)
        return self.report

    # model-level

    def check_opset(self) -> None:
        opset = self.report.opset
        if opset is None:
            return
        high = max_opset(self.version)
        if opset > high:
            self.add(WARNING, "opset", None,
                     f"model opset {opset} is above the range TensorRT {self.report.trt_version} documents "
                     f"({MIN_OPSET}-{high}); ops are imported by name, but behaviour added after opset {high} is "
                     f"unknown to this parser: export with --opset {min(high, 18)} for this target")
        elif opset < MIN_OPSET:
            self.add(WARNING, "opset", None,
                     f"model opset {opset} is below the range TensorRT documents ({MIN_OPSET}-{high}); re-export "
                     f"with a newer opset")

    # per node

    def check_node(self, scope: Scope, node: onnx.NodeProto) -> None:
        if node.domain not in DEFAULT_DOMAINS:
            self.check_custom(scope, node)
            return
        op = node.op_type
        if op != "Attention" or self.version.at_least(10, 14):  # else the attention rule says it all
            self.check_op_version(scope, node)
        if op == "Attention":
            self.check_attention(scope, node)
        elif op in UNSUPPORTED:
            self.add(ERROR, "unsupported-op", node,
                     f"TensorRT's ONNX parser has no importer for {op} (operators.md marks it unsupported); "
                     "rewrite it with supported ops", scope.name)
        elif op not in supported_ops(self.version):
            since = ADDED_IN.get(op)
            hint = (f"it is imported from TensorRT {since[0]}.{since[1]}" if since else
                    "it is not in onnx-tensorrt's operators.md")
            self.add(ERROR, "unsupported-op", node,
                     f"TensorRT {self.report.trt_version}'s ONNX parser has no importer for {op}: {hint}", scope.name)
        if op == "TopK":
            self.check_topk(scope, node)
        elif op in ("ScatterElements", "Scatter"):
            self.check_scatter_elements(scope, node)
        elif op == "ScatterND":
            self.check_scatter_nd(scope, node)

    def check_op_version(self, scope: Scope, node: onnx.NodeProto) -> None:
        if scope.opset is None:
            return
        high = max_opset(self.version)
        try:
            since = onnx.defs.get_schema(node.op_type, scope.opset, "").since_version
        except onnx.defs.SchemaError:
            return
        if since > high:
            self.add_once(WARNING, "op-version", node,
                          f"{node.op_type}-{since} is newer than opset {high}, the newest TensorRT "
                          f"{self.report.trt_version} documents; the parser imports it with older semantics",
                          scope.name)

    def add_once(self, severity: str, rule: str, node: onnx.NodeProto, message: str, scope: str) -> None:
        """One finding per rule, op type and scope: the node column names the first node and how many more."""
        key = (rule, scope, node.op_type)
        if key in self._op_versions:
            index, count = self._op_versions[key]
            first = self.report.findings[index]
            self.report.findings[index] = Finding(first.severity, first.rule,
                                                  first.node.split(" (+")[0] + f" (+{count} more)",
                                                  first.op_type, first.message, first.scope)
            self._op_versions[key] = (index, count + 1)
            return
        self._op_versions[key] = (len(self.report.findings), 1)
        self.add(severity, rule, node, message, scope)

    def check_topk(self, scope: Scope, node: onnx.NodeProto) -> None:
        if _attr(node, "sorted", 1) != 1:
            self.add(ERROR, "topk", node, "TopK needs sorted=1 in TensorRT; drop sorted=0 (ranking by TopK with "
                     "k = N and sorted=1 is how tcexport sorts)", scope.name)
        if scope.opset is not None and scope.opset < 10:
            k = _attr(node, "k", None)
        else:
            k_name = node.input[1] if len(node.input) > 1 else ""
            k = _scalar(scope.constants.get(k_name)) if k_name else None
            if k is None:
                self.add(WARNING, "topk", node,
                         f"K ('{k_name}') is computed at run time; TensorRT needs K < {TOPK_MAX_K}, which cannot "
                         "be checked here: make K a constant", scope.name)
                return
        if k is not None and int(k) >= TOPK_MAX_K:
            self.add(ERROR, "topk", node, f"K = {int(k)}, but TensorRT's TopK needs K < {TOPK_MAX_K}", scope.name)

    def check_scatter_elements(self, scope: Scope, node: onnx.NodeProto) -> None:
        reduction = _attr(node, "reduction", b"none")
        reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
        if reduction == "none":
            return
        indices = scope.types.get(node.input[1]) if len(node.input) > 1 else None
        data = scope.types.get(node.input[0]) if node.input else None
        plugin = ("runs only through libnvinfer_plugin's ScatterElements plugin (the standard plugin library must "
                  "be loaded when building and running; tcexport and trtexec load it)")
        if data in (_T.BFLOAT16, _T.INT8):
            self.add(ERROR, "scatter-reduction", node,
                     f"ScatterElements reduction='{reduction}' {plugin}, which does not support "
                     f"{_type_name(data)} data; use a one-hot MatMul merge instead", scope.name)
        elif indices == _T.INT64:
            self.add(WARNING, "scatter-reduction", node, f"ScatterElements reduction='{reduction}' {plugin}; a "
                     "one-hot assignment MatMul needs no plugin", scope.name)
        elif indices is None:
            self.add(WARNING, "scatter-reduction", node,
                     f"ScatterElements reduction='{reduction}' {plugin}, which takes int64 indices only; the "
                     "indices' type is unknown here: make sure they are int64", scope.name)
        else:
            self.add(ERROR, "scatter-reduction", node,
                     f"ScatterElements reduction='{reduction}' {plugin}, which takes int64 indices only, not "
                     f"{_type_name(indices)}: cast the indices to int64", scope.name)

    def check_scatter_nd(self, scope: Scope, node: onnx.NodeProto) -> None:
        reduction = _attr(node, "reduction", b"none")
        reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
        if reduction != "none":
            self.add(ERROR, "scatternd-reduction", node,
                     f"ScatterND with reduction='{reduction}' is not supported by TensorRT; use ScatterElements "
                     "or a one-hot MatMul", scope.name)

    def check_attention(self, scope: Scope, node: onnx.NodeProto) -> None:
        if not self.version.at_least(10, 14):
            self.add(ERROR, "attention", node,
                     f"the opset-23 Attention op is parsed from TensorRT 10.14 only (target: "
                     f"{self.report.trt_version}); export with --opset 22 or lower so attention is decomposed",
                     scope.name)
            return
        # Restrictions in operators.md (10.15) for Attention.
        unsupported_inputs = {4: "past_key", 5: "past_value", 6: "nonpad_kv_seqlen"}
        unsupported_outputs = {1: "present_key", 2: "present_value", 3: "qk_matmul_output"}
        used = [name for i, name in unsupported_inputs.items() if len(node.input) > i and node.input[i]]
        used += [name for i, name in unsupported_outputs.items() if len(node.output) > i and node.output[i]]
        used += [a for a in ("qk_matmul_output_mode", "softcap") if _attr(node, a, 0)]
        if used:
            self.add(ERROR, "attention", node,
                     f"TensorRT's Attention importer does not support {', '.join(used)}", scope.name)

    def check_custom(self, scope: Scope, node: onnx.NodeProto) -> None:
        key = (node.domain, node.op_type)
        spec = registry.plugin_specs().get(key)
        if key in self.functions:
            self.check_function_call(scope, node, spec)
            return
        if node.domain == "ai.onnx.ml":
            self.add(ERROR, "unsupported-op", node, f"ONNX-ML op {node.op_type} has no TensorRT importer",
                     scope.name)
            return
        if spec is None:
            self.add(ERROR, "custom-op", node,
                     f"custom op {node.domain}:{node.op_type} is neither a model-local function nor a known plugin; "
                     "TensorRT would need a plugin registered under that name", scope.name)
            return
        self.check_plugin_fields(scope, node, spec)
        kinds = trt_versions.plugin_kinds(self.version, spec, with_mask=len(node.input) > 3)
        if not kinds:
            self.add(ERROR, "custom-op", node,
                     f"no tcexport plugin that TensorRT {self.report.trt_version} can run implements {node.op_type}"
                     f"{' with a mask' if len(node.input) > 3 else ''} (C++ IPluginV3: 10.0+; Python plugins: 10.6+, "
                     "ahead of time 10.9+, without a mask): use plain-ONNX mode (--impl subgraph or function)",
                     scope.name)
        elif not trt_versions.reads_plugin_namespace_from_domain(self.version) and _attr(
                node, "plugin_namespace", None) is None:
            self.add(ERROR, "custom-op", node,
                     f"before TensorRT 10.10 the parser ignores the node domain: add plugin_namespace="
                     f"'{spec.namespace}' (and plugin_version='{spec.version}') to {node.op_type}", scope.name)
        else:
            python = [k for k in kinds if k != trt_versions.CPP_PLUGIN]
            note = ""
            if not python:
                note = (" (tcexport's Python plugins take no mask)" if len(node.input) > 3 and
                        trt_versions.supports_python_plugins(self.version) else
                        " (no Python plugins here: they need 10.6, ahead of time 10.9)")
            self.add(WARNING, "custom-op", node,
                     f"{node.op_type} runs as tcexport's plugin {spec.namespace}::{spec.name} v{spec.version}, which "
                     f"must be loaded when building and running the engine (tcexport build --plugins); TensorRT "
                     f"{self.report.trt_version} can run it as: {', '.join(kinds)}{note}", scope.name)
            if trt_versions.PYTHON_AOT_PLUGIN in kinds and spec.python_aot and _attr(node, "aot", None) is None:
                self.add(WARNING, "custom-op", node,
                         f"{node.op_type} has no 'aot' attribute: with tcexport's Python plugins (JIT and AOT) "
                         "loaded, the parser needs it (or a PREFER_AOT/PREFER_JIT network flag) to pick one",
                         scope.name)

    def check_plugin_fields(self, scope: Scope, node: onnx.NodeProto, spec) -> None:
        """The parser passes only the fields the creator declares, an ONNX INT attribute as an INT32 field; an
        INT64 tensor attribute is rejected (onnx-tensorrt's plugin field loading)."""
        attributes = {a.name: a for a in node.attribute}
        for name in spec.fields:
            attr = attributes.get(name)
            if attr is None:
                self.add(ERROR, "custom-op", node, f"{node.op_type} lacks the plugin field '{name}' (an INT "
                         "attribute): the plugin would be created without it", scope.name)
            elif attr.type != onnx.AttributeProto.INT:
                kind = onnx.AttributeProto.AttributeType.Name(attr.type)
                self.add(ERROR, "custom-op", node, f"{node.op_type} carries plugin field '{name}' as {kind}: "
                         "TensorRT's parser passes plugin fields from INT attributes (as INT32) and rejects INT64 "
                         "tensors; write it as an INT attribute", scope.name)
            elif not -2**31 <= attr.i < 2**31:
                self.add(ERROR, "custom-op", node, f"{node.op_type} field '{name}' = {attr.i} does not fit the "
                         "INT32 field the parser makes of it", scope.name)

    # model-local functions. What TensorRT's ONNX parser does with them (onnx-tensorrt ModelImporter.cpp and
    # onnxOpImporters.cpp LocalFunctionImporter; docs/Changelog.md): it imports model-local functions since 9.0 EA
    # ("Added support for ONNX local functions") by inlining their bodies, so 10.3 (JetPack 6) builds them as plain
    # ONNX ops. importLocalFunctions keys them by FunctionProto.name alone (domain and overload ignored; of two
    # functions with one name the first wins), and a built-in importer of that name is tried before them.
    # 10.7 ("Now prioritizes using plugins over local functions when a corresponding plugin is available in the
    # registry") looks the node up as a plugin first (isNodeInPluginRegistry: op_type, and the plugin_version and
    # plugin_namespace ATTRIBUTES, defaults "1" and "" -- the node domain is not consulted there); from 10.15 only
    # when the node has a plugin_namespace attribute or the parser flag kENABLE_PLUGIN_OVERRIDE is set.

    def check_function_names(self) -> None:
        by_name: dict[str, list[str]] = {}
        for f in self.model.functions:
            by_name.setdefault(f.name, []).append(f"{f.domain}:{f.name}" + (f":{f.overload}" if f.overload else ""))
        for name, found in by_name.items():
            if len(found) > 1:
                self.add(ERROR, "custom-op", None,
                         f"model-local functions {', '.join(found)} share the name '{name}': TensorRT keys local "
                         "functions by name only, so every call would run the first one's body; rename them")
            elif name in supported_ops(self.version):
                self.add(ERROR, "custom-op", None,
                         f"model-local function {found[0]} has the name of the built-in op {name}: TensorRT's "
                         "parser imports such calls as the built-in op and never reads the body; rename it")

    def check_function_call(self, scope: Scope, node: onnx.NodeProto, spec) -> None:
        if spec is None:
            return  # inlined by the parser; its body is checked as a scope of its own
        name = f"{spec.namespace}::{spec.name} v{spec.version}"
        if not trt_versions.prefers_plugin_over_local_function(self.version):
            message = (f"{node.op_type} is a model-local function: TensorRT {self.report.trt_version} inlines its "
                       "body, so the op runs as the standard ONNX ops --impl subgraph would emit (plain-ONNX mode); "
                       f"tcexport's plugin {name} can replace local functions only from TensorRT 10.7")
        elif _attr(node, "plugin_namespace", None) is None:
            message = (f"{node.op_type} is a model-local function without a plugin_namespace attribute: TensorRT "
                       f"inlines its body; the plugin {name} replaces it only with plugin_namespace="
                       f"'{spec.namespace}' on the node (the check reads that attribute, not the node domain)")
        else:
            message = (f"{node.op_type} runs as tcexport's plugin {name} when that plugin is registered at build "
                       f"time (TensorRT {self.report.trt_version} prefers it over the model-local function); "
                       "otherwise TensorRT inlines the function body (standard ONNX ops)")
        self.add_once(WARNING, "custom-op", node, message, scope.name)

    # types

    def check_types(self, scope: Scope) -> None:
        producers = {}
        for index, node in enumerate(scope.nodes):
            for output in node.output:
                producers[output] = node if node.name else _named_copy(node, f"#{index}")
        for name, elem_type in sorted(scope.types.items()):
            if scope.own is not None and name not in scope.own:
                continue  # an outer scope's tensor, reported there
            problem = self.type_problem(elem_type, internal=name not in scope.io)
            if problem is None:
                continue
            severity, text = problem
            node = producers.get(name)
            where = "graph input/output" if name in scope.io else "initializer" if node is None else ""
            label = f"tensor '{name}'" + (f" ({where})" if where else "")
            self.add(severity, "dtype", node, f"{label} is {_type_name(elem_type)}: {text}", scope.name,
                     name=None if node is not None else name)

    def type_problem(self, elem_type: int, internal: bool) -> tuple[str, str] | None:
        if elem_type in NATIVE_TYPES:
            return None
        if elem_type == _T.DOUBLE:
            return WARNING, "TensorRT casts DOUBLE down to FLOAT, clamping to +-FLT_MAX; export in float32"
        if elem_type == _T.UINT8:
            return None if not internal else (ERROR, "TensorRT takes UINT8 only as a network input or output")
        if elem_type in QUANTIZED_TYPES:
            since = QUANTIZED_TYPES[elem_type]
            if not self.version.at_least(*since):
                return ERROR, f"supported from TensorRT {since[0]}.{since[1]}"
            return WARNING, "a quantized type: TensorRT supports it only in Q/DQ (explicit quantization) patterns"
        return ERROR, "not a TensorRT data type"


# --- entry points ------------------------------------------------------------------------------------------------


def lint_model(model: onnx.ModelProto, trt_version: str | TrtVersion, model_name: str = "model") -> LintReport:
    return Linter(model, trt_versions.parse_version(trt_version), model_name).run()


def lint_file(path: str | Path, trt_version: str | TrtVersion) -> LintReport:
    version = trt_versions.parse_version(trt_version)  # a bad version is a usage error before the file is read
    model = onnxfile.load(path, load_external_data=False)
    return lint_model(model, version, str(path))


def print_report(report: LintReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if report.findings:
        table = Table(title=f"TensorRT {report.trt_version} lint: {report.model}", title_justify="left")
        for column in ("severity", "rule", "node", "op", "message"):
            table.add_column(column, overflow="fold")
        for f in sorted(report.findings, key=lambda f: (f.severity != ERROR, f.scope != "graph", f.rule)):
            style = "bold red" if f.severity == ERROR else "yellow"
            node = f.node if f.scope == "graph" else f"{f.scope} / {f.node}"
            table.add_row(f"[{style}]{f.severity}[/{style}]", f.rule, node, f.op_type, f.message)
        console.print(table)
    console.print(("[green]clean:[/green] " if not report.findings else "") + report.summary())


def print_json(report: LintReport) -> None:
    import click

    click.echo(json.dumps(report.to_json(), indent=2))


def raise_on_errors(report: LintReport) -> None:
    if not report.ok:
        raise ValidationFailed(report.summary(), report.to_json())


# --- small helpers -----------------------------------------------------------------------------------------------


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - inference is a help, not a requirement (too large, unknown ops, ...)
        return model


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _scalar(tensor: TensorProto | None):
    if tensor is None or (tensor.data_location == TensorProto.EXTERNAL):
        return None
    try:
        values = np.asarray(numpy_helper.to_array(tensor)).reshape(-1)
    except Exception:  # noqa: BLE001
        return None
    return values[0].item() if values.size == 1 else None


def _type_name(elem_type: int | None) -> str:
    if elem_type is None:
        return "unknown"
    try:
        return TensorProto.DataType.Name(elem_type)
    except ValueError:
        return str(elem_type)


def _named_copy(node: onnx.NodeProto, name: str) -> onnx.NodeProto:
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    clone.name = name
    return clone
