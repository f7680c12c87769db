"""Prefill pruning in a decoder graph: after layer L, later layers run as if the model had been given only the
kept tokens.

The decoder graph (tcexport/export/decoder.py) computes, outside its layers, what every layer shares: rotary
cos/sin from position_ids, the attention bias from attention_mask and the cache length, and the shape vectors
its reshapes use (the exporter shares them between layers, so some are computed inside layer 0). A stage at
layer L splits the layers into groups; for the layers of group s (after L_s, up to the next stage) the rewrite

  1. selects: the stage's method ranks the current tokens by layer L_s's attention (the last query's row of its
     Softmax, averaged over heads) and returns the kept indices (methods/decoder.py);
  2. gathers the activations that cross into the group (the residual stream leaving layer L_s) at those indices;
  3. clones the shared computation the group reads, from the graph inputs and Shape nodes up, with position_ids
     gathered at the kept tokens (so they keep their original rotary positions), attention_mask gathered at the
     group's key positions, and every token count in a shape vector replaced by the group's own (which entry is
     a token count is read off two probe runs with distinct sequence, past and total lengths).

Each group's cache holds only its tokens, so it also carries their original positions as state:
`past_positions.{first layer}` [batch, past] in, `present_positions.{first layer}` out (the generation loop feeds
every past*/present* pair back). The group's key positions are those plus the current tokens'; its attention
bias is rebuilt from them by the model's own mask code, which is causal by index over keys kept in order, that
is by original position. A decode step (the cache is not empty) keeps its token: step 1 returns all indices.

Sliding-window layers (Mistral, Phi-3, Gemma-2/3's local layers) keep their window over the ORIGINAL positions
(slots, as transformers counts them, padding included) of the surviving tokens. A layer's window is read off the
uncompressed graph (`layer_windows`: one decode step over a long random cache; the keys its query may see are a
suffix of W slots). The model's own mask code, re-run on a group's kept keys, windows them by index, which lets a
token see kept tokens more than W slots back (indices close, positions far); since positions grow at least as
fast as indices, the by-position window is that one narrowed, so each windowed layer of a group also masks the
logits of keys W or more slots behind their query (`_window_by_position`). Such a layer's cache holds the last
W - 1 kept tokens (the model's own cache code), which contain every kept key its window reaches. A windowed
layer's cache length is then not the group's token count, so on windowed models the probes part the two
(probes_for: the slots seen and the cache length differ in one probe) and a shape entry that is a windowed
cache's length becomes the group's windowed layer's cache length; a shape read off a group layer's own past
input stays as it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from tcexport.core.errors import UsageError
from tcexport.methods.emit import Emitter
from tcexport.models.inputs import TOKEN_INPUTS, token_input_of

LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)(?=[:/.]|$)")
PROBES = ({"batch": 2, "seq": 11, "past": 6}, {"batch": 3, "seq": 13, "past": 10})
POSITIONS_IN, POSITIONS_OUT = "past_positions.{}", "present_positions.{}"


@dataclass
class Stage:
    layer: int  # the layer whose attention decides; layers after it see the kept tokens
    method: object  # a methods.decoder.DecoderMethod


def layer_of(node: onnx.NodeProto) -> int | None:
    for prop in node.metadata_props:
        if prop.key == "namespace":
            found = LAYER.search(prop.value)
            return int(found.group(1)) if found else None
    return None


class _Graph:
    """Producer/consumer lookups over an onnx graph, and node appends with fresh names."""

    def __init__(self, model: onnx.ModelProto):
        self.model, self.graph = model, model.graph
        self.producer = {out: node for node in self.graph.node for out in node.output if out}
        self.initializers = {init.name for init in self.graph.initializer}
        self.inputs = {value.name for value in self.graph.input}
        self.new_nodes: list[onnx.NodeProto] = []

    def add(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, **attrs) -> list[str]:
        outs = [name if outputs == 1 else f"{name}_{k}" for k in range(outputs)]
        self.new_nodes.append(helper.make_node(op_type, inputs, outs, name=f"tc/{name}", **attrs))
        return outs

    def const(self, name: str, array) -> str:
        array = np.asarray(array)
        return self.add("Constant", [], name, value=onnx.numpy_helper.from_array(array, name))[0]


def activations(model: onnx.ModelProto) -> set[str]:
    """Values that depend on the tokens' data (input_ids or inputs_embeds, the cache) other than through their
    shapes."""
    seeds = [v.name for v in model.graph.input if v.name in TOKEN_INPUTS or v.name.startswith("past_key_values.")]
    data = set(seeds)
    for node in model.graph.node:  # nodes are in topological order
        if node.op_type in ("Shape", "Size"):
            continue
        if any(i in data for i in node.input if i):
            data.update(o for o in node.output if o)
    return data


def probe_feeds(model: onnx.ModelProto, batch: int, seq: int, past: int, layers_kv: dict,
                windows: dict | None = None) -> dict:
    """Random feeds with `past` slots seen; a windowed layer's cache holds what it would (the last window - 1)."""
    rng = np.random.default_rng(0)
    embeds = next((v for v in model.graph.input if v.name == "inputs_embeds"), None)
    if embeds is not None:
        width = embeds.type.tensor_type.shape.dim[2].dim_value
        tokens = {"inputs_embeds": rng.standard_normal((batch, seq, width)).astype(np.float32)}
    else:
        tokens = {"input_ids": rng.integers(0, 100, (batch, seq)).astype(np.int64)}
    feeds = {**tokens,
             "attention_mask": np.ones((batch, past + seq), np.int64),
             "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1))}
    for name, (heads, dim) in layers_kv.items():
        window = (windows or {}).get(_past_layer(name))
        length = past if window is None else min(past, window - 1)
        feeds[name] = rng.standard_normal((batch, heads, length, dim)).astype(np.float32)
    return feeds


def _kv_dims(model: onnx.ModelProto) -> dict:
    dims = {}
    for value in model.graph.input:
        if value.name.startswith("past_key_values."):
            shape = value.type.tensor_type.shape.dim
            dims[value.name] = (shape[1].dim_value, shape[3].dim_value)
    return dims


def probes_for(windows: dict | None) -> tuple[dict, ...]:
    """PROBES, or for a model with windowed layers (one window W) two probes where the seen slots and a windowed
    layer's cache length part: one inside the window (cache = past = W - 3), one past it (cache W - 1, past W + 4),
    so a shape entry tells a windowed cache's length ("cache") from the slots seen ("past")."""
    sizes = {w for w in (windows or {}).values() if w is not None}
    if not sizes:
        return PROBES
    window = sizes.pop()
    return ({"batch": 2, "seq": 11, "past": max(window - 3, 1), "window": window},
            {"batch": 3, "seq": 17, "past": window + 4, "window": window})


def probe_values(model: onnx.ModelProto, names: list[str], windows: dict | None = None) -> list[dict]:
    """`names` -> array, from one run per probe (probes_for(windows))."""
    from tcexport.graph.probe import exposing

    probes = probes_for(windows)
    names = list(dict.fromkeys(names))
    if not names:
        return [{} for _ in probes]
    session = exposing(model, names)
    kv = _kv_dims(model)
    return [dict(zip(names, session.run(names, probe_feeds(model, p["batch"], p["seq"], p["past"], kv, windows))))
            for p in probes]


def _slots(values: list[np.ndarray], probes: tuple[dict, ...] = PROBES) -> list[str]:
    """For a shape vector seen in every probe: which entries are the sequence, total or past length, or (windowed
    models) a windowed layer's cache length or that plus the sequence."""
    def cache(p):
        return p["past"] if "window" not in p else min(p["past"], p["window"] - 1)

    named = [("seq", [p["seq"] for p in probes]), ("total", [p["seq"] + p["past"] for p in probes]),
             ("past", [p["past"] for p in probes])]
    if any("window" in p for p in probes):
        named += [("cache", [cache(p) for p in probes]), ("cache_total", [cache(p) + p["seq"] for p in probes])]
    kinds = []
    for k in range(len(values[0])):
        entry = [int(v[k]) for v in values]
        kinds.append(next((kind for kind, seen in named if entry == seen), ""))
    return kinds


def prune(model: onnx.ModelProto, stages: list[Stage]) -> tuple[onnx.ModelProto, list[dict]]:
    """The graph with every stage inserted, and per group: its first layer and the stage that made it."""
    graph = model.graph
    by_layer: dict[int, list[onnx.NodeProto]] = {}
    for node in graph.node:
        layer = layer_of(node)
        if layer is not None:
            by_layer.setdefault(layer, []).append(node)
    depth = max(by_layer) + 1 if by_layer else 0
    stages = sorted(stages, key=lambda s: s.layer)
    for stage in stages:
        if stage.layer >= depth - 1:
            raise UsageError(f"{stage.method.name}@{stage.layer}: the decoder has {depth} layers (0-{depth - 1}); "
                             f"pruning after layer {stage.layer} leaves no later layer to save; choose a layer "
                             f"below {depth - 1}")
    if len({s.layer for s in stages}) != len(stages):
        raise UsageError("two decoder stages name the same layer; give each layer one stage")
    data = activations(model)
    windows = layer_windows(model, by_layer)
    if len({w for w in windows.values() if w is not None}) > 1:
        raise UsageError("the decoder's layers keep sliding windows of different lengths "
                         f"({sorted({w for w in windows.values() if w is not None})}); tcexport prunes tokens of "
                         "decoders with one window length")
    probes = probes_for(windows)
    g = _Graph(model)
    after_layers = _tail(graph, by_layer, depth, data)

    members_of = []
    for s, stage in enumerate(stages):
        end = stages[s + 1].layer if s + 1 < len(stages) else depth - 1
        members = [n for layer in range(stage.layer + 1, end + 1) for n in by_layer.get(layer, [])]
        if s == len(stages) - 1:
            members += after_layers
        members_of.append(members)

    # The layers before the first stage are a group too: the exporter shares shape vectors between layers (all
    # caches had one length when it traced), so they may read a pruned layer's cache length as their own.
    members_before = [n for layer in range(stages[0].layer + 1) for n in by_layer.get(layer, [])]
    reads_before = _external_reads(g, members_before)
    # What each group reads from outside itself, classified; then one probe for every shape the rewrite reads.
    plans = [_external_reads(g, members) for members in members_of]
    shape_nodes, crossing = set(), set()
    for value in reads_before:
        if value not in data and value not in g.initializers:
            shape_nodes.update(_shape_nodes_in_cone(g, value, data))
    for reads in plans:
        for value in reads:
            if value in data:
                crossing.add(value)
            elif value not in g.initializers:
                shape_nodes.update(_shape_nodes_in_cone(g, value, data))
    probed = probe_values(model, [*crossing, *[g.producer[v].output[0] for v in shape_nodes]], windows)
    slots = {v: _slots([p[v] for p in probed], probes) for v in shape_nodes}

    common = _common(g)
    whole = {"position_ids": "position_ids", "attention_mask": "attention_mask", "seq": common["n_prompt"],
             "past": common["past"], "total": common["total"], "layers": set(range(stages[0].layer + 1))}
    whole["cache"], whole["cache_total"] = _cache_lengths(g, whole, windows, common["n_prompt"], "whole")
    mapping, memo = {}, {}
    for value in reads_before:
        if value not in data and value not in g.initializers:
            mapping[value] = _clone(g, value, data, whole, slots, "whole", memo)
    rewiring = [(members_before, mapping)]  # applied at the end: later groups clone from the original nodes
    previous_index, groups = None, []
    for s, (stage, members, reads) in enumerate(zip(stages, members_of, plans)):
        first = stage.layer + 1
        softmax = [n for n in by_layer[stage.layer] if n.op_type == "Softmax"]
        if len(softmax) != 1:
            raise UsageError(f"{stage.method.name}@{stage.layer}: found {len(softmax)} attention Softmax nodes in "
                             "that layer, not one; the decoder must be exported with eager attention")
        prefix = f"stage{s}"
        index = _select(g, stage.method, softmax[0].output[0], common, prefix)
        kept = index if previous_index is None else g.add(
            "GatherElements", [previous_index, index], f"{prefix}_kept_in_prompt", axis=1)[0]
        group = _group_values(g, kept, common, first, prefix)
        group["layers"] = set(range(first, (stages[s + 1].layer if s + 1 < len(stages) else depth - 1) + 1))
        group["cache"], group["cache_total"] = _cache_lengths(g, group, windows, group["seq"], prefix)
        for layer in sorted(group["layers"]):
            if windows.get(layer) is not None:
                _window_by_position(g, by_layer[layer], windows[layer], group, f"{prefix}_layer{layer}")
        mapping, memo = {}, {}
        for value in reads:
            if value.startswith("past_key_values."):
                continue  # the group's own cache: already as long as its tokens
            if value in data:
                for run, probe in zip(probed, probes):
                    shape = run[value].shape
                    if len(shape) != 3 or shape[1] != probe["seq"]:
                        raise UsageError(f"{stage.method.name}@{stage.layer}: the value '{value}' crossing into "
                                         f"layer {first} has shape {list(shape)}, not [batch, tokens, width]; "
                                         "tcexport cannot follow this decoder's tokens")
                mapping[value] = g.add("GatherND", [value, g.add("Unsqueeze", [index, common["minus_one"]],
                                                                 f"{prefix}_rows_{_safe(value)}")[0]],
                                       f"{prefix}_gathered_{_safe(value)}", batch_dims=1)[0]
            elif value not in g.initializers:
                mapping[value] = _clone(g, value, data, group, slots, prefix, memo)
        rewiring.append((members, mapping))
        groups.append({"first_layer": first, "stage": s, "method": stage.method.name})
        previous_index = kept
    for members, mapping in rewiring:
        _rewire(members, mapping)
    _splice(graph, g.new_nodes)
    return model, groups


def _rewire(members: list[onnx.NodeProto], mapping: dict[str, str]) -> None:
    for node in members:
        for k, name in enumerate(node.input):
            if name in mapping:
                node.input[k] = mapping[name]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


def _tail(graph, by_layer, depth, data) -> list[onnx.NodeProto]:
    """Nodes after the last layer that carry its tokens (final norm, lm_head): they belong to the last group."""
    in_layers = {id(n) for nodes in by_layer.values() for n in nodes}
    reached = {o for n in by_layer.get(depth - 1, []) for o in n.output}
    tail = []
    for node in graph.node:
        if id(node) in in_layers:
            continue
        if any(i in reached for i in node.input):
            tail.append(node)
            reached.update(node.output)
    return tail


def _external_reads(g: _Graph, members: list[onnx.NodeProto]) -> list[str]:
    produced = {o for n in members for o in n.output}
    reads = []
    for node in members:
        for name in node.input:
            if name and name not in produced and name not in reads:
                reads.append(name)
    return reads


def _shape_nodes_in_cone(g: _Graph, value: str, data: set[str]) -> set[str]:
    """Shape-node outputs the shared computation behind `value` reads (the ones to re-count)."""
    found, stack, seen = set(), [value], set()
    while stack:
        name = stack.pop()
        if name in seen or name in g.initializers or name in g.inputs:
            continue
        seen.add(name)
        node = g.producer.get(name)
        if node is None:
            continue
        if node.op_type == "Shape":
            found.add(node.output[0])
            continue
        stack.extend(i for i in node.input if i)
    return found


def _common(g: _Graph) -> dict:
    """Values every stage uses: the prompt length, the cache length of the full sequence, prefill or not."""
    zero, one, two = g.const("tc_zero", [0]), g.const("tc_one", [1]), g.const("tc_two", [2])
    n_prompt = g.add("Shape", [token_input_of(v.name for v in g.model.graph.input)], "tc_n_prompt", start=1,
                     end=2)[0]
    total = g.add("Shape", ["attention_mask"], "tc_total_full", start=1, end=2)[0]
    past = g.add("Sub", [total, n_prompt], "tc_past_full")[0]
    prefill = g.add("Equal", [past, zero], "tc_prefill")[0]
    return {"zero": zero, "one": one, "two": two, "minus_one": g.const("tc_minus_one", [-1]),
            "n_prompt": n_prompt, "past": past, "total": total, "prefill": prefill}


def _select(g: _Graph, method, probs: str, common: dict, prefix: str) -> str:
    """Kept indices [B, n'] from layer L's attention probabilities [B, H, q, k] (the last query's row, head
    mean, current tokens' columns)."""
    last = g.add("Gather", [probs, g.const(f"{prefix}_last", np.int64(-1))], f"{prefix}_last_query", axis=2)[0]
    mean = g.add("ReduceMean", [last, g.const(f"{prefix}_heads", [1])], f"{prefix}_head_mean", keepdims=0)[0]
    queries = g.add("Shape", [probs], f"{prefix}_queries", start=2, end=3)[0]
    scores = g.add("Slice", [mean, g.add("Neg", [queries], f"{prefix}_from")[0],
                             g.const(f"{prefix}_to", [np.iinfo(np.int64).max]), common["one"]], f"{prefix}_scores")[0]
    return _emit_select(g, method, scores, common, prefix)


def _emit_select(g: _Graph, method, scores: str, common: dict, prefix: str) -> str:
    """The method's build_select, recorded with onnx_ir and spliced in as protobuf nodes."""
    return _emit_select_with(g, lambda emit: method.build_select(
        emit, ir.Value(name=scores), ir.Value(name=common["n_prompt"]), ir.Value(name=common["prefill"])),
        f"{prefix}_{method.name}")


def _emit_select_with(g: _Graph, build, prefix: str) -> str:
    """Nodes a method records on an onnx_ir tape (its inputs named by placeholder values), as protobuf nodes."""
    from onnx_ir import tape

    recorder = tape.Tape()
    out = build(Emitter(recorder, prefix, np.dtype(np.float32)))
    for node in recorder.nodes:
        g.new_nodes.append(ir.serde.serialize_node(node))
    return out.name


def _group_values(g: _Graph, kept: str, common: dict, first: int, prefix: str) -> dict:
    """The group's stand-ins for the graph inputs and token counts, and its positions state I/O."""
    past_in, past_out = POSITIONS_IN.format(first), POSITIONS_OUT.format(first)
    g.graph.input.append(helper.make_tensor_value_info(past_in, onnx.TensorProto.INT64, ["batch", f"past_{first}"]))
    n_group = g.add("Shape", [kept], f"{prefix}_n", start=1, end=2)[0]
    past_group = g.add("Shape", [past_in], f"{prefix}_past", start=1, end=2)[0]
    now = g.add("Add", [kept, common["past"]], f"{prefix}_positions_now")[0]
    keys = g.add("Concat", [past_in, now], past_out, axis=1)[0]
    g.graph.output.append(helper.make_tensor_value_info(past_out, onnx.TensorProto.INT64, ["batch", f"kept_{first}"]))
    return {
        "query_slots": now, "key_slots": keys,
        "position_ids": g.add("GatherElements", ["position_ids", kept], f"{prefix}_position_ids", axis=1)[0],
        "attention_mask": g.add("GatherElements", ["attention_mask", keys], f"{prefix}_attention_mask", axis=1)[0],
        "seq": n_group, "past": past_group, "total": g.add("Add", [past_group, n_group], f"{prefix}_total")[0],
    }


def _clone(g: _Graph, value: str, data: set[str], group: dict, slots: dict, prefix: str, memo: dict) -> str:
    """`value` recomputed for the group (see the module docstring, step 3)."""
    if value in memo:
        return memo[value]
    if value in g.initializers or not value:
        return value
    if value in g.inputs:
        if value in ("position_ids", "attention_mask"):
            memo[value] = group[value]
            return memo[value]
        raise UsageError(f"the decoder's shared computation reads the input '{value}' directly; tcexport cannot "
                         "re-run it for the kept tokens")
    if value in data:
        raise UsageError(f"the decoder's shared computation reads '{value}', which depends on the tokens' data; "
                         "tcexport cannot re-run it for the kept tokens")
    node = g.producer[value]
    if node.op_type == "Shape":
        kinds = slots.get(node.output[0], [])
        cache_of = _past_layer(node.input[0])
        if cache_of is not None and cache_of in group["layers"]:
            kinds = []  # the group's own cache length: already right (a windowed layer's is not its token count)
        if not any(kinds):
            memo[value] = value
            return value
        pieces = []
        for k, kind in enumerate(kinds):
            if kind:
                pieces.append(group[kind])
            else:
                pieces.append(g.add("Slice", [value, g.const(f"{prefix}_{_safe(value)}_at{k}", [k]),
                                              g.const(f"{prefix}_{_safe(value)}_to{k}", [k + 1])],
                                    f"{prefix}_{_safe(value)}_{k}")[0])
        memo[value] = g.add("Concat", pieces, f"{prefix}_{_safe(value)}", axis=0)[0]
        return memo[value]
    if node.op_type == "Constant":
        memo[value] = value
        return value
    inputs = [_clone(g, name, data, group, slots, prefix, memo) for name in node.input]
    if inputs == list(node.input):  # nothing it reads depends on the token count
        for out in node.output:
            memo[out] = out
        return value
    clone = onnx.NodeProto()
    clone.CopyFrom(node)
    clone.name = f"{prefix}/{node.name}"
    del clone.input[:]
    clone.input.extend(inputs)
    del clone.output[:]
    clone.output.extend(f"{prefix}_{_safe(o)}" if o else "" for o in node.output)
    for old, new in zip(node.output, clone.output):
        memo[old] = new
    g.new_nodes.append(clone)
    return memo[value]


def _past_layer(name: str) -> int | None:
    found = re.fullmatch(r"past_key_values\.(\d+)\.(?:key|value)", name)
    return int(found.group(1)) if found else None


def _cache_lengths(g: _Graph, group: dict, windows: dict, seq: str, prefix: str) -> tuple[str, str]:
    """[1] int64 each: a windowed layer's cache length in the group (its past input's axis 2; the group's first
    layer's when none is windowed), and that plus the group's tokens."""
    layers = sorted(group["layers"])
    layer = next((i for i in layers if windows.get(i) is not None), layers[0])
    cache = g.add("Shape", [f"past_key_values.{layer}.key"], f"{prefix}_cache_length", start=2, end=3)[0]
    return cache, g.add("Add", [cache, seq], f"{prefix}_cache_total")[0]


def windows_of(model: onnx.ModelProto) -> dict[int, int | None]:
    """layer_windows of a decoder graph, its layers found by the exporter's scopes."""
    by_layer: dict[int, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        layer = layer_of(node)
        if layer is not None:
            by_layer.setdefault(layer, []).append(node)
    return layer_windows(model, by_layer)


WINDOW_PROBE_PAST = 8192  # the longest cache the window probe builds; a window at least this long reads as global


def layer_windows(model: onnx.ModelProto, by_layer: dict[int, list[onnx.NodeProto]]) -> dict[int, int | None]:
    """Per layer, its sliding window W (its query sees only the last W slots), or None when it attends to every
    earlier slot; read off the graph: one decode step (batch 1, every slot real) over a random cache of
    min(context - 1, WINDOW_PROBE_PAST) positions, at each layer's Softmax. A pattern that is neither is refused."""
    from tcexport.core import metadata
    from tcexport.graph.probe import exposing

    info = ((metadata.read(model, metadata.SOURCE) or {}).get("info") or {}).get("decoder") or {}
    past = max(1, min(int(info.get("context") or WINDOW_PROBE_PAST) - 1, WINDOW_PROBE_PAST))
    softmax = {layer: [n.output[0] for n in nodes if n.op_type == "Softmax"] for layer, nodes in by_layer.items()}
    names = [outs[0] for outs in softmax.values() if len(outs) == 1]
    if not names:
        return {}
    feeds = probe_feeds(model, 1, 1, past, _kv_dims(model))
    probs = dict(zip(names, exposing(model, names).run(names, feeds)))
    windows = {}
    for layer, outs in softmax.items():
        if len(outs) != 1:
            continue
        seen = (probs[outs[0]][0, :, -1, :] > 0).any(axis=0)  # [keys]
        width = int(seen.sum())
        if not seen[len(seen) - width:].all():
            raise UsageError(f"decoder layer {layer}: its last query sees {width} of {len(seen)} cached positions, "
                             "not a causal suffix; tcexport cannot follow this mask when it prunes tokens")
        windows[layer] = None if width == len(seen) else width
    return windows


def _window_by_position(g: _Graph, nodes: list[onnx.NodeProto], window: int, group: dict, prefix: str) -> None:
    """The layer's logits masked where a key stands `window` or more slots behind its query (original positions:
    the group's key slots, the last K of them being this layer's keys)."""
    softmax = next(n for n in nodes if n.op_type == "Softmax")
    logits = softmax.input[0]
    keys = g.add("Shape", [logits], f"{prefix}_keys", start=3, end=4)[0]
    key_slots = g.add("Slice", [group["key_slots"], g.add("Neg", [keys], f"{prefix}_keys_from")[0],
                                g.const(f"{prefix}_keys_to", [np.iinfo(np.int64).max]), g.const(f"{prefix}_axis", [1])],
                      f"{prefix}_key_slots")[0]
    behind = g.add("Sub", [g.add("Unsqueeze", [group["query_slots"], g.const(f"{prefix}_q_axes", [1, 3])],
                                 f"{prefix}_query_rows")[0],
                           g.add("Unsqueeze", [key_slots, g.const(f"{prefix}_k_axes", [1, 2])],
                                 f"{prefix}_key_columns")[0]], f"{prefix}_behind")[0]
    outside = g.add("GreaterOrEqual", [behind, g.const(f"{prefix}_window", np.int64(window))], f"{prefix}_outside")[0]
    masked = g.add("Where", [outside, g.const(f"{prefix}_never", np.float32(np.finfo(np.float32).min)), logits],
                   f"{prefix}_windowed")[0]
    softmax.input[0] = masked


def _splice(graph: onnx.GraphProto, new_nodes: list[onnx.NodeProto]) -> None:
    """Add the new nodes and put the whole graph back in topological order (Kahn's algorithm, stable)."""
    nodes = list(graph.node) + new_nodes
    produced_by = {o: k for k, n in enumerate(nodes) for o in n.output if o}
    waiting = [0] * len(nodes)
    users: dict[int, list[int]] = {}
    for k, node in enumerate(nodes):
        for name in set(node.input):
            source = produced_by.get(name)
            if name and source is not None:
                waiting[k] += 1
                users.setdefault(source, []).append(k)
    import heapq

    ready = [k for k in range(len(nodes)) if waiting[k] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        k = heapq.heappop(ready)
        order.append(nodes[k])
        for user in users.get(k, []):
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        raise UsageError("the pruned decoder graph has a cycle; this is a tcexport bug, please report it")
    del graph.node[:]
    graph.node.extend(order)
