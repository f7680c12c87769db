"""The compression plan: which method runs at which block, from --method/--r/--layers or --stage text.

Token counts are static: each stage's method knows its output count from its input count alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from tcexport import methods
from tcexport.core import metadata
from tcexport.core.errors import UsageError
from tcexport.graph.insert import Stage
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


def parse_values(param, text: str, n_layers: int) -> list:
    """A per-layer parameter of kind float: one value for every chosen layer, or one per chosen layer."""
    values = [param.parse(v) for v in str(text).split(",") if v.strip()]
    if len(values) == 1:
        return values * n_layers
    if len(values) != n_layers:
        raise UsageError(f"{param.flag} lists {len(values)} values for {n_layers} chosen layers; give one or one "
                         "per layer")
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


def plan_method(name: str, depth: int, layers: str = "all", params: dict | None = None, r: str | int | None = None,
                schedule: str = "constant") -> list[Stage]:
    """Stages for one method over the chosen layers.

    Values are read by the method's declaration: text (from the CLI or a recipe) in the parameter's kind, and a
    per-layer parameter (ToMe's r) as one value or a comma list with one per chosen layer. `r` is the --r
    shorthand. `schedule` is ToMe's: decreasing spreads one r over the layers as ToMe's (r, -1).
    """
    cls = methods.get(name)
    params = dict(params or {})
    if r is not None:
        params.setdefault("r", r)
    if schedule not in tome.SCHEDULES:
        raise UsageError(f"--schedule must be one of {', '.join(tome.SCHEDULES)}; got '{schedule}'")
    if schedule != "constant" and name != "tome":
        raise UsageError(f"--schedule applies to tome only, not to '{name}'")
    chosen = parse_layers(layers, depth)
    declared = {p.name: p for p in cls.parameters}
    per_layer: dict[str, list] = {}
    for key, value in list(params.items()):
        param = declared.get(key)
        if param is None or value is None:
            continue  # the method's own check names an unknown parameter
        if param.per_layer and (isinstance(value, (str, list, tuple))):
            text = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            per_layer[key] = (parse_counts(text, len(chosen), param.flag) if param.kind is int
                              else parse_values(param, text, len(chosen)))
        elif isinstance(value, str):
            params[key] = param.parse(value)
    if schedule == "decreasing":
        counts = per_layer.get("r") or parse_counts(params.get("r"), len(chosen))
        if len(set(counts)) != 1:
            raise UsageError("--schedule decreasing takes one --r value (the schedule spreads it over the layers)")
        per_layer["r"] = tome.schedule(counts[0], len(chosen), "decreasing")
    stages = []
    for i, block in enumerate(chosen):
        block_params = {**params, **{key: values[i] for key, values in per_layer.items()}}
        stages.append(Stage(block, cls(**block_params)))  # each block's parameters checked, with a clear error
    return stages


def parse_stage(text: str) -> tuple[str, dict, str]:
    """'METHOD[:key=value,...]@LAYERS' (e.g. 'tome:r=8@0-5', 'topk:keep=0.7@6,9') -> (method, params, layers)."""
    head, at, layers = text.partition("@")
    name, _, args = head.partition(":")
    if not at or not name.strip() or not layers.strip():
        raise UsageError(f"--stage '{text}' must look like METHOD:key=value,...@LAYERS, e.g. tome:r=8@0-5")
    name = name.strip()
    cls = methods.METHODS.get(name)
    declared = {p.name: p for p in cls.parameters} if cls is not None else {}
    raw: dict[str, str] = {}
    last = None
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            # a bare value continues the previous per-layer list: pdrop:keep=0.5,0.25@8,16
            param = declared.get(last) if last else None
            if param is None or not param.per_layer:
                raise UsageError(f"--stage '{text}': parameter '{item}' must be key=value")
            raw[last] += "," + item
            continue
        last = key.strip().replace("-", "_")
        raw[last] = value.strip()
    params = {key: value if "," in value else _parse_value(declared.get(key), value) for key, value in raw.items()}
    return name, params, layers.strip()


def _parse_value(param, text: str):
    """A value in its declared kind; for a parameter the method does not declare, the likeliest kind."""
    if param is not None:
        return param.parse(text)
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
