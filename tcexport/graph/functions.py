"""--impl function: package each inserted method stage as one call to a model-local ONNX function.

graph/insert.py emits every method stage as plain ONNX nodes tagged `node.meta["tcexport_stage"] = (block,
method)`. package_methods() replaces the nodes of each stage by ONE node

    tc_blk{b}_tome = tcexport::ToMeMerge(x, metric, size[, mask]) -> (tc_blk{b}_tome_x_out,
                                                                      tc_blk{b}_tome_size_out[, ..._mask_out])

calling a function of the same name kept in the model (domain "tcexport", version 1; the function imports the
model's default opset). Other methods likewise: topk -> TokenPrune, pool -> TokenPool (the names of tcexport's
methods' plugin specs, methods/plugin.py), any other -> Token<Name>. Formal inputs follow the method contract: x, what
the method needs (metric, signals such as cls_attention), size, mask when there is one. What feeds the method
(the metric's ReduceMean/Transpose `tc_blk{b}/metric`, signals) stays in the main graph, and the call node keeps
the stage's name and its output names, so `tcexport validate` still finds each stage's sizes.

Design: ONE function per method, with attributes -- not one function per (n_in, r, protected) signature.
----------------------------------------------------------------------------------------------------------
What decides it is how TensorRT's ONNX parser (onnx-tensorrt ModelImporter.cpp, parseNode and
importLocalFunctions) treats a call node:
  * local functions are looked up by FunctionProto.name ALONE (a map keyed by name: domain and `overload` are
    ignored, and of two functions with one name the first wins), and a name that is a built-in op never
    reaches them;
  * a plugin is looked up by the node's op_type plus its `plugin_version` / `plugin_namespace` attributes
    (defaults "1" and ""; the check against a local function does not read the node domain): 10.7-10.14 use
    a registered plugin instead of a local function of the same name; from 10.15 only when the node has a
    `plugin_namespace` attribute (or the parser flag kENABLE_PLUGIN_OVERRIDE is set);
  * a plugin receives only the attributes its creator declares (loadFields iterates the creator's field
    names), so further node attributes are invisible to it.
Per-signature functions would need a distinct op_type per block (ToMeMerge_n197_r8, ...; overloads are
ignored, so a shared name would inline the first body everywhere), hence a plugin registration per signature.
One function "ToMeMerge" lets one plugin `tcexport::ToMeMerge` v1 with two static attributes serve every block:
its output shape follows from the input shapes and r, which is all a TensorRT plugin needs.

The body stays the method's own ONNX builder output (methods/tome.py build_onnx, static in N): the stages of a
model have the same nodes and differ only in Constant values (token indices, K of TopK, slice ends...). Those
Constant values that differ between the model's stages become tensor attributes of the function (the body
reads them with ref_attr_name, which ONNX Runtime and TensorRT's function importer both resolve) named
`const_<label>`, and each call passes its own. So inlining a call reproduces the --impl subgraph nodes exactly.
Every call node carries:
    r                 int: tokens this block removes (tokens in - tokens out, from the inferred shapes)
    protected         int: leading tokens never merged, as the stage was built (graph/insert.py records it)
    plugin_namespace  "tcexport", plugin_version "1" (what the parser needs to pick the plugin, see above)
    const_*           tensors the body needs; a plugin does not declare them, so the parser never passes them
If the stages of one method ever differed in structure (not the case for ToMe within a model), each variant
would get its own function, named <op_type>_2, ...; only the first matches the plugin name.

A method's plugin attributes come from its own spec (Method.plugin and Method.plugin_fields); a method that names
no plugin gets op type Token<Name> and its calls carry plugin_namespace, plugin_version and const_* tensors only.

Names: the body's nodes and values are the stage's with the block taken out (`tc_blk3_tome/scores` ->
`tome/scores`); formal inputs are `tome_x`, `tome_metric`, `tome_size`, `tome_mask`: distinct from main-graph
names, since TensorRT's function importer skips binding a formal input whose name already exists outside.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from tcexport import methods
from tcexport.core.errors import UsageError
from tcexport.methods import registry
from tcexport.methods.plugin import PLUGIN_DOMAIN, plugin_choice_attributes, plugin_node_attributes

DOMAIN = PLUGIN_DOMAIN  # "tcexport": the function domain is the plugin namespace
DOMAIN_VERSION = 1
ARGS_KEY = "tcexport_stage_args"  # set by graph/insert.py: params, n_in, protected of the stage
STAGE_KEY = "tcexport_stage"  # node.meta key set by graph/insert.py
CONST_PREFIX = "const_"
OUTPUT_ROLES = ("x", "size", "mask")
# Producers of a stage's inputs, as graph/insert.py names them: the first size and mask, and per block what a
# method asks for (Method.needs): tc_blk{b}/metric (head-averaged keys) and signals like tc_blk{b}/cls_attention.
SIZE0_NODE, MASK0_NODE = "tc/size0", "tc/mask0"


def _role_order(role: str) -> tuple[int, str]:
    """Formal inputs in the method contract's order: x, metric, signals (by name), size, mask."""
    return ({"x": 0, "metric": 1, "size": 3, "mask": 4}.get(role, 2), role)


def _stage_method(stage: _Stage):
    """The stage's Method rebuilt from its recorded parameters, and its protected count."""
    args = stage.nodes[0].meta.get(ARGS_KEY)
    if args is None:
        raise _internal(f"the {stage.method} stage at block {stage.block} carries no build arguments")
    return methods.get(stage.method)(**args["params"]), int(args["protected"])


def op_type(method: str) -> str:
    """The call node's op_type (and function name) for a method: its plugin's name, else Token<Name>."""
    return registry.op_type(method)


def _has_plugin_fields(method: str) -> bool:
    spec = methods.get(method).plugin
    return spec is not None and bool(spec.fields)


def _implemented_plugins() -> list[str]:
    """Methods with a TensorRT plugin implementation (plugins/cpp, tcexport/plugins): what --impl plugin emits."""
    return sorted(name for name, cls in methods.METHODS.items() if cls.plugin is not None and cls.plugin.implemented)


@dataclass
class _Stage:
    block: int
    method: str
    nodes: list[ir.Node]  # graph order
    labels: dict[ir.Node, str]  # node -> name without the stage prefix ('scores')
    inputs: dict[str, ir.Value]  # role -> value outside the stage
    outputs: dict[str, ir.Value]  # role -> value used outside the stage
    constants: dict[str, np.ndarray] = field(default_factory=dict)  # label -> value of each Constant node

    @property
    def prefix(self) -> str:
        return f"tc_blk{self.block}_{self.method}"

    @property
    def in_roles(self) -> list[str]:
        return sorted(self.inputs, key=_role_order)

    @property
    def out_roles(self) -> list[str]:
        return [r for r in OUTPUT_ROLES if r in self.outputs]


def package_methods(model: ir.Model, with_body: bool = True) -> None:
    """Replace every tagged method stage of `model.graph` by a call to a model-local function (in place).

    with_body=False (--impl plugin): the same call nodes, but no function: only a TensorRT plugin can run them.
    """
    graph = model.graph
    stages = _stages(graph)
    if not stages:
        return
    if not with_body:
        _package_as_plugins(model, stages)
        return
    if any(_has_plugin_fields(stage.method) for stage in stages):
        # Token counts for the plugin attributes (insert.py dropped the stale shapes; infer them afresh).
        ir.passes.common.ShapeInferencePass(data_prop=True)(model)
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx"))
    groups: dict[tuple, list[_Stage]] = {}
    for stage in stages:
        groups.setdefault((stage.method, _structure(stage)), []).append(stage)
    taken: dict[str, int] = {}
    replaced: dict[ir.Value, ir.Value] = {}  # a stage's outputs -> the call's (later stages read them)
    for (method, _), members in groups.items():
        name = op_type(method)
        taken[name] = taken.get(name, 0) + 1
        if taken[name] > 1:
            name = f"{name}_{taken[name]}"
        for stage in members:  # inputs from stages already packaged (another method) now come from their calls
            stage.inputs = {role: replaced.get(value, value) for role, value in stage.inputs.items()}
        lifted = _lifted(members)
        plugin = [_plugin_attributes(stage) for stage in members]
        function = _function(members[0], name, lifted, list(plugin[0]), opset)
        model.functions[function.identifier()] = function
        for stage, attributes in zip(members, plugin):
            _replace_by_call(graph, stage, name, lifted, attributes, replaced)
    graph.opset_imports[DOMAIN] = DOMAIN_VERSION
    graph.sort()


def _package_as_plugins(model: ir.Model, stages: list[_Stage]) -> None:
    implemented = _implemented_plugins()
    without = sorted({stage.method for stage in stages if stage.method not in implemented})
    if without:
        raise UsageError(f"--impl plugin: no TensorRT plugin implements {', '.join(without)} (plugins exist for "
                         f"{', '.join(implemented)}); use --impl function or --impl subgraph")
    ir.passes.common.ShapeInferencePass(data_prop=True)(model)
    replaced: dict[ir.Value, ir.Value] = {}
    for stage in stages:
        _replace_by_call(model.graph, stage, op_type(stage.method), [], _plugin_attributes(stage), replaced)
    model.graph.opset_imports[DOMAIN] = DOMAIN_VERSION
    model.graph.sort()


def plugin_only_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Main-graph nodes of tcexport's domain with no model-local function behind them (--impl plugin)."""
    local = {(f.domain, f.name) for f in model.functions}
    return [n for n in model.graph.node if n.domain == DOMAIN and (n.domain, n.op_type) not in local]


def refuse_plugin_only(model: onnx.ModelProto, where: str | object) -> None:
    """UsageError when `model` needs TensorRT plugins: ONNX Runtime has no kernel for them."""
    nodes = plugin_only_nodes(model)
    if nodes:
        ops = ", ".join(sorted({f"{DOMAIN}::{n.op_type}" for n in nodes}))
        raise UsageError(f"{where} holds TensorRT plugin nodes ({ops}, --impl plugin) that ONNX Runtime cannot run; "
                         "build it with --backend trt, or compress with --impl function for a graph both run")


# ---------------------------------------------------------------- finding the stages


def _stages(graph: ir.Graph) -> list[_Stage]:
    tagged: dict[tuple[int, str], list[ir.Node]] = {}
    for node in graph:
        key = node.meta.get(STAGE_KEY)
        if key is not None:
            tagged.setdefault(tuple(key), []).append(node)
    stages: list[_Stage] = []
    previous: dict[str, ir.Value] = {}
    for block, method in sorted(tagged):
        stage = _stage(graph, block, method, tagged[(block, method)], previous)
        previous = stage.outputs
        stages.append(stage)
    return stages


def _stage(graph: ir.Graph, block: int, method: str, nodes: list[ir.Node], previous: dict[str, ir.Value]) -> _Stage:
    prefix = f"tc_blk{block}_{method}"
    members = set(nodes)
    labels = {}
    for node in nodes:
        if not (node.name or "").startswith(prefix + "/"):
            raise _internal(f"node '{node.name}' of the {method} stage at block {block} is not named {prefix}/...")
        labels[node] = node.name[len(prefix) + 1:]
    if len(set(labels.values())) != len(labels):
        raise _internal(f"the {method} stage at block {block} has two nodes of one name")
    produced = {out for node in nodes for out in node.outputs}
    external = list(dict.fromkeys(v for node in nodes for v in node.inputs if v is not None and v not in produced))
    graph_outputs = set(graph.outputs)
    used_outside = [out for node in nodes for out in node.outputs
                    if out in graph_outputs or any(user not in members for user, _ in out.uses())]

    # The outputs by the names the method's builder gives them (an output may be unused: the last size).
    outputs = {}
    for role in OUTPUT_ROLES:
        found = [v for v in produced if v.name == f"{prefix}_{role}_out"]
        if found:
            outputs[role] = found[0]
    if not set(used_outside) <= set(outputs.values()) or "x" not in outputs or "size" not in outputs:
        raise _internal(f"the {method} stage at block {block} is used outside through "
                        f"{sorted(v.name for v in used_outside)}, expected {prefix}_x_out, _size_out (, _mask_out)")

    def produced_by(value: ir.Value, name: str) -> bool:
        producer = value.producer()
        return producer is not None and producer.name == name

    inputs = {}
    for value in external:
        producer = value.producer()
        per_block = (producer.name or "") if producer is not None else ""
        if value is previous.get("size") or produced_by(value, SIZE0_NODE):
            role = "size"
        elif value is previous.get("mask") or produced_by(value, MASK0_NODE):
            role = "mask"
        elif per_block.startswith(f"tc_blk{block}/") and per_block.count("/") == 1:
            role = per_block.split("/")[1]  # metric, cls_attention, ...
        else:
            role = "x"
        if role in inputs:
            raise _internal(f"the {method} stage at block {block} reads two values as its {role}: "
                            f"'{inputs[role].name}' and '{value.name}'")
        inputs[role] = value
    if not {"x", "size"} <= set(inputs) or ("mask" in inputs) != ("mask" in outputs):
        raise _internal(f"the {method} stage at block {block} reads {sorted(inputs)}, expected x, size, what "
                        "the method needs (metric, signals) and mask when it returns one")
    stage = _Stage(block, method, nodes, labels, inputs, outputs)
    for node in nodes:
        if node.op_type == "Constant" and node.domain == "":
            value = node.attributes.get("value")
            if value is None or value.type != ir.AttributeType.TENSOR:
                raise _internal(f"Constant '{node.name}' does not hold a tensor 'value'")
            stage.constants[labels[node]] = value.as_tensor().numpy()
    return stage


def _tokens(value: ir.Value) -> int | None:
    shape = value.shape
    return shape[1] if shape is not None and len(shape) == 3 and isinstance(shape[1], int) else None


def _internal(message: str) -> UsageError:
    return UsageError(f"--impl function: {message}; please report this to tcexport (--impl subgraph works)")


# ---------------------------------------------------------------- one body for many stages


def _structure(stage: _Stage) -> tuple:
    """Everything about the stage's nodes except the values of its Constants (their dtype counts)."""
    roles = {value: role for role, value in stage.inputs.items()}
    items = []
    for node in stage.nodes:
        wiring = []
        for value in node.inputs:
            if value is None:
                wiring.append(None)
            elif value in roles:
                wiring.append(("input", roles[value]))
            else:
                producer = value.producer()
                wiring.append(("node", stage.labels[producer], list(producer.outputs).index(value)))
        if node.op_type == "Constant" and node.domain == "":
            attrs: tuple = ("value", str(stage.constants[stage.labels[node]].dtype))
        else:
            attrs = tuple(sorted((name, ir.serde.serialize_attribute(attr).SerializeToString())
                                 for name, attr in node.attributes.items()))
        items.append((stage.labels[node], node.domain, node.op_type, node.overload, tuple(wiring), attrs,
                      len(node.outputs)))
    out_labels = tuple((role, stage.labels[value.producer()]) for role, value in stage.outputs.items())
    return tuple(sorted(items, key=repr)) + (out_labels,)


def _lifted(members: list[_Stage]) -> list[str]:
    """Labels of the Constants whose values differ between the stages: they become function attributes."""
    first = members[0].constants
    lifted = []
    for label, value in first.items():
        for other in members[1:]:
            theirs = other.constants[label]
            if theirs.shape != value.shape or not np.array_equal(theirs, value):
                lifted.append(label)
                break
    return lifted


def _local(name: str | None, block: int) -> str | None:
    """'tc_blk3_tome/scores' -> 'tome/scores'; 'tc_blk3_tome_scores' -> 'tome_scores'."""
    head = f"tc_blk{block}_"
    return name[len(head):] if name and name.startswith(head) else name


def _function(stage: _Stage, name: str, lifted: list[str], plugin: list[str], opset: int | None) -> ir.Function:
    formals = {role: ir.Value(name=f"{stage.method}_{role}") for role in stage.in_roles}
    mapping: dict[ir.Value, ir.Value] = {stage.inputs[role]: formal for role, formal in formals.items()}
    body = []
    for node in stage.nodes:
        label = stage.labels[node]
        if node.op_type == "Constant" and node.domain == "" and label in lifted:
            attributes = [ir.RefAttr("value", CONST_PREFIX + label, ir.AttributeType.TENSOR)]
        else:
            attributes = list(node.attributes.values())
        clone = ir.Node(node.domain, node.op_type, [None if v is None else mapping[v] for v in node.inputs],
                        attributes=attributes, overload=node.overload, num_outputs=len(node.outputs),
                        version=node.version, name=_local(node.name, stage.block))
        for original, copy in zip(node.outputs, clone.outputs):
            copy.name = _local(original.name, stage.block)
            mapping[original] = copy
        body.append(clone)
    outputs = [mapping[stage.outputs[role]] for role in stage.out_roles]
    names = [v.name for v in formals.values()] + [out.name for node in body for out in node.outputs]
    if len(set(names)) != len(names):
        raise _internal(f"the {stage.method} body would reuse a value name")
    function_graph = ir.Graph(list(formals.values()), outputs, nodes=body,
                              opset_imports={"": opset if opset is not None else 18}, name=name)
    # Declared without defaults (the call passes each); the body reads only the const_* ones.
    declared = [ir.Attr(key, ir.AttributeType.INT, None) for key in plugin]
    declared += [ir.Attr(key, ir.AttributeType.STRING, None) for key in ("plugin_namespace", "plugin_version")]
    declared += [ir.Attr(key, ir.AttributeType.INT, None)
                 for key in plugin_choice_attributes(registry.plugin_spec(name))]
    declared += [ir.Attr(CONST_PREFIX + label, ir.AttributeType.TENSOR, None) for label in lifted]
    function = ir.Function(DOMAIN, name, graph=function_graph, attributes=declared)
    function.doc_string = (f"tcexport method '{stage.method}' (inputs {', '.join(stage.in_roles)}; outputs "
                           f"{', '.join(stage.out_roles)}), the nodes --impl subgraph emits; const_* attributes "
                           "carry each block's static token indices. A TensorRT plugin of the same name "
                           f"({DOMAIN}::{name}) can stand in for it.")
    return function


def _plugin_attributes(stage: _Stage) -> dict[str, int]:
    if not _has_plugin_fields(stage.method):
        return {}
    n_in, n_out = _tokens(stage.inputs["x"]), _tokens(stage.outputs["x"])
    if n_in is None or n_out is None:
        raise _internal(f"the token counts around the {stage.method} stage at block {stage.block} are unknown")
    method, protected = _stage_method(stage)
    return method.plugin_fields(n_in, n_out, protected)


def _replace_by_call(graph: ir.Graph, stage: _Stage, name: str, lifted: list[str], plugin: dict[str, int],
                     replaced: dict[ir.Value, ir.Value]) -> None:
    attributes: list[ir.Attr] = [ir.AttrInt64(k, v) for k, v in plugin.items()]
    spec = registry.plugin_spec(name)
    attributes += [ir.AttrString(k, v) for k, v in plugin_node_attributes(spec).items()]
    attributes += [ir.AttrInt64(k, v) for k, v in plugin_choice_attributes(spec).items()]
    attributes += [ir.AttrTensor(CONST_PREFIX + label, ir.tensor(stage.constants[label], name=CONST_PREFIX + label))
                   for label in lifted]
    inputs = [replaced.get(stage.inputs[role], stage.inputs[role]) for role in stage.in_roles]
    call = ir.Node(DOMAIN, name, inputs, attributes=attributes,
                   num_outputs=len(stage.out_roles), name=stage.prefix)
    graph.insert_before(stage.nodes[0], call)
    for role, new in zip(stage.out_roles, call.outputs):
        old = stage.outputs[role]
        value_name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = f"{value_name}__packaged"
        new.name = value_name
        new.type, new.shape = old.type, old.shape
        replaced[old] = new
    graph.remove(stage.nodes, safe=True)
