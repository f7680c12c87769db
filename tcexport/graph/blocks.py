"""Find the transformer blocks of an ONNX graph and the values a token-compression method needs in each.

A block is anchored on its attention Softmax (one per block, in graph order). From there, structurally:

    logits MatMul   the MatMul that feeds the Softmax (through scale/bias Adds, Muls, Wheres)
    keys            its right operand, K^T laid out [B, H, d, N]; the method metric is its mean over heads
    residual Add    the first Add after the Softmax that adds the block's input (an ancestor of the Softmax)
                    to something computed from the attention (a descendant)
    hidden          the state between attention and MLP: the residual Add's output (pre-LN, timm) or the
                    LayerNormalization right after it (post-LN, BERT)

The same rules hold for graphs from the dynamo exporter, the TorchScript exporter and stripped files. When the
dynamo exporter's module scopes (`pkg.torch.onnx.name_scopes`) are present, each block is also named by its
module (`blocks.5`, `encoder.layer.5`) and the scopes must agree with the structural result.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

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

    @property
    def keys(self) -> ir.Value:
        return self.logits_matmul.inputs[1]

    def summary(self) -> dict:
        return {"index": self.index, "scope": self.scope, "softmax": self.softmax.name,
                "hidden": self.hidden.name, "post_norm": self.hidden.producer() is not self.residual_add}


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


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None:
        return True
    producer = value.producer()
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


def _logits_matmul(softmax: ir.Node) -> ir.Node:
    frontier = [softmax.inputs[0]]
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
        frontier = next_frontier
    raise UsageError(f"found no MatMul feeding attention Softmax '{softmax.name}'; the attention layout is not "
                     "one tcexport can rewrite (re-export with the dynamo exporter and opset <= 22)")


def _residual_add(softmax: ir.Node, order: dict[ir.Node, int]) -> ir.Node:
    after = _descendants(softmax)
    before = _ancestor_values(softmax)
    after_values = {out for node in after for out in node.outputs}
    candidates = []
    for node in after:
        if node.op_type != "Add" or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if (a in before and b in after_values) or (b in before and a in after_values):
            residual = a if a in before else b
            if not _is_constant(residual):
                candidates.append(node)
    if not candidates:
        raise UsageError(f"found no residual Add after attention Softmax '{softmax.name}'; tcexport needs a "
                         "transformer block with a residual connection around attention")
    return min(candidates, key=order.__getitem__)


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
    softmaxes = [s for s in _attention_softmaxes(graph) if not _is_pooling(s, shapes)]
    blocks = []
    for index, softmax in enumerate(softmaxes):
        matmul = _logits_matmul(softmax)
        residual = _residual_add(softmax, order)
        hidden = _hidden_after(residual)
        hidden_shape = shapes.get(hidden.name) if shapes else (tuple(hidden.shape) if hidden.shape else None)
        if hidden_shape is not None and len(hidden_shape) != 3:
            raise UsageError(f"block {index}: the hidden state '{hidden.name}' has rank {len(hidden_shape)}, "
                             "expected [batch, tokens, channels]; tcexport compresses transformers with global "
                             "self-attention over a token sequence (not windowed attention on a grid, as in Swin)")
        keys = shapes.get(softmax.inputs[0].name) if shapes else None
        if keys is not None and hidden_shape is not None and keys[-1] != hidden_shape[1]:
            raise UsageError(f"block {index} attends over {keys[-1]} keys but holds {hidden_shape[1]} tokens "
                             "(windowed or local attention, as in Swin); tcexport compresses global self-attention "
                             "only")
        blocks.append(Block(index, softmax, matmul, residual, hidden, block_scope(softmax)))
    _name_repeated_scopes(blocks)
    return blocks


def _name_repeated_scopes(blocks: list[Block]) -> None:
    """Scopes only name blocks. One module run several times (ALBERT shares one layer's weights across all
    layers) gives several blocks one scope: number them by call, `scope#k`."""
    seen: dict[str, int] = {}
    repeated = {b.scope for b in blocks if b.scope and sum(1 for o in blocks if o.scope == b.scope) > 1}
    for block in blocks:
        if block.scope in repeated:
            seen[block.scope] = seen.get(block.scope, 0) + 1
            block.scope = f"{block.scope}#{seen[block.scope] - 1}"
