"""`tcexport compress`: plan which method runs at which block, rewrite the graph, check it, record what was done."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx_ir as ir

from tcexport import inputs as inputs_mod
from tcexport import metadata, methods, onnxfile
from tcexport.errors import UsageError
from tcexport.graph import blocks as blocks_mod
from tcexport.graph import attention, functions, opset, probe
from tcexport.graph.insert import Stage, insert_stages
from tcexport.reference import coverage
from tcexport.methods import tome

IMPLS = ("subgraph", "function", "plugin")  # plugin: function call nodes without the body (TensorRT plugins only)


def parse_layers(text: str, depth: int) -> list[int]:
    """'all', '5', '0-5', '3,6,9' (and mixes like '0-2,7') -> sorted block indices, each < depth."""
    text = str(text).strip().lower()
    if text == "all":
        return list(range(depth))
    layers: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                low, high = (int(p) for p in part.split("-", 1))
                if low > high:
                    raise ValueError
                layers.update(range(low, high + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise UsageError(f"--layers must be all, N, A-B or a comma list like 3,6,9; got '{text}'") from None
    if not layers or min(layers) < 0:
        raise UsageError(f"--layers must name blocks >= 0; got '{text}'")
    if max(layers) >= depth:
        raise UsageError(f"--layers {text}: the model has {depth} blocks (0-{depth - 1})")
    return sorted(layers)


def parse_counts(text: str | int | None, n_layers: int, option: str = "--r") -> list[int]:
    """One int for every chosen layer, or a comma list with one per chosen layer."""
    if text is None:
        raise UsageError(f"{option} is required for this method")
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        raise UsageError(f"{option} must be an integer or a comma list of integers; got '{text}'") from None
    if any(v < 0 for v in values):
        raise UsageError(f"{option} must be >= 0; got '{text}'")
    if len(values) == 1:
        return values * n_layers
    if len(values) != n_layers:
        raise UsageError(f"{option} lists {len(values)} values for {n_layers} chosen layers; give one or one per layer")
    return values


@dataclass
class Plan:
    method: str  # the method name, or "+"-joined names for a multi-stage plan
    stages: list[Stage]
    protected: int
    prop_attn: bool
    impl: str
    schedule: str
    request: dict

    def record(self) -> dict:
        return {"method": self.method, "layers": [s.block for s in self.stages],
                "methods": [s.method.name for s in self.stages],
                "params": [s.method.params for s in self.stages], "protected": self.protected,
                "prop_attn": self.prop_attn, "impl": self.impl, "schedule": self.schedule, "request": self.request}


def plan_tome(depth: int, r: str | int, layers: str = "all", schedule: str = "constant") -> list[Stage]:
    chosen = parse_layers(layers, depth)
    if schedule not in tome.SCHEDULES:
        raise UsageError(f"--schedule must be one of {', '.join(tome.SCHEDULES)}; got '{schedule}'")
    counts = parse_counts(r, len(chosen))
    if schedule == "decreasing":
        if len(set(counts)) != 1:
            raise UsageError("--schedule decreasing takes one --r value (the schedule spreads it over the layers)")
        counts = tome.schedule(counts[0], len(chosen), "decreasing")
    return [Stage(block, methods.get("tome")(r=count)) for block, count in zip(chosen, counts)]


def plan_method(name: str, depth: int, layers: str = "all", params: dict | None = None, r: str | int | None = None,
                schedule: str = "constant") -> list[Stage]:
    """Stages for one method over the chosen layers. ToMe's r may be per layer and follow a schedule."""
    cls = methods.get(name)
    params = dict(params or {})
    if name == "tome":
        if params:
            r = params.pop("r", r)
            if params:
                raise UsageError(f"unknown ToMe parameter(s) {', '.join(sorted(params))}; ToMe takes r")
        return plan_tome(depth, r, layers, schedule)
    if r is not None:
        params.setdefault("r", int(r) if str(r).isdigit() else r)
    if schedule != "constant":
        raise UsageError(f"--schedule applies to tome only, not to '{name}'")
    method = cls(**params)  # parameters checked once, with a clear error
    return [Stage(block, cls(**method.params)) for block in parse_layers(layers, depth)]


def parse_stage(text: str) -> tuple[str, dict, str]:
    """'METHOD[:key=value,...]@LAYERS' (e.g. 'tome:r=8@0-5', 'topk:keep=0.7@6,9') -> (method, params, layers)."""
    head, at, layers = text.partition("@")
    name, _, args = head.partition(":")
    if not at or not name.strip() or not layers.strip():
        raise UsageError(f"--stage '{text}' must look like METHOD:key=value,...@LAYERS, e.g. tome:r=8@0-5")
    params = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"--stage '{text}': parameter '{item}' must be key=value")
        params[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return name.strip(), params, layers.strip()


def _parse_value(text: str):
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def plan_stages(depth: int, specs: list[str]) -> list[Stage]:
    """Several methods at different layers, applied in layer order; token counts chain through them."""
    stages: list[Stage] = []
    for text in specs:
        name, params, layers = parse_stage(text)
        stages.extend(plan_method(name, depth, layers, params))
    blocks = [s.block for s in stages]
    if len(set(blocks)) != len(blocks):
        twice = sorted({b for b in blocks if blocks.count(b) > 1})
        raise UsageError(f"--stage: block(s) {twice} get more than one method; give each block one method")
    return sorted(stages, key=lambda s: s.block)


def default_protected(model: onnx.ModelProto) -> int:
    source = metadata.read(model, metadata.SOURCE) or {}
    return int(source.get("info", {}).get("num_prefix_tokens", 1))


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
    original_inputs = {v.name for v in graph.inputs}
    schedule = insert_stages(graph, found, plan.stages, plan.protected, shapes, prop_attn=plan.prop_attn,
                             mask_input=mask_input(graph, model),
                             pool_attentions=blocks_mod.find_pool_attentions(graph, shapes))
    # Inputs a method added (query: [batch, C]); validate feeds them, so the record lists them.
    extra_inputs = [_input_spec(v).to_json() for v in graph.inputs if v.name not in original_inputs]
    # The methods emit opset-18 forms; write them as the model's opset defines (function bodies copy them).
    opset.legalize(ir_model)
    if plan.impl in ("function", "plugin"):
        functions.package_methods(ir_model, with_body=plan.impl == "function")
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
    if impl not in IMPLS:
        raise UsageError(f"--impl must be one of {', '.join(IMPLS)}; got '{impl}'")
    if not stages:
        methods.get(method)  # unknown method -> clear error before any work
    model = onnxfile.load(input_path)
    if metadata.read(model, metadata.COMPRESSION):
        raise UsageError(f"{input_path} is already compressed; compress the uncompressed export instead")
    model = attention.decompose_attention(model)
    shapes = probe.concrete_shapes(model)
    depth = len(blocks_mod.find_blocks(ir.from_proto(model).graph, shapes))
    if stages:
        planned = plan_stages(depth, stages)
        request = {"stages": list(stages)}
    else:
        planned = plan_method(method, depth, layers, params, r, schedule)
        request = {"r": r, "layers": layers, "schedule": schedule, **({"params": params} if params else {})}
    if protected is None:
        protected = default_protected(model)
    names = list(dict.fromkeys(s.method.name for s in planned))
    plan = Plan("+".join(names), planned, protected, prop_attn, impl, schedule, request)
    compressed, schedule_out = compress_model(model, plan, shapes=shapes)
    coverage.check(metadata.read(model, metadata.SOURCE), {s.block: s.method for s in planned}, prop_attn,
                   protected, schedule_out, metadata.read(compressed, metadata.COMPRESSION).get("extra_inputs", []))
    # Keep the provenance: validate rebuilds the reference from it. Weights in a .data file stay in one.
    onnxfile.write(compressed, output, external_data=onnxfile.has_external_data(input_path))
    return schedule_out
