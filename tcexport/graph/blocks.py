"""Find the transformer blocks of an ONNX graph and the values a token-compression method needs in each.

A block is anchored on its attention Softmax (one per block, in graph order). From there, structurally:

    logits MatMul   the MatMul that feeds the Softmax (through scale/bias Adds, Muls, Wheres)
    keys            its right operand, K^T laid out [B, H, d, N]; the method metric is its mean over heads
    residual Add    the first Add after the Softmax that adds the block's input (an ancestor of the Softmax)
                    to something computed from the attention (a descendant)
    hidden          the state between attention and MLP: the residual Add's output (pre-LN, timm) or the
                    LayerNormalization right after it (post-LN, BERT)

Parallel attention (timm's ParallelThingsBlock, `x + attn_1(x) + attn_2(x)`): several Softmaxes whose residual
Add is the same node, none computed from another, are the branches of one block. The first branch's keys and
probabilities are the block's (its metric and CLS attention); the method runs on the shared residual Add's
output, after the branches are summed; every branch gets proportional attention in later blocks.

The same rules hold for graphs from the dynamo exporter, the TorchScript exporter and stripped files. When the
dynamo exporter's module scopes (`pkg.torch.onnx.name_scopes`) are present, each block is also named by its
module (`blocks.5`, `encoder.layer.5`) and the scopes must agree with the structural result.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

import onnx_ir as ir

from tcexport.core.errors import UsageError

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
# Ops allowed between the logits MatMul and the Softmax: scaling, masks, biases, casts.
LOGIT_PATH_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Cast", "Identity"}
_BLOCK_SCOPE = re.compile(r"^(.*\.)?\d+$")


@dataclass
class Block:
    index: int
    softmax: ir.Node
    logits_matmul: ir.Node
    residual_add: ir.Node
    hidden: ir.Value  # what the MLP sublayer consumes; a method replaces it
    scope: str | None = None
    branches: list[ir.Node] = field(default_factory=list)  # Softmaxes of parallel attentions after the first

    @property
    def softmaxes(self) -> list[ir.Node]:
        """Every attention Softmax of the block: the first branch's, then the parallel ones."""
        return [self.softmax, *self.branches]

    @property
    def keys(self) -> ir.Value:
        return self.logits_matmul.inputs[1]

    def summary(self) -> dict:
        found = {"index": self.index, "scope": self.scope, "softmax": self.softmax.name,
                 "hidden": self.hidden.name, "post_norm": self.hidden.producer() is not self.residual_add}
        if self.branches:
            found["parallel_softmaxes"] = [s.name for s in self.branches]
        return found


def node_scopes(node: ir.Node) -> list[str]:
    text = node.metadata_props.get(SCOPES_KEY)
    if not text:
        return []
    try:
        scopes = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return []
    return [s for s in scopes if isinstance(s, str)]


def block_scope(node: ir.Node) -> str | None:
    """The deepest module scope that ends in an index (`blocks.5`, `st.0.model.encoder.layer.5`)."""
    candidates = [s for s in node_scopes(node) if _BLOCK_SCOPE.match(s) and "." in s]
    return candidates[-1] if candidates else None


def _shared_block_scope(nodes: list[ir.Node]) -> str | None:
    """The deepest block scope all of `nodes` lie in (`blocks.0` for `blocks.0.attns.0` and `blocks.0.attns.1`)."""
    if len(nodes) == 1:
        return block_scope(nodes[0])
    shared = [s for s in node_scopes(nodes[0]) if _BLOCK_SCOPE.match(s) and "." in s]
    for node in nodes[1:]:
        scopes = set(node_scopes(node))
        shared = [s for s in shared if s in scopes]
    return shared[-1] if shared else None


def _is_constant(value: ir.Value | None) -> bool:
    """A weight or a constant, also behind Identity nodes (the TorchScript exporter shares equal weights so)."""
    if value is None:
        return True
    if value.const_value is not None:
        return True
    producer = value.producer()
    if producer is not None and producer.op_type == "Identity" and producer.inputs:
        return _is_constant(producer.inputs[0])
    return producer is not None and producer.op_type == "Constant"


def _descendants(start: ir.Node) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        for out in node.outputs:
            for consumer in out.consumers():
                if consumer not in seen:
                    seen.add(consumer)
                    stack.append(consumer)
    return seen


def _ancestor_values(start: ir.Node) -> set[ir.Value]:
    seen: set[ir.Value] = set()
    stack = [v for v in start.inputs if v is not None]
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        producer = value.producer()
        if producer is not None:
            stack.extend(v for v in producer.inputs if v is not None)
    return seen


def _logits_matmul(softmax: ir.Node, shapes: dict | None = None) -> ir.Node:
    frontier = [softmax.inputs[0]]
    stops: list[ir.Node] = []  # ops on the way that are neither the MatMul nor scaling/mask/bias
    for _ in range(8):
        next_frontier = []
        for value in frontier:
            producer = value.producer() if value is not None else None
            if producer is None:
                continue
            if producer.op_type == "MatMul":
                return producer
            if producer.op_type in LOGIT_PATH_OPS:
                next_frontier.extend(v for v in producer.inputs if v is not None and not _is_constant(v))
            elif producer not in stops:
                stops.append(producer)
        frontier = next_frontier
    raise UsageError(_why_no_logits_matmul(softmax, stops, shapes))


def _why_no_logits_matmul(softmax: ir.Node, stops: list[ir.Node], shapes: dict | None) -> str:
    """What stands between the Softmax and the MatMul of queries and keys, in words."""
    head = (f"found no MatMul of queries and keys feeding attention Softmax {_where(softmax)} through scaling, "
            "mask and bias ops only")
    tail = "; tcexport reads each block's keys and logits from that MatMul"
    nearby: list[ir.Node] = []  # the ops behind the stops, nearest first
    frontier = [v for n in stops for v in n.inputs if v is not None and not _is_constant(v)]
    for _ in range(6):
        following = []
        for value in frontier:
            node = value.producer()
            if node is not None and node not in nearby:
                nearby.append(node)
                following.extend(v for v in node.inputs if v is not None and not _is_constant(v))
        frontier = following
    weighted = [n for n in nearby if n.op_type in ("MatMul", "Gemm") and any(_is_constant(v) for v in n.inputs)]
    scores = [n for n in nearby if n.op_type == "MatMul" and not any(_is_constant(v) for v in n.inputs)]

    def shape(value: ir.Value) -> str:
        found = _value_shape(value, shapes)
        return f" {list(found)}" if found is not None else ""

    if weighted and (not scores or nearby.index(weighted[0]) < nearby.index(scores[0])):
        return (f"{head}: the logits are mixed across heads by a learned weight (MatMul '{weighted[0].name}' by "
                f"'{next(v.name for v in weighted[0].inputs if _is_constant(v))}'{shape(weighted[0].inputs[1])}) "
                "before the Softmax, as in CaiT's talking-heads attention" + tail)
    gathered = [n for n in nearby if n.op_type in ("GatherElements", "GatherND")]
    relative = (f", plus terms gathered by relative distance ({gathered[0].op_type} '{gathered[0].name}': "
                "disentangled position attention)") if gathered else ""
    if scores and (rank := _value_shape(scores[0].outputs[0], shapes)) is not None and len(rank) == 3:
        return (f"{head}: the logits are computed with the heads folded into the batch (MatMul '{scores[0].name}'"
                f"{shape(scores[0].outputs[0])}, [batch*heads, tokens, tokens]{relative}) and reshaped to [batch, "
                f"heads, tokens, tokens] only before the Softmax, as in DeBERTa" + tail)
    met = ", ".join(f"{n.op_type} '{n.name}'" for n in stops[:3]) or "no op"
    return f"{head}: the path meets {met}" + tail


def _value_shape(value: ir.Value, shapes: dict | None) -> tuple | None:
    found = shapes.get(value.name) if shapes else None
    if found is None and value.shape is not None:
        found = tuple(value.shape)
    return tuple(found) if found is not None else None


def _residual_add(softmax: ir.Node, order: dict[ir.Node, int]) -> ir.Node:
    after = _descendants(softmax)
    before = _ancestor_values(softmax)
    after_values = {out for node in after for out in node.outputs}
    candidates, joins = [], []  # joins: Adds of the attention's result with anything else it was not computed from
    for node in after:
        if node.op_type != "Add" or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if (a in before and b in after_values) or (b in before and a in after_values):
            residual = a if a in before else b
            if not _is_constant(residual):
                candidates.append(node)
        if (a in after_values) != (b in after_values):
            other = b if a in after_values else a
            if not _is_constant(other) and other.producer() is not None:  # computed, not a weight or an input
                joins.append((node, other))
    if not candidates:
        raise UsageError(f"found no residual Add after attention Softmax '{softmax.name}'; tcexport needs a "
                         "transformer block with a residual connection around attention")
    residual = min(candidates, key=order.__getitem__)
    first, other = min(joins, key=lambda join: order[join[0]])
    if first is not residual:  # the eager reference takes the first join as the block boundary: both must agree
        raise UsageError(f"after attention Softmax '{softmax.name}', '{first.name}' adds its output to "
                         f"'{other.name}', which the attention was not computed from, and the block's input comes "
                         f"back only at '{residual.name}' (a bottleneck block, as in MobileBERT: the residual around "
                         "attention is a projection of the block's input, and the input itself skips the whole "
                         "block); tcexport compresses blocks whose residual around attention is the block's input")
    return residual


def _hidden_after(residual_add: ir.Node) -> ir.Value:
    out = residual_add.outputs[0]
    consumers = list(out.consumers())
    if len(consumers) == 1 and consumers[0].op_type == "LayerNormalization":
        return consumers[0].outputs[0]  # post-LN (BERT): the norm's output feeds MLP and residual
    return out


def _attention_softmaxes(graph: ir.Graph) -> list[ir.Node]:
    softmaxes = [node for node in graph if node.op_type == "Softmax"]
    if not softmaxes:
        fused = [node for node in graph if node.op_type in ("Attention", "MultiHeadAttention")]
        if fused:
            raise UsageError(f"the graph holds fused '{fused[0].op_type}' nodes instead of a decomposed attention; "
                             "re-export with opset <= 22 so each block's Softmax is visible")
        raise UsageError("found no attention Softmax in the graph: tcexport compresses transformers with global "
                         "self-attention, and this graph has none (a convolutional network such as ConvNeXt?)")
    return softmaxes


def _is_pooling(softmax: ir.Node, shapes: dict | None) -> bool:
    """A Softmax over [.., Nq, Nk] logits with Nq != Nk: a probe attending over the tokens, not a block.

    Without run-time shapes, the exporter's static ones (when it wrote them) decide."""
    logits = softmax.inputs[0]
    shape = shapes.get(logits.name) if shapes else (list(logits.shape) if logits.shape is not None else None)
    return (shape is not None and len(shape) >= 3 and all(isinstance(d, int) for d in shape[-2:])
            and shape[-2] != shape[-1])


def find_pool_attentions(graph: ir.Graph, shapes: dict) -> list[ir.Node]:
    """Softmax nodes of attentions that pool the tokens with a learned probe (SigLIP's MAP head, timm attn_pool)."""
    return [s for s in _attention_softmaxes(graph) if _is_pooling(s, shapes)]


def find_blocks(graph: ir.Graph, shapes: dict | None = None) -> list[Block]:
    """All attention blocks in graph order. Raises UsageError when the graph has none or an odd layout.

    With the run-time `shapes` (graph/probe.py), pooling attentions are told apart from blocks, and attention that
    does not span the block's tokens (windowed, as in Swin) is refused."""
    order = {node: i for i, node in enumerate(graph)}
    every = _attention_softmaxes(graph)
    softmaxes = [s for s in every if not _is_pooling(s, shapes)]
    if not softmaxes:
        raise UsageError(_no_self_attention(every, shapes))
    _refuse_subsampling_attention([s for s in every if _is_pooling(s, shapes)], softmaxes, shapes)
    blocks: list[Block] = []
    for softmax in softmaxes:
        matmul = _logits_matmul(softmax, shapes)
        residual = _residual_add(softmax, order)
        index = len(blocks)
        if blocks and residual is blocks[-1].residual_add:  # a parallel branch of the block before (module doc)
            _check_parallel(blocks[-1], softmax, shapes)
            blocks[-1].branches.append(softmax)
            continue
        hidden = _hidden_after(residual)
        hidden_shape = shapes.get(hidden.name) if shapes else (tuple(hidden.shape) if hidden.shape else None)
        if hidden_shape is not None and len(hidden_shape) != 3:
            raise UsageError(f"block {index}: the hidden state '{hidden.name}' has rank {len(hidden_shape)}, "
                             "expected [batch, tokens, channels]; tcexport compresses transformers with global "
                             "self-attention over a token sequence (not windowed attention on a grid, as in Swin)")
        # With run-time shapes (an uncompressed graph, as compress and tune probe it; inspect reads compressed ones
        # without them), every block holds the same tokens.
        if shapes and blocks and hidden_shape is not None and (first := _tokens_of(blocks[0], shapes)) is not None \
                and hidden_shape[1] != first:
            raise UsageError(f"block {index} holds {hidden_shape[1]} tokens where block 0 holds {first}: the model "
                             "changes the token count between its blocks itself (a pooling layer between stages, as in PiT); "
                             "tcexport compresses models whose blocks all hold the same tokens")
        keys = shapes.get(softmax.inputs[0].name) if shapes else None
        if keys is not None and hidden_shape is not None and keys[-1] != hidden_shape[1]:
            queries = shapes.get(matmul.inputs[0].name)
            if keys[-1] == keys[-2] and queries is not None and queries[-1] == hidden_shape[1]:
                raise UsageError(f"block {index} attends over a {keys[-2]}x{keys[-1]} matrix whose MatMul "
                                 f"'{matmul.name}' sums over the {hidden_shape[1]} tokens: attention between channels, "
                                 "not tokens (cross-covariance attention, as in XCiT); tcexport compresses attention "
                                 "between tokens")
            raise UsageError(f"block {index} attends over {keys[-1]} keys but holds {hidden_shape[1]} tokens "
                             "(windowed or local attention, as in Swin); tcexport compresses global self-attention "
                             "only")
        key_shape = shapes.get(matmul.inputs[1].name) if shapes else None
        if key_shape is not None and len(key_shape) != 4:
            raise UsageError(f"block {index}: the keys of attention Softmax {_where(softmax)} are "
                             f"{list(key_shape)}, with the heads folded into the batch ([batch*heads, dim, tokens], "
                             "as nn.MultiheadAttention computes them, e.g. in WavLM); tcexport reads keys laid out "
                             "[batch, heads, dim, tokens]")
        blocks.append(Block(index, softmax, matmul, residual, hidden, block_scope(softmax)))
    for block in blocks:
        if block.branches:
            block.scope = _shared_block_scope(block.softmaxes)
    _name_repeated_scopes(blocks)
    return blocks


def _tokens_of(block: Block, shapes: dict | None) -> int | None:
    shape = shapes.get(block.hidden.name) if shapes else (tuple(block.hidden.shape) if block.hidden.shape else None)
    return shape[1] if shape is not None and len(shape) == 3 else None


def _where(softmax: ir.Node) -> str:
    scope = next((s for s in reversed(node_scopes(softmax)) if "." in s), None)  # the module, not the op
    return f"'{softmax.name}'" + (f" ({scope})" if scope else "")


def _logits_shape(softmax: ir.Node, shapes: dict | None) -> tuple | None:
    logits = softmax.inputs[0]
    shape = shapes.get(logits.name) if shapes else None
    if shape is None and logits.shape is not None:
        shape = tuple(logits.shape)
    return tuple(shape) if shape is not None else None


def _no_self_attention(softmaxes: list[ir.Node], shapes: dict | None) -> str:
    """Why no Softmax is a block: each attends from one number of queries to another (or not over the tokens)."""
    first = softmaxes[0]
    shape = _logits_shape(first, shapes)
    seen = f"logits {list(shape)}" if shape is not None else "logits of unknown shape"
    return (f"none of the graph's {len(softmaxes)} attention Softmax nodes is self-attention over the tokens (the "
            f"first, {_where(first)}, has {seen}, not [batch, heads, N, N]: sliding-window, block-sparse or "
            "other local attention, as in Longformer or BigBird's block_sparse mode); tcexport compresses global "
            "self-attention only")


def _refuse_subsampling_attention(pools: list[ir.Node], blocks: list[ir.Node], shapes: dict | None) -> None:
    """An attention from Nq queries to Nk != Nq keys whose output later blocks attend over is no pooling head: the
    model pools tokens inside attention (LeViT's attention subsampling, Funnel's pooled queries, MViT's pooled keys
    and queries). A pooling head (SigLIP's MAP, CaiT's class attention) comes after the last block."""
    later = set(blocks)
    for pool in pools:
        if later & _descendants(pool):
            shape = _logits_shape(pool, shapes)
            raise UsageError(f"attention Softmax {_where(pool)} attends from {shape[-2]} queries to {shape[-1]} "
                             "keys, and later blocks attend over its output: the model pools tokens inside its "
                             "attention (pooled queries or keys, as in LeViT, Funnel or MViT); tcexport compresses "
                             "attention whose queries and keys are all the block's tokens")


def _check_parallel(block: Block, softmax: ir.Node, shapes: dict | None) -> None:
    """`softmax` shares `block`'s residual Add: it must be a parallel branch, over the same tokens."""
    if any(softmax in _descendants(branch) for branch in block.softmaxes):
        raise UsageError(f"attention Softmax '{softmax.name}' is computed from the attention of block {block.index} "
                         "and shares its residual Add; tcexport cannot tell where one block ends and the next "
                         "begins in this graph")
    logits = shapes.get(softmax.inputs[0].name) if shapes else None
    first = shapes.get(block.softmax.inputs[0].name) if shapes else None
    if logits is not None and first is not None and tuple(logits[-2:]) != tuple(first[-2:]):
        raise UsageError(f"block {block.index} has parallel attentions over different token counts ({first[-1]} "
                         f"and {logits[-1]} keys); tcexport compresses parallel branches over the same tokens only")


def _name_repeated_scopes(blocks: list[Block]) -> None:
    """Scopes only name blocks. One module run several times (ALBERT shares one layer's weights across all
    layers) gives several blocks one scope: number them by call, `scope#k`."""
    seen: dict[str, int] = {}
    repeated = {b.scope for b in blocks if b.scope and sum(1 for o in blocks if o.scope == b.scope) > 1}
    for block in blocks:
        if block.scope in repeated:
            seen[block.scope] = seen.get(block.scope, 0) + 1
            block.scope = f"{block.scope}#{seen[block.scope] - 1}"
