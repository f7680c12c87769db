"""Insert token-compression methods into an ONNX graph at chosen blocks and keep every shape consistent.

For each stage (a method at a block), in block order:
  1. metric = the block's keys (right operand of the logits MatMul, [B, H, d, N]) averaged over heads -> [B, N, d],
     and the signals the method needs (cls_attention; query: a new graph input "query" [batch, C], made once)
  2. the method's ONNX nodes turn (hidden, metric, size, mask) into fewer tokens
  3. everything that consumed the block's hidden state now consumes the compressed one
Then proportional attention adds log(size) to the attention logits of every later block, and one pass of the
token tracker (graph/tokens.py) follows the new counts downstream, fixing shape constants and rebuilding side
inputs: the attention mask of later blocks from the current mask, and pooling weights from mask * size (so a
mean pool over tokens becomes size-weighted, as merging requires).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from tcexport.core.errors import UsageError
from tcexport.graph import pooling as pooling_mod
from tcexport.graph import positions as positions_mod
from tcexport.graph.blocks import LOGIT_PATH_OPS, Block
from tcexport.graph.probe import PROBE_BATCH
from tcexport.graph.tokens import TokenTracker, Tokens, const_array
from tcexport.methods.base import Method
from tcexport.methods.emit import numpy_dtype

MASK_MIN = float(np.finfo(np.float32).min)  # what transformers adds for masked keys
QUERY_INPUT = "query"  # graph input [batch, C] created for methods that need an external query vector


@dataclass
class Stage:
    block: int
    method: Method


@dataclass
class StageInputs:
    """What a stage decided with, kept so its origin (which token each output stands for) can be measured."""

    block: int
    method: Method
    x: ir.Value
    metric: ir.Value | None
    size: ir.Value
    mask: ir.Value | None
    signals: dict
    count: int


@dataclass
class TokenState:
    x: ir.Value
    size: ir.Value
    mask: ir.Value | None
    count: int
    inputs: StageInputs | None = None


class _Builder:
    """Records new nodes with readable names and remembers the run-time shape each new value stands for.

    Names are unique by construction: a name already taken in the graph gets a numbered suffix."""

    def __init__(self, graph: ir.Graph, aliases: dict[ir.Value, tuple[int, ...]]):
        self.graph = graph
        self.aliases = aliases
        self.nodes: list[ir.Node] = []
        self.taken = {n.name for n in graph} | {v.name for n in graph for v in n.outputs}
        self.taken |= {v.name for v in [*graph.inputs, *graph.initializers.values()]}

    def unique(self, name: str) -> str:
        candidate, number = name, 1
        while candidate in self.taken or candidate.replace("/", "_") in self.taken:
            number += 1
            candidate = f"{name}_{number}"
        self.taken |= {candidate, candidate.replace("/", "_")}
        return candidate

    def op(self, name: str, op_type: str, inputs: list, shape: tuple[int, ...] | None, **attributes) -> ir.Value:
        name = self.unique(name)
        node = ir.node(op_type, inputs, attributes=attributes, name=name)
        node.outputs[0].name = name.replace("/", "_")
        self.graph.append(node)
        self.nodes.append(node)
        if shape is not None:
            self.aliases[node.outputs[0]] = shape
        return node.outputs[0]

    def const(self, name: str, array) -> ir.Value:
        array = np.asarray(array)
        return self.op(name, "Constant", [], tuple(array.shape), value=ir.tensor(array))


def insert_stages(graph: ir.Graph, blocks: list[Block], stages: list[Stage], protected: int,
                  shapes: dict[str, tuple[int, ...]], prop_attn: bool = True,
                  mask_input: ir.Value | None = None, pool_attentions: list[ir.Node] = (),
                  windows: dict | None = None) -> list[dict]:
    """Rewrite `graph` in place. Returns the token schedule: [{block, in, out}] for every block.

    pool_attentions: Softmax nodes of attentions that pool the tokens with a probe (blocks.find_pool_attentions);
    they get proportional attention after a compression too. windows: {block index: graph.masks.MaskStructure}
    of the sliding-window blocks; after a compression their rebuilt mask keeps the window over the tokens'
    original positions."""
    stages = sorted(stages, key=lambda s: s.block)
    first_hidden = shapes.get(blocks[0].hidden.name)
    if first_hidden is None or len(first_hidden) != 3:
        raise UsageError("could not measure the hidden state of block 0; tcexport expects [batch, tokens, channels]")
    n0 = int(first_hidden[1])
    aliases: dict[ir.Value, tuple[int, ...]] = {}
    build = _Builder(graph, aliases)
    skip: set[ir.Node] = set()
    starts: dict[ir.Value, Tokens] = {}
    states: list[TokenState] = []

    size = build.op("tc/size0", "ConstantOfShape", [_batch_and(build, blocks[0].hidden, [n0, 1], "tc/size0_shape")],
                    (PROBE_BATCH, n0, 1), value=ir.tensor(np.ones(1, dtype=np.float32)))
    mask = None
    if mask_input is not None:
        mask = build.op("tc/mask0", "Cast", [mask_input], (PROBE_BATCH, n0), to=ir.DataType.FLOAT)

    # Before any rewrite: the nodes where each block adds its attention mask to the logits.
    logit_nodes = {node for block in blocks for node in _logit_path(block, branches=True)}
    windows = windows or {}
    window_nodes = {node: windows[block.index] for block in blocks if block.index in windows
                    for node in _logit_path(block)}
    folded_bias: set[ir.Node] = set()  # mask Adds on the logits whose rebuilt bias also carries log(size)
    count = n0
    query: ir.Value | None = None  # the "query" graph input, created by the first stage that needs it
    schedule = []
    by_block = {s.block: s for s in stages}
    for block in blocks:
        stage = by_block.get(block.index)
        entering = count
        if states and prop_attn:
            mask_term = _mask_term_on_logits(block, mask_input, shapes, n0)
            if mask_term is not None:  # the attention bias rebuilt for it will carry log(size) (_SideInputs)
                folded_bias.add(mask_term)
            else:
                _add_log_size_bias(build, block.softmax, states[-1], shapes, n0, f"tc_blk{block.index}")
            for number, branch in enumerate(block.branches, 1):  # parallel attentions: each gets its own bias
                _add_log_size_bias(build, branch, states[-1], shapes, n0, f"tc_blk{block.index}_branch{number}")
        if stage is not None:
            x = block.hidden
            needs = stage.method.needs
            metric = None
            if "keys" in needs:
                built = len(build.nodes)
                metric = _head_mean_keys(build, block, shapes)
                skip.update(build.nodes[built:])  # already at this stage's count; their reshapes hold no counts
            signals = {"cls_attention": _cls_attention(build, block, shapes)} if "cls_attention" in needs else {}
            if QUERY_INPUT in needs:
                query = _query_input(graph, block, shapes, query)
                signals[QUERY_INPUT] = build.op(f"tc_blk{block.index}/{QUERY_INPUT}", "Identity", [query], None)
            uses = [(user, i) for user, i in x.uses() if user not in build.nodes]
            op = tape.Tape()
            prefix = f"tc_blk{block.index}_{stage.method.name}"
            x_out, size_out, mask_out = stage.method.build_onnx(op, x, metric, size, mask, count, protected,
                                                                name_prefix=prefix, signals=signals)
            for node in op.nodes:
                graph.append(node)
                skip.add(node)
                # --impl function packages exactly these nodes (graph/functions.py).
                node.meta["tcexport_stage"] = (block.index, stage.method.name)
                node.meta["tcexport_stage_args"] = {"params": dict(stage.method.params), "n_in": count,
                                                    "protected": protected}
            count = stage.method.tokens_out(count, protected)
            if x_out is not x:
                for user, index in uses:
                    user.replace_input_with(index, x_out)
                stage_index = len(states)
                hidden_shape = shapes[x.name]
                aliases[x_out] = hidden_shape
                aliases[size_out] = (PROBE_BATCH, n0, 1)
                starts[x_out] = Tokens(frozenset({1}), stage_index)
                starts[size_out] = Tokens(frozenset({1}), stage_index)
                if mask_out is not None:
                    aliases[mask_out] = (PROBE_BATCH, n0)
                    starts[mask_out] = Tokens(frozenset({1}), stage_index)
                stage_inputs = StageInputs(block.index, stage.method, x, metric, size, mask, signals, entering)
                size, mask = size_out, mask_out
                states.append(TokenState(x_out, size_out, mask_out, count, stage_inputs))
        schedule.append({"block": block.index, "scope": block.scope, "in": entering, "out": count})

    if states and prop_attn:
        for number, softmax in enumerate(pool_attentions):
            _add_log_size_bias(build, softmax, states[-1], shapes, n0, f"tc_pool{number}")
    side_inputs = _SideInputs(build, states, mask_input, logit_nodes, shapes, protected, skip, folded_bias,
                              window_nodes)
    tracker = TokenTracker(graph, shapes, n0, [s.count for s in states], side_inputs, skip)
    tracker.alias = aliases
    side_inputs.tracker = tracker
    tracker.run(starts)
    _check_windows_kept(blocks, windows, states, mask_input, side_inputs.served_windows)
    unserved = folded_bias - side_inputs.served_log_size
    if unserved:  # a block would silently lose proportional attention: a bug in the fold's pattern match
        raise RuntimeError(f"tcexport bug: proportional attention was meant to ride on {sorted(n.name for n in unserved)}"
                           ", but the tracker never rebuilt its mask operand; please report it")
    graph.sort()  # side inputs built while tracking were appended at the end
    _forget_stale_shapes(graph, tracker)
    return schedule


def _batch_and(build: _Builder, like: ir.Value, dims: list[int], name: str) -> ir.Value:
    """Shape [batch, *dims] with batch read from `like` at run time (dynamic batch survives)."""
    shape = build.op(f"{name}/shape", "Shape", [like], None, start=0, end=1)
    return build.op(name, "Concat", [shape, build.const(f"{name}/dims", np.array(dims, dtype=np.int64))], None, axis=0)


def _head_mean_keys(build: _Builder, block: Block, shapes) -> ir.Value:
    """The block's keys averaged over heads, [B, N, d]: the metric of the merging and pruning methods."""
    keys = block.keys
    shape = shapes.get(keys.name)
    if shape is None or len(shape) != 4:
        raise UsageError(f"block {block.index}: the attention keys '{keys.name}' are "
                         f"{list(shape) if shape is not None else 'of unknown shape'}, not laid out [batch, heads, "
                         "dim, tokens]; tcexport reads the metric from keys of that layout")
    source, tokens_last = _key_source(keys, shapes)
    batch, heads, dim, n = shape
    prefix = f"tc_blk{block.index}/metric"
    # The mean over heads as a [1, H] @ [H, N*d] product: one GEMV, several times faster on ONNX Runtime's CPU
    # provider than a ReduceMean over a leading axis. The reshapes carry no token count (0 and -1 only).
    flat = build.op(f"{prefix}/flat", "Reshape", [source, build.const(f"{prefix}/flat_shape", np.array([0, 0, -1]))],
                    (batch, heads, n * dim))
    weights = build.const(f"{prefix}/head_weights", np.full((1, heads), 1.0 / heads, dtype=numpy_dtype(source)))
    mean = build.op(f"{prefix}/head_mean", "MatMul", [weights, flat], (batch, 1, n * dim))
    if not tokens_last:
        return build.op(prefix, "Reshape", [mean, build.const(f"{prefix}/shape", np.array([0, -1, dim]))],
                        (batch, n, dim))
    rows = build.op(f"{prefix}/rows", "Reshape", [mean, build.const(f"{prefix}/shape", np.array([0, dim, -1]))],
                    (batch, dim, n))
    return build.op(prefix, "Transpose", [rows], (batch, n, dim), perm=[0, 2, 1])


def _key_source(keys: ir.Value, shapes) -> tuple[ir.Value, bool]:
    """Where to read the keys for the metric: (value, whether its tokens are the last axis).

    The logits' right operand is often K^T times a scale, built by Transpose/Reshape from K [B, H, N, d]. Reading
    it there makes the metric cheaper (no Transpose after the head mean) and, more importantly, leaves the
    scale Mul and the Transpose with the logits MatMul as their only consumer, so ONNX Runtime can still fuse
    them into it. Only steps that keep the metric's cosines are walked back through: a Mul or Div by one
    constant number, a Transpose of the last two axes, and a Reshape that only regroups the leading (batch,
    head) axes. The result is the furthest [B, H, N, d] value on that path, else the furthest [B, H, d, N] one."""
    batch_heads = shapes[keys.name][:2]
    value, tokens_last = keys, True
    best = (keys, True)
    while (producer := value.producer()) is not None:
        if producer.op_type in ("Mul", "Div") and len(producer.inputs) == 2:
            scalars = [(array := const_array(v)) is not None and array.size == 1 for v in producer.inputs]
            if producer.op_type == "Div" and scalars == [False, True]:
                value = producer.inputs[0]
            elif producer.op_type == "Mul" and sum(scalars) == 1:
                value = producer.inputs[scalars.index(False)]
            else:
                break
        elif producer.op_type == "Transpose":
            perm = list(producer.attributes["perm"].as_ints()) if "perm" in producer.attributes else []
            rank = len(perm)
            if rank < 3 or perm[:-2] != list(range(rank - 2)) or sorted(perm[-2:]) != [rank - 2, rank - 1]:
                break
            value, tokens_last = producer.inputs[0], tokens_last != (perm[-2] == rank - 1)
        elif producer.op_type == "Reshape":
            before, after = shapes.get(producer.inputs[0].name), shapes.get(value.name)
            if (before is None or after is None or len(before) < 3 or before[-2:] != after[-2:]
                    or int(np.prod(before[:-2])) != int(np.prod(after[:-2]))):
                break
            value = producer.inputs[0]
        else:
            break
        here = shapes.get(value.name)
        if here is not None and len(here) == 4 and tuple(here[:2]) == tuple(batch_heads):
            best = (value, tokens_last)
            if not tokens_last:
                break
    return best


def _query_input(graph: ir.Graph, block: Block, shapes, existing: ir.Value | None) -> ir.Value:
    """The graph input "query" [batch, C], C = the width of the block's hidden state; created once."""
    hidden = shapes.get(block.hidden.name)
    if hidden is None or len(hidden) != 3:
        raise UsageError(f"block {block.index}: could not measure the hidden state the query is compared with")
    width = int(hidden[2])
    if existing is not None:
        if existing.shape[1] != width:
            raise UsageError(f"block {block.index} is {width} wide but the query input is {existing.shape[1]} wide "
                             "(set by an earlier block); use the query method on blocks of one width")
        return existing
    if any(v.name == QUERY_INPUT for v in [*graph.inputs, *graph.outputs, *graph.initializers.values()]):
        raise UsageError(f"the model already has an input, output or weight named '{QUERY_INPUT}'; the query "
                         "method adds an input of that name")
    for node in graph:  # free the name for the new input (inner value names do not matter)
        for out in node.outputs:
            if out.name == QUERY_INPUT:
                out.name = f"{QUERY_INPUT}__inner"
    value = ir.Value(name=QUERY_INPUT, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", width]))
    graph.inputs.append(value)
    return value


def _cls_attention(build: _Builder, block: Block, shapes) -> ir.Value:
    """How much the CLS token (query 0) attends to each token, averaged over heads: [B, N].

    Taken from this block's Softmax output, so masks and proportional attention are already in it."""
    probs = block.softmax.outputs[0]
    shape = shapes.get(probs.name)
    if shape is None or len(shape) != 4:
        raise UsageError(f"block {block.index}: the attention probabilities '{probs.name}' are "
                         f"{list(shape) if shape is not None else 'of unknown shape'}, not laid out [batch, heads, "
                         "queries, keys]; tcexport reads the CLS attention from probabilities of that layout")
    prefix = f"tc_blk{block.index}/cls_attention"
    row = build.op(f"{prefix}/row", "Gather", [probs, build.const(f"{prefix}/query0", np.array(0))],
                   (shape[0], shape[1], shape[3]), axis=2)
    return build.op(prefix, "ReduceMean", [row, build.const(f"{prefix}/axes", np.array([1]))],
                    (shape[0], shape[3]), keepdims=0)


def _add_log_size_bias(build: _Builder, softmax: ir.Node, state: TokenState, shapes, n0: int, label: str) -> None:
    """Proportional attention: logits + log(size) over the key axis, so a merged token keeps its weight.

    The keys may be the tokens after a fixed prefix (an attention pool over x[:, 1:]): then so is the size.
    Logits [B,H,Nq,Nk] take the bias as [B,1,1,Nk]; nn.MultiheadAttention's [B*H,Nq,Nk] as the same, repeated
    per head (batch-major, as torch lays them out)."""
    logits = softmax.inputs[0]
    prefix = f"{label}/prop_attn"
    keys = shapes[logits.name][-1]
    skipped = n0 - keys  # leading tokens the keys leave out, as counted in the original graph
    size = state.size
    if skipped:
        size = build.op(f"{prefix}/keys_size", "Slice", [size, build.const(f"{prefix}/start", np.array([skipped])),
                                                          build.const(f"{prefix}/end", np.array([state.count])),
                                                          build.const(f"{prefix}/axis", np.array([1]))],
                        (PROBE_BATCH, keys, 1))
    log = build.op(f"{prefix}/log_size", "Log", [size], (PROBE_BATCH, keys, 1))
    logits_shape = shapes[logits.name]
    bias = build.op(f"{prefix}/bias", "Reshape", [log, build.const(f"{prefix}/bias_shape", np.array([-1, 1, 1, keys]))],
                    (PROBE_BATCH, 1, 1, keys))
    if len(logits_shape) == 3:
        heads = logits_shape[0] // PROBE_BATCH
        per_head = build.op(f"{prefix}/per_head", "Expand", [bias, build.const(f"{prefix}/heads",
                                                                                np.array([1, heads, 1, 1]))],
                            (PROBE_BATCH, heads, 1, keys))
        bias = build.op(f"{prefix}/bias_rows", "Reshape", [per_head, build.const(f"{prefix}/rows",
                                                                                 np.array([-1, 1, keys]))],
                        (PROBE_BATCH * heads, 1, keys))
    biased = build.op(prefix, "Add", [logits, bias], shapes[logits.name])
    softmax.replace_input_with(0, biased)


def _mask_term_on_logits(block: Block, mask_input: ir.Value | None, shapes, n0: int) -> ir.Node | None:
    """The one Add that puts the attention mask on this block's [B, H, N, N] logits, if there is exactly one.

    Proportional attention then rides on it: the rebuilt mask bias is log(size) for real tokens instead of 0
    (padding keeps float32 min, which absorbs any log(size)), so the block needs no Add of its own over the
    logits. Anything else (no mask, two mask terms, keys that leave out a prefix, 3-D logits) gets its own Add."""
    if mask_input is None:
        return None
    logits_shape = shapes.get(block.softmax.inputs[0].name)
    if logits_shape is None or len(logits_shape) != 4 or logits_shape[-1] != n0:
        return None
    scores = block.logits_matmul.outputs[0]

    def meets(node: ir.Node) -> bool:  # where an operand computed from the mask, not the scores, meets the scores
        data = [v for v in node.inputs if v is not None and const_array(v) is None]
        from_scores = [_descends_from(v, scores) for v in data]
        return any(from_scores) and any(not s and _descends_from(v, mask_input) for v, s in zip(data, from_scores))

    terms = [node for node in _logit_path(block) if meets(node)]
    if len(terms) != 1 or terms[0].op_type != "Add":
        return None
    return terms[0]


def _logit_path(block: Block, branches: bool = False) -> set[ir.Node]:
    """Nodes between the logits MatMul and the Softmax (where attention masks are added); with `branches`, those
    of the block's parallel attentions too."""
    found, stack = set(), [s.inputs[0] for s in (block.softmaxes if branches else [block.softmax])]
    while stack:
        value = stack.pop()
        node = value.producer() if value is not None else None
        if node is None or node in found or node.op_type not in LOGIT_PATH_OPS:
            continue
        found.add(node)
        stack.extend(node.inputs)
    return found


class _SideInputs:
    """Replacements for operands that carry the original token axis without descending from a method."""

    def __init__(self, build: _Builder, states: list[TokenState], mask_input: ir.Value | None,
                 logit_nodes: set[ir.Node], shapes, protected: int, skip: set[ir.Node],
                 folded_bias: set[ir.Node] = frozenset(), window_nodes: dict | None = None):
        self.build = build
        self.folded_bias = folded_bias
        self.window_nodes = window_nodes or {}  # logit-path node -> the sliding window of its block
        self.served_windows: set[int] = set()  # blocks whose mask was rebuilt with their window
        self.served_log_size: set[ir.Node] = set()  # folded mask Adds whose operand was rebuilt with log(size)
        self.states = states
        self.mask_input = mask_input
        self.logit_nodes = logit_nodes
        self.shapes = shapes
        self.tracker: TokenTracker | None = None
        self.cache: dict[tuple, ir.Value] = {}
        self.positions = positions_mod.Positions(build, states, protected, skip)

    def __call__(self, node: ir.Node, index: int, stage: int, axes: list[int], delta: int) -> ir.Value:
        """Mask terms are rebuilt from the current mask; anything else is a position term, gathered."""
        operand = node.inputs[index]
        if self.mask_input is None or not self._mask_data(node, operand, delta):
            out_rank = len(self.shapes_of(node.outputs[0]))
            key = ("position", operand, stage, tuple(axes), delta, out_rank)
            if key not in self.cache:
                self._refuse_skip_connection(node, operand)
                self.cache[key] = self.positions.gather(operand, self.shapes_of(operand), axes, delta, stage, out_rank)
            return self.cache[key]
        in_logits = node in self.logit_nodes
        with_log_size = node in self.folded_bias
        if with_log_size:
            self.served_log_size.add(node)
        rank = len(self.shapes_of(operand))
        shift = len(self.shapes_of(node.outputs[0])) - rank
        picked = not in_logits and pooling_mod.picks_tokens(node, [a + shift for a in axes], rank + shift)
        window = self.window_nodes.get(node) if in_logits else None
        if window is not None:
            self.served_windows.add(window.block)
        band = (window.before, window.after) if window is not None else None
        key = ("bias", stage, with_log_size, band) if in_logits else ("mask", operand, stage, picked)
        if key not in self.cache:
            if in_logits:
                self.cache[key] = self._attention_bias(stage, with_log_size, band)
            else:  # tokens picked one by one see the current mask; tokens summed, how many they hold
                self.cache[key] = self._rebuild(operand, self._real(stage) if picked else self._weights(stage))
                for user, i in pooling_mod.reductions_of(operand, node, axes, rank, self._upstream()):
                    user.replace_input_with(i, self.cache[key])  # a mean's denominator sums what it weighted
            self._visit_new(self.cache[key])
        if not in_logits:
            return self.cache[key]
        terms = self._position_terms_in_mask(operand, self.tracker.n0 + delta)
        if not terms:
            return self.cache[key]
        combined = self.cache[key]
        out_rank = len(self.shapes_of(node.outputs[0]))
        for term in terms:  # each follows the tokens as a position term does, added back onto the rebuilt mask
            shape = self.shapes_of(term)
            position_key = ("position", term, stage, (len(shape) - 2, len(shape) - 1), delta, out_rank)
            if position_key not in self.cache:
                self.cache[position_key] = self.positions.gather(term, shape, [len(shape) - 2, len(shape) - 1],
                                                                 delta, stage, out_rank)
            combined = self.build.op(f"tc_stage{stage}/mask_with_position_term", "Add",
                                     [combined, self.cache[position_key]], None)
        return combined

    def _position_terms_in_mask(self, operand: ir.Value, tokens: int) -> list[ir.Value]:
        """Position terms folded into a mask operand of the logits: the values over token pairs ([..., N, N], float,
        not computed from the mask) that an Add adds to the mask, or a Where keeps where the mask allows
        (transformers' SDPA path folds T5's position_bias into its mask: Where(mask, position_bias, min)). Rebuilding
        the mask alone would drop them; each is gathered at the current positions and added back, which is what
        the fold means. Combined with the mask any other way, the model is refused."""
        terms, stack, seen = [], [operand], set()
        while stack:
            value = stack.pop()
            if value is None or value in seen:
                continue
            seen.add(value)
            node = value.producer()
            if node is None or not _descends_from(value, self.mask_input):
                continue
            for index, item in enumerate(node.inputs):  # a constant counts: the exporter folds T5's bias into one
                if item is None:
                    continue
                if _descends_from(item, self.mask_input):
                    stack.append(item)
                    continue
                shape = self.shapes.get(item.name)
                floating = item.dtype in (None, ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
                if not shape or len(shape) < 2 or tuple(shape[-2:]) != (tokens, tokens) or not floating:
                    continue
                if node.op_type == "Add" or (node.op_type == "Where" and index == 1):
                    terms.append(item)
                else:
                    raise UsageError(f"the attention mask of the logits is combined with a term over token pairs "
                                     f"'{item.name}' by {node.op_type} '{node.name}'; tcexport follows such a term "
                                     "when it is added to the mask, and cannot compress this model")
        return terms

    def _mask_data(self, node: ir.Node, operand: ir.Value, delta: int) -> bool:
        """Whether `operand` is mask data, rebuilt from the current tokens, rather than a position term. Outside the
        attention logits only what is computed from the mask token by token is (graph/pooling.py); a per-row
        statistic of it combined with the original positions (weightedmean's arange - padding) is a position term."""
        if not _descends_from(operand, self.mask_input):
            return False
        return node in self.logit_nodes or pooling_mod.mask_along_tokens(
            operand, self.mask_input, lambda v: self.shapes.get(v.name), self.tracker.n0 + delta)

    def _upstream(self) -> set[ir.Node]:
        """The nodes the first compression is computed from (their uses of the mask stay as they are)."""
        if "upstream" not in self.cache:
            self.cache["upstream"] = pooling_mod.ancestors(self.states[0].inputs.x)
        return self.cache["upstream"]

    def token_index(self, node: ir.Node, stage: int) -> ir.Value:
        """Indices for a GatherElements that picks tokens where the mask says (cls, lasttoken): graph/pooling.py."""
        from_mask = self.mask_input is not None and _descends_from(node.inputs[1], self.mask_input)
        positions = self.positions.of_stage(stage) if from_mask else None
        return pooling_mod.token_index(self.build, node, self.states[stage], positions, from_mask,
                                       self.shapes_of(node.inputs[0]))

    def _refuse_skip_connection(self, node: ir.Node, operand: ir.Value) -> None:
        """A position term is computed from constants and shapes only. An operand computed from the model's input
        data is the tokens' own state from before a compression, carried around it (MobileBERT's bottleneck adds
        the block input back after the feed-forward stack): merging or pruning cannot be applied to it as to
        x, so the model is refused rather than given a gathered copy."""
        data = [v for v in self.build.graph.inputs if v is not self.mask_input and v.name != QUERY_INPUT]
        if any(_descends_from(operand, v) for v in data):
            raise UsageError(f"'{node.name}' ({node.op_type}) combines the compressed tokens with '{operand.name}', "
                             "which is computed from the model input before the compression and still holds all its "
                             "tokens: a skip connection around the compressed point (as MobileBERT's bottleneck adds "
                             "each layer's input back after its feed-forward stack); tcexport compresses models whose "
                             "only skip around a compressed point is the residual around attention")

    def shapes_of(self, value: ir.Value) -> tuple[int, ...]:
        shape = self.tracker.shape(value) if self.tracker is not None else self.shapes.get(value.name)
        if shape is None:
            raise UsageError(f"no run-time shape for value '{value.name}'; tcexport cannot follow the token axis")
        return shape

    def mean(self, node: ir.Node, stage: int, axis: int, delta: int) -> ir.Value:
        """A ReduceMean over the tokens, size-weighted: sum(x * size) / sum(size) over the same tokens."""
        return positions_mod.weighted_mean(self.build, node, self.states[stage], axis, delta,
                                           self.shapes_of(node.inputs[0]))

    def _attention_bias(self, stage: int, with_log_size: bool = False,
                        window: tuple[int, int] | None = None) -> ir.Value:
        """Additive key mask from the current mask: 0 for real tokens, float32 min for padding; with_log_size,
        log(size) for real tokens instead of 0 (proportional attention folded into the mask's Add). With a
        sliding `window` (before, after), [B, 1, N, N]: key j is also hidden from query i unless
        -before <= position_j - position_i <= after, at the tokens' original positions."""
        state, build = self.states[stage], self.build
        n0 = build.aliases[state.mask][1]
        prefix = f"tc_stage{stage}/attention_mask" + ("_log_size" if with_log_size else "")
        if window is not None:
            prefix += f"_window{window[0]}_{window[1]}"
        real = build.op(f"{prefix}/is_real", "Greater", [state.mask, build.const(f"{prefix}/half", np.float32(0.5))],
                        (PROBE_BATCH, n0))
        row = build.op(f"{prefix}/row", "Unsqueeze", [real, build.const(f"{prefix}/axes", np.array([1, 2]))],
                       (PROBE_BATCH, 1, 1, n0))
        if window is not None:
            row = build.op(f"{prefix}/in_window", "And", [self._window(stage, window, prefix), row],
                           (PROBE_BATCH, 1, n0, n0))
        if with_log_size:
            log = build.op(f"{prefix}/log_size", "Log", [state.size], (PROBE_BATCH, n0, 1))
            # [0, 1, 1, -1]: batch copied, tokens inferred, so the shape holds no token count to keep up to date.
            keep = build.op(f"{prefix}/log_size_row", "Reshape", [log, build.const(f"{prefix}/row_shape",
                                                                                  np.array([0, 1, 1, -1]))],
                            (PROBE_BATCH, 1, 1, n0))
        else:
            keep = build.const(f"{prefix}/zero", np.float32(0.0))
        low = build.const(f"{prefix}/min", np.float32(MASK_MIN))
        return build.op(prefix, "Where", [row, keep, low], (PROBE_BATCH, 1, n0 if window else 1, n0))

    def _window(self, stage: int, window: tuple[int, int], prefix: str) -> ir.Value:
        """[B, 1, N, N] bool: -before <= position_j - position_i <= after, positions being the original index each
        current token stands at (graph/positions.py). Built from the positions alone, so the tracker, which
        follows the token axis from the methods' outputs, never needs to change it."""
        build = self.build
        before, after = window
        positions = self.positions.of_stage(stage)
        queries = build.op(f"{prefix}/query_positions", "Unsqueeze", [positions, build.const(
            f"{prefix}/query_axis", np.array([2]))], None)
        keys = build.op(f"{prefix}/key_positions", "Unsqueeze", [positions, build.const(f"{prefix}/key_axis",
                                                                                         np.array([1]))], None)
        offset = build.op(f"{prefix}/offset", "Sub", [keys, queries], None)  # [B, N, N]: j - i
        inside = build.op(f"{prefix}/inside", "And", [
            build.op(f"{prefix}/not_too_early", "GreaterOrEqual", [offset, build.const(
                f"{prefix}/before", np.array(-before, dtype=np.int64))], None),
            build.op(f"{prefix}/not_too_late", "LessOrEqual", [offset, build.const(
                f"{prefix}/after", np.array(after, dtype=np.int64))], None)], None)
        return build.op(f"{prefix}/window", "Unsqueeze", [inside, build.const(f"{prefix}/head_axis",
                                                                               np.array([1]))], None)

    def _weights(self, stage: int) -> ir.Value:
        """mask * size as the attention_mask input's dtype: how many real original tokens each token holds."""
        key = ("weights", stage)
        if key not in self.cache:
            state, build = self.states[stage], self.build
            n0 = build.aliases[state.mask][1]
            prefix = f"tc_stage{stage}/weights"
            flat = build.op(f"{prefix}/size", "Squeeze", [state.size, build.const(f"{prefix}/axes", np.array([2]))],
                            (PROBE_BATCH, n0))
            weighted = build.op(f"{prefix}/mul", "Mul", [state.mask, flat], (PROBE_BATCH, n0))
            rounded = build.op(f"{prefix}/round", "Round", [weighted], (PROBE_BATCH, n0))
            self.cache[key] = build.op(prefix, "Cast", [rounded], (PROBE_BATCH, n0), to=self.mask_input.dtype)
        return self.cache[key]

    def _real(self, stage: int) -> ir.Value:
        """The current mask as the attention_mask input's dtype: 1 for a real token, 0 for padding."""
        key = ("real", stage)
        if key not in self.cache:
            state, build = self.states[stage], self.build
            self.cache[key] = build.op(f"tc_stage{stage}/real", "Cast", [state.mask], build.aliases[state.mask],
                                       to=self.mask_input.dtype)
        return self.cache[key]

    def _rebuild(self, operand: ir.Value, weights: ir.Value) -> ir.Value:
        """Clone the chain that computes `operand` from the mask input token by token, feeding it `weights` instead;
        per-row statistics of the mask (no token axis) and constants stay as they are (graph/pooling.py)."""
        if operand is self.mask_input:
            return weights
        producer = operand.producer()
        inputs = []
        for value in producer.inputs:
            if value is not None and const_array(value) is None and pooling_mod.mask_along_tokens(
                    value, self.mask_input, lambda v: self.shapes.get(v.name), self.tracker.n0):
                inputs.append(self._rebuild(value, weights))
            else:
                inputs.append(value)
        clone = ir.Node(producer.domain, producer.op_type, inputs, attributes=list(producer.attributes.values()),
                        num_outputs=len(producer.outputs), name=self.build.unique(f"{producer.name}/tokens"))
        for out, original in zip(clone.outputs, producer.outputs):
            out.name = self.build.unique(f"{original.name}_tokens")
            if original.name in self.shapes:
                self.build.aliases[out] = self.shapes[original.name]
        self.build.graph.append(clone)
        self.build.nodes.append(clone)
        return clone.outputs[list(producer.outputs).index(operand)]

    def _visit_new(self, value: ir.Value) -> None:
        """Let the tracker see freshly built nodes (producers first) so their constants get fixed too."""
        order: list[ir.Node] = []
        seen: set[ir.Node] = set()

        def walk(v: ir.Value | None) -> None:
            node = v.producer() if v is not None else None
            if node is None or node in seen or node not in self.build.nodes:
                return
            seen.add(node)
            for i in node.inputs:
                walk(i)
            order.append(node)

        walk(value)
        for node in order:
            self.tracker.visit(node)


def _check_windows_kept(blocks: list[Block], windows: dict, states: list[TokenState], mask_input: ir.Value | None,
                        served: set[int]) -> None:
    """Every sliding-window block after the first compression must have had its mask rebuilt with its window.

    Without an attention-mask input a window is a constant [N, N] term, gathered at the tokens' positions as any
    position term is; with one, the rebuilt attention bias must carry it."""
    if not states or mask_input is None:
        return
    first = states[0].inputs.block
    lost = [b.index for b in blocks if b.index in windows and b.index > first and b.index not in served]
    if lost:
        raise UsageError(f"block {lost[0]} applies {windows[lost[0]].describe()}, but the mask does not reach its "
                         "logits as the rebuilt attention mask does; tcexport cannot keep the window after "
                         "compression, so it does not compress this model")


def _descends_from(value: ir.Value, root: ir.Value) -> bool:
    """Whether `value` is computed from the data of `root`. Shapes do not count: an exporter may read the batch
    size off any input (MPNet's position bias is expanded to Shape(attention_mask)[0]) without using its values."""
    stack, seen = [value], set()
    while stack:
        v = stack.pop()
        if v is root:
            return True
        if v is None or v in seen:
            continue
        seen.add(v)
        producer = v.producer()
        if producer is not None and producer.op_type not in ("Shape", "Size"):
            stack.extend(producer.inputs)
    return False


def _forget_stale_shapes(graph: ir.Graph, tracker: TokenTracker) -> None:
    """Shapes recorded by the exporter still say the old token count: drop them for shape inference to redo,
    and give graph outputs that hold tokens their new count (the others keep their declared shape)."""
    outputs = set(graph.outputs)
    for node in graph:
        for out in node.outputs:
            if out not in outputs:
                out.type = None
                out.shape = None
    for out in outputs:
        tokens = tracker.tracked.get(out)
        if tokens is None or out.shape is None:
            continue
        dims = list(out.shape)
        for axis in tokens.axes:
            dims[axis] = tracker.stage_counts[tokens.stage] + tokens.delta
        out.shape = ir.Shape(dims)
