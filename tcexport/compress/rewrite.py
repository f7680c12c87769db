"""`tcexport compress`: rewrite the graph by a plan, check it, record what was done."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from tcexport import methods
from tcexport.compress import decoder
from tcexport.compress.plan import IMPLS, Plan, default_protected, plan_method, plan_stages
from tcexport.core import metadata, onnxfile
from tcexport.core.atomic import check_writable
from tcexport.core.errors import UsageError
from tcexport.graph import attention, functions, hygiene, masks, opset, probe
from tcexport.graph import blocks as blocks_mod
from tcexport.graph.insert import insert_stages
from tcexport.models import inputs as inputs_mod
from tcexport.reference import coverage
from tcexport.reference import pooling as st_pooling


def mask_input(graph: ir.Graph, model: onnx.ModelProto) -> ir.Value | None:
    names = {s.name for s in inputs_mod.specs_from_graph(model) if s.kind == inputs_mod.ATTENTION_MASK}
    found = [v for v in graph.inputs if v.name in names]
    return found[0] if found else None


def compress_model(model: onnx.ModelProto, plan: Plan, strict_caps: bool = True,
                   shapes: dict | None = None) -> tuple[onnx.ModelProto, list[dict]]:
    """Return the rewritten model and its token schedule. `shapes`: the probe's, when the caller has them."""
    model = attention.decompose_attention(model)  # opset 23: blocks are found on each attention's Softmax
    if shapes is None:
        shapes = probe.concrete_shapes(model)
    ir_model = ir.from_proto(model)
    graph = ir_model.graph
    found = blocks_mod.find_blocks(graph, shapes)
    if plan.stages and max(s.block for s in plan.stages) >= len(found):
        raise UsageError(f"layer {max(s.block for s in plan.stages)} is beyond the model's {len(found)} blocks")
    if strict_caps and plan.schedule == "constant":
        _check_caps(plan, found, shapes)
    # Masks that say who sees whom (causal, sliding window): refused, or kept over the tokens' original positions.
    structures = masks.find(model, found)
    masks.refuse_unkept(structures, [s.block for s in plan.stages])
    original_inputs = {v.name for v in graph.inputs}
    schedule = insert_stages(graph, found, plan.stages, plan.protected, shapes, prop_attn=plan.prop_attn,
                             mask_input=mask_input(graph, model),
                             pool_attentions=blocks_mod.find_pool_attentions(graph, shapes),
                             windows={i: s for i, s in structures.items() if s.kept})
    # Inputs a method added (query: [batch, C]); validate feeds them, so the record lists them.
    extra_inputs = [_input_spec(v).to_json() for v in graph.inputs if v.name not in original_inputs]
    # The methods emit opset-18 forms; write them as the model's opset defines (function bodies copy them).
    opset.legalize(ir_model)
    _annotate_shapes(ir_model)
    if plan.impl in ("function", "plugin"):
        functions.package_methods(ir_model, with_body=plan.impl == "function")
    hygiene.remove_unused(ir_model)  # leftovers of the rewrite (ONNX Runtime warns about unused initializers)
    proto = ir.to_proto(ir_model)
    proto = _infer_and_check(proto)
    record = plan.record()
    if extra_inputs:
        record["extra_inputs"] = extra_inputs
    metadata.write(proto, metadata.COMPRESSION, record)
    metadata.write(proto, metadata.TOKENS, schedule)
    return proto, schedule


def _input_spec(value: ir.Value) -> inputs_mod.InputSpec:
    dims = [d if isinstance(d, int) else str(d.value) for d in value.shape]
    dtype = value.dtype.numpy().name
    return inputs_mod.InputSpec(value.name, dims, dtype, inputs_mod.guess_kind(value.name, dtype))


def _check_caps(plan: Plan, found, shapes) -> None:
    """Reject requests no block could satisfy: more than the uncompressed token count allows.

    Later blocks hold fewer tokens; there r is capped at (N - protected) // 2 as in ToMe, and the recorded
    token schedule shows what each block really removes.
    """
    count = shapes[found[0].hidden.name][1]
    for stage in plan.stages:
        try:
            stage.method.check_fits(count, plan.protected)
        except UsageError as exc:
            raise UsageError(f"layer {stage.block}: {exc}") from None


def _annotate_shapes(ir_model: ir.Model) -> None:
    """Give every value the rewrite left without a shape its dtype and dims from two runs of the rewritten graph.

    The rewrite drops the exporter's shapes (they hold the old token counts) for shape inference to redo, but
    inference cannot follow every value: Range(0, Shape(input_ids)[0]) in a transformers attention mask gets a
    fresh symbol (unk__0) for what was the batch, and that symbol reaches every block's logits through the mask
    bias, so no MatMul behind it has a shape at any batch. From the runs, a dim is static, the batch symbol, or
    left open (batch x heads); graph outputs keep their declared shapes."""
    graph = ir_model.graph
    types = probe.static_types(ir.to_proto(ir_model))
    outputs = set(graph.outputs)
    for node in graph:
        for value in node.outputs:
            if value in outputs or value.name not in types:
                continue
            elem_type, dims = types[value.name]
            value.dtype = ir.DataType(elem_type)
            value.shape = ir.Shape(dims)


def _infer_and_check(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(inferred)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise UsageError(f"the rewritten graph does not pass the ONNX checker ({first}); please report this "
                         "model to tcexport") from None
    return inferred


def compress_file(input_path: Path, output: Path, method: str = "tome", r: str | None = None, layers: str = "all",
                  schedule: str = "constant", prop_attn: bool = True, impl: str = "subgraph",
                  protected: int | None = None, params: dict | None = None,
                  stages: list[str] | None = None) -> list[dict]:
    """Compress IN.onnx into OUTPUT. One method (method, r/params, layers, schedule) or several (`stages`)."""
    output = Path(output)
    if output.suffix != ".onnx":
        raise UsageError(f"output {output} must end with .onnx")
    check_writable(output, "-o")
    if impl not in IMPLS:
        raise UsageError(f"--impl must be one of {', '.join(IMPLS)}; got '{impl}'")
    if not stages:
        methods.get(method)  # unknown method -> clear error before any work
    model = onnxfile.load(input_path)
    if metadata.read(model, metadata.COMPRESSION):
        raise UsageError(f"{input_path} is already compressed; compress the uncompressed export instead")
    if decoder.is_decoder(model):
        return decoder.compress(model, input_path, output, method, layers, dict(params or {}, **(
            {"r": r} if r is not None else {})), list(stages or []), impl)
    model = attention.decompose_attention(model)
    shapes = probe.concrete_shapes(model)
    depth = len(blocks_mod.find_blocks(ir.from_proto(model).graph, shapes))
    if stages:
        planned = plan_stages(depth, stages)
        request = {"stages": list(stages)}
    else:
        planned = plan_method(method, depth, layers, params, r, schedule)
        request = {"r": r, "layers": layers, "schedule": schedule, **({"params": params} if params else {})}
    for stage in planned:
        if getattr(stage.method, "applies_to", "encoder") == "decoder":
            raise UsageError(f"{stage.method.name} acts on the prompt or cache of a causal LM; this graph is an "
                             "encoder (export a causal LM with 'tcexport export hf:DIR' to use it)")
    if protected is None:
        protected = default_protected(model)
    names = list(dict.fromkeys(s.method.name for s in planned))
    plan = Plan("+".join(names), planned, protected, prop_attn, impl, schedule, request)
    source = metadata.read(model, metadata.SOURCE) or {}  # a pipeline's pooling it cannot keep: refused here
    st_pooling.refuse_unsupported(source.get("info") or {}, source.get("spec", str(input_path)),
                                  [s.method for s in planned])
    compressed, schedule_out = compress_model(model, plan, shapes=shapes)
    coverage.check(metadata.read(model, metadata.SOURCE), {s.block: s.method for s in planned}, prop_attn,
                   protected, schedule_out, metadata.read(compressed, metadata.COMPRESSION).get("extra_inputs", []))
    # Keep the provenance: validate rebuilds the reference from it. Weights in a .data file stay in one.
    onnxfile.write(compressed, output, external_data=onnxfile.has_external_data(input_path))
    return schedule_out
