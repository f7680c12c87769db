"""`tcexport compress` on a decoder graph: prefill stages rewrite the graph, decode policies are recorded.

    fastv, pdrop   graph/decoder_prune.py: later layers see the kept prompt tokens
    snapkv         graph/kv_select.py: every layer's present is gathered per KV head at the end of the prefill
    streaming      nothing in the graph: the generation loop (and the reference) trim the cache between steps

The record (tcexport.compression, kind "decoder") says each stage's layer, method and parameters, the layer
groups the rewrite made and the decode policies, so validate and generate work from the file alone.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from tcexport import methods
from tcexport.compress.plan import plan_method, plan_stages
from tcexport.core import metadata, onnxfile
from tcexport.core.errors import UsageError
from tcexport.graph import decoder_prune, kv_select

DECODER_METHODS_HINT = "decoders take fastv, pdrop, snapkv and streaming"


def is_decoder(model: onnx.ModelProto) -> bool:
    return ((metadata.read(model, metadata.SOURCE) or {}).get("info") or {}).get("kind") == "decoder"


def plan(model: onnx.ModelProto, method: str, layers: str, params: dict, stages: list[str]) -> list:
    """The stages (graph/insert Stage: block, method) of a decoder plan; encoder methods are refused."""
    depth = int(metadata.read(model, metadata.SOURCE)["info"]["decoder"]["layers"])
    if stages:
        planned = plan_stages(depth, stages)
    else:
        cls = methods.get(method)
        if getattr(cls, "acts", "") in ("decode", "cache") and layers == "all":
            layers = "0"  # a cache method acts on every layer's cache at once: one stage says it
        planned = plan_method(method, depth, layers, params)
    for stage in planned:
        if getattr(stage.method, "applies_to", "encoder") != "decoder":
            raise UsageError(f"{stage.method.name} compresses the tokens of bidirectional encoders; this is a causal "
                             f"LM's decoder graph: {DECODER_METHODS_HINT}")
    cache_methods = [s for s in planned if s.method.acts in ("decode", "cache")]
    if len(cache_methods) > 1:
        raise UsageError("give one cache method (streaming or snapkv), not several")
    if cache_methods and len(planned) > len(cache_methods):
        raise UsageError(f"{cache_methods[0].method.name} acts on a cache every layer shares; it does not combine "
                         "with prefill pruning (fastv, pdrop), whose layers hold caches of different lengths")
    return planned


def compress(model: onnx.ModelProto, input_path: Path, output: Path, method: str, layers: str, params: dict,
             stages: list[str], impl: str) -> list[dict]:
    if impl != "subgraph":
        raise UsageError(f"--impl {impl}: decoder stages are written as standard ONNX ops only (--impl subgraph)")
    planned = plan(model, method, layers, params, stages)
    prefill = [decoder_prune.Stage(s.block, s.method) for s in planned if s.method.acts == "prefill"]
    groups = []
    if prefill:
        model, groups = decoder_prune.prune(model, prefill)
    cache_methods = [s.method for s in planned if s.method.acts in ("cache", "decode")]
    if cache_methods:
        _refuse_windowed_caches(model, cache_methods[0])
    for stage in planned:
        if stage.method.acts == "cache":
            model = kv_select.select(model, stage.method)
    record = {
        "kind": "decoder",
        "method": "+".join(dict.fromkeys(s.method.name for s in planned)),
        "stages": [{"layer": s.block, "method": s.method.name, "params": s.method.params}
                   for s in planned if s.method.acts == "prefill"],
        "decode_policies": [{"method": s.method.name, "params": s.method.params}
                            for s in planned if s.method.acts == "decode"],
        "cache_stages": [{"method": s.method.name, "params": s.method.params}
                         for s in planned if s.method.acts == "cache"],
        "groups": groups,
        "request": {"stages": list(stages)} if stages else {"method": method, "layers": layers, "params": params},
    }
    metadata.write(model, metadata.COMPRESSION, record)
    onnx.checker.check_model(model)
    onnxfile.write(model, output, external_data=onnxfile.has_external_data(input_path))
    return [{"layer": g["first_layer"], "method": g["method"]} for g in groups] or [
        {"policy": p["method"], **p["params"]} for p in record["decode_policies"] + record["cache_stages"]]


# Why a cache method does not apply to a sliding-window layer (whose cache transformers keeps at window - 1).
WINDOWED_CACHE_REASON = {
    "snapkv": "so {its} cache holds the last {keep} positions, not the prompt snapkv selects from",
    "streaming": "so {its} cache already stays at {keep} positions, and {its} window cannot reach the attention "
                 "sinks streaming keeps",
}


def _refuse_windowed_caches(model: onnx.ModelProto, method) -> None:
    """snapkv and streaming act on caches of the whole context: a sliding-window layer's is refused (the same
    window probe as prefill pruning, decoder_prune.layer_windows, finds them)."""
    windows = {layer: w for layer, w in decoder_prune.windows_of(model).items() if w is not None}
    if not windows:
        return
    layers, width = sorted(windows), max(windows.values())
    named = ", ".join(map(str, layers))
    reason = WINDOWED_CACHE_REASON.get(method.name, "whose cache is not the whole context").format(
        keep=width - 1, its="their" if len(layers) > 1 else "its")
    raise UsageError(f"{method.name}: layer{'s' if len(layers) > 1 else ''} {named} attend{'' if len(layers) > 1 else 's'} "
                     f"through a sliding window of {width} positions, {reason}; tcexport applies {method.name} to "
                     "decoders whose layers all attend to the whole context")


def stages_of(compression: dict | None) -> tuple[list, list]:
    """(prefill stages, decode policies) rebuilt from a tcexport.compression record."""
    compression = compression or {}
    stages = [decoder_prune.Stage(s["layer"], methods.get(s["method"])(**s["params"])) for s in compression.get("stages", [])]
    cache = [methods.get(s["method"])(**s["params"]) for s in compression.get("cache_stages", [])]
    return stages, list(compression.get("decode_policies", [])), cache
