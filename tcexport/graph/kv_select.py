"""KV-cache selection at the end of the prefill (SnapKV): every layer's present is gathered, per KV head, at the
positions the method selects from that layer's own attention probabilities.

The layer's attention still uses the whole key and value (its Concat output, renamed `<present>.full`); only what
the graph returns as present.{i}.key/value is the gathered cache. In a decode step the method keeps every position,
so the same graph serves prefill and decode. The generation loop sees caches shorter than its attention mask
after the prefill and resets the mask to the cache (policies.compressed_cache_mask): the selection never keeps a
padded position, and every prompt is longer than the budget, so the kept positions are all real.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from tcexport.core.errors import UsageError
from tcexport.graph.decoder_prune import _common, _emit_select_with, _Graph, _splice, layer_of, probe_values


def select(model: onnx.ModelProto, method) -> onnx.ModelProto:
    graph = model.graph
    softmax_of: dict[int, str] = {}
    for node in graph.node:
        layer = layer_of(node)
        if node.op_type == "Softmax" and layer is not None:
            if layer in softmax_of:
                raise UsageError(f"snapkv: layer {layer} has more than one attention Softmax")
            softmax_of[layer] = node.output[0]
    outputs = {o.name for o in graph.output}
    layers = sorted(softmax_of)
    if not layers or any(f"present.{i}.key" not in outputs for i in layers):
        raise UsageError("snapkv: the graph has no present.{i}.key/value outputs per attention layer; export the "
                         "causal LM with 'tcexport export hf:DIR'")
    heads = {i: int(probe_values(model, [softmax_of[i]])[0][softmax_of[i]].shape[1]) for i in layers[:1]}
    heads = heads[layers[0]]
    kv_heads = {v.name: v.type.tensor_type.shape.dim[1].dim_value for v in graph.input}
    g = _Graph(model)
    common = _common(g)
    for i in layers:
        index = _emit_select_with(g, lambda emit: method.build_select_cache(
            emit, _holder(softmax_of[i]), _holder("attention_mask"), kv_heads[f"past_key_values.{i}.key"], heads,
            _holder(common["prefill"])), f"layer{i}_{method.name}")
        for kind in ("key", "value"):
            name = f"present.{i}.{kind}"
            full = f"{name}.full"
            for node in graph.node:
                node.input[:] = [full if x == name else x for x in node.input]
                node.output[:] = [full if x == name else x for x in node.output]
            shape = g.add("Concat", [g.add("Shape", [index], f"layer{i}_{kind}_index_shape")[0],
                                     g.add("Shape", [full], f"layer{i}_{kind}_head_dim", start=3, end=4)[0]],
                          f"layer{i}_{kind}_gather_shape", axis=0)[0]
            rows = g.add("Expand", [g.add("Unsqueeze", [index, common["minus_one"]], f"layer{i}_{kind}_rows")[0],
                                    shape], f"layer{i}_{kind}_rows_expanded")[0]
            g.new_nodes.append(helper.make_node("GatherElements", [full, rows], [name], name=f"tc/layer{i}_{kind}",
                                                axis=2))
    _splice(graph, g.new_nodes)
    return model


def _holder(name: str):
    import onnx_ir as ir

    return ir.Value(name=name)
