"""Attention masks are structure, not data: what each block's mask lets a token see, besides padding.

A padding mask hides the same keys from every query, and compression rebuilds it from the current tokens
(graph/insert.py). A mask that depends on the query as well — causal (is_causal, a triangular constant, a mask
computed from positions) or a sliding window (local attention) — says which tokens may see which, and that
meaning must survive compression or the model must be refused.

Found by what the mask does, not by how it is written: the graph runs once at batch 1 with every token real
(attention mask all ones), exposing every step between each block's logits MatMul and its Softmax. A logit more
than 1000 below its row's maximum is masked (masks add -1e4, float32 min or -inf). Nothing masked: global
attention. Otherwise the pattern, the same for every head, is classified:

    causal   token i sees keys j with i - before <= j <= i (or the mirror, after only): one direction only;
             also a causal sliding window. No encoder compression can keep it: a merged token carries later
             tokens, and which tokens merge or survive depends on all of them. Refused.
    window   token i sees keys j with i - before <= j <= i + after, before and after > 0 (ModernBERT's local
             layers). Kept: after a compression the window applies to the tokens' original positions (a token
             stands at its largest constituent's position, as position terms do; graph/positions.py) — when a
             block at or before the first compressed one attends globally, so every token already depends on
             every other (ModernBERT: layer 0). Without one, which tokens merge or survive depends on tokens far
             outside each window, and the compressed model would no longer be local: refused.
    other    any other pattern (per-head masks, blocks, strides). Refused.

The node where the pattern first appears on the path is the one that applies it (the mask Add or Where).
The eager reference classifies the pattern it sees at each softmax with the same rule (reference/mode.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tcexport.core.errors import UsageError
from tcexport.graph.blocks import LOGIT_PATH_OPS

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir

    from tcexport.graph.blocks import Block

MASKED_BELOW = -1e3  # a logit this far below its row's maximum gets no attention: it is masked
CAUSAL, WINDOW, OTHER = "causal", "window", "other"


@dataclass(frozen=True)
class MaskStructure:
    """What block `block`'s attention mask allows, beyond padding, over `tokens` tokens."""

    block: int
    kind: str  # CAUSAL, WINDOW or OTHER
    tokens: int
    before: int | None = None  # causal/window: how many earlier tokens each token sees at most
    after: int | None = None  # ... and how many later ones
    seen: tuple[int, int] = (0, 0)  # the fewest and most keys one query sees
    node: str | None = None  # the graph node that puts it on the logits (graph side only)

    @property
    def kept(self) -> bool:
        """Whether compression can keep the mask's meaning (a window over original positions)."""
        return self.kind == WINDOW

    def describe(self) -> str:
        if self.kind == CAUSAL:
            if not self.after:
                what = ("a causal mask (each token sees only itself and earlier ones)" if self.before >= self.tokens - 1
                        else f"a causal sliding-window mask (each token sees only itself and the {self.before} "
                             "before it)")
            else:
                what = "a reversed causal mask (each token sees only itself and later ones)"
        elif self.kind == WINDOW:
            what = (f"a sliding-window mask (each token sees the {self.before} tokens before it and the {self.after} "
                    "after it)")
        else:
            what = (f"an attention mask that is neither padding, causal nor a sliding window (a token sees between "
                    f"{self.seen[0]} and {self.seen[1]} of the {self.tokens} tokens)")
        return what + (f" at node '{self.node}'" if self.node else "")

    def to_json(self) -> dict:
        return {"block": self.block, "kind": self.kind, "tokens": self.tokens, "before": self.before,
                "after": self.after, "node": self.node}


def classify(allowed: np.ndarray, block: int, node: str | None = None) -> MaskStructure | None:
    """The structure of `allowed` [heads, queries, keys] (True: the query attends the key), None when every
    query sees every key."""
    allowed = np.asarray(allowed, dtype=bool)
    if allowed.all():
        return None
    heads, queries, keys = allowed.shape
    seen = allowed.sum(axis=-1)
    counts = (int(seen.min()), int(seen.max()))
    if queries != keys or not (allowed == allowed[:1]).all():
        return MaskStructure(block, OTHER, keys, seen=counts, node=node)
    pattern = allowed[0]
    offset = np.arange(keys)[None, :] - np.arange(queries)[:, None]  # j - i
    if not pattern.any(axis=-1).all():
        return MaskStructure(block, OTHER, keys, seen=counts, node=node)
    before, after = int(max(0, -offset[pattern].min())), int(max(0, offset[pattern].max()))
    if not np.array_equal(pattern, (offset >= -before) & (offset <= after)):
        return MaskStructure(block, OTHER, keys, seen=counts, node=node)
    kind = CAUSAL if min(before, after) == 0 else WINDOW
    return MaskStructure(block, kind, keys, before, after, counts, node)


def allowed_from_logits(logits: np.ndarray) -> np.ndarray:
    """[heads, queries, keys] bool from one batch row's pre-softmax logits (4-D [1, H, Nq, Nk] or 3-D [H, Nq, Nk]):
    True where the logit is within 1000 of its row's maximum."""
    values = np.asarray(logits, dtype=np.float64)
    if values.ndim == 4:
        values = values[0]
    finite = np.where(np.isfinite(values), values, -np.inf)
    top = finite.max(axis=-1, keepdims=True)
    return np.isfinite(finite) & (finite - top > MASKED_BELOW)


def refuse_unkept(structures: dict[int, MaskStructure], compressed_blocks) -> None:
    """UsageError naming the first block whose mask compression would change: a causal or other structured mask
    at or after the first compressed block (blocks before it run on every token, as uncompressed), or a sliding
    window there when no block up to the first compressed one attends globally (module doc)."""
    blocks = sorted(compressed_blocks)
    if not blocks:
        return
    global_before = any(index not in structures for index in range(blocks[0] + 1))
    for index in sorted(structures):
        structure = structures[index]
        if index < blocks[0] or (structure.kept and global_before):
            continue
        if structure.kept:
            raise UsageError(f"block {index} applies {structure.describe()}, and no block up to block {blocks[0]} "
                             "attends globally: which tokens merge or survive would depend on tokens outside each "
                             "window, so tcexport cannot compress it yet (compress at or after a block with global "
                             "attention)")
        if structure.kind == CAUSAL:
            effect = ("encoder token compression would let tokens see later ones" if not structure.after else
                      "encoder token compression would let tokens see earlier ones")
        else:
            effect = "tcexport cannot make such a mask follow compressed tokens"
        where = f" (the plan compresses block {blocks[0]}, before it)" if index > blocks[0] else ""
        raise UsageError(f"block {index} applies {structure.describe()}; {effect}: tcexport cannot compress it "
                         f"yet{where}")


# ---------------------------------------------------------------------------------------------- the graph side


def logit_chain(softmax: ir.Node) -> list[ir.Node]:
    """The nodes that carry an attention's scores from its logits MatMul to its Softmax, MatMul first (the steps
    graph/blocks.py allows there: scaling, masks, biases, casts). Empty when no MatMul is found."""
    chain, value = [], softmax.inputs[0]
    for _ in range(16):
        producer = value.producer() if value is not None else None
        if producer is None or (producer.op_type != "MatMul" and producer.op_type not in LOGIT_PATH_OPS):
            return []
        chain.append(producer)
        if producer.op_type == "MatMul":
            return list(reversed(chain))
        scored = [v for v in producer.inputs if v is not None and _reaches_matmul(v)]
        if len(scored) != 1:
            return []
        value = scored[0]
    return []


def _reaches_matmul(value: ir.Value, depth: int = 16) -> bool:
    """Whether `value` comes from a MatMul through the logit-path ops alone."""
    stack = [(value, 0)]
    while stack:
        current, steps = stack.pop()
        producer = current.producer() if current is not None else None
        if producer is None or steps > depth:
            continue
        if producer.op_type == "MatMul":
            return True
        if producer.op_type in LOGIT_PATH_OPS:
            stack.extend((v, steps + 1) for v in producer.inputs if v is not None)
    return False


def find(model: onnx.ModelProto, blocks: list[Block]) -> dict[int, MaskStructure]:
    """{block index: its mask structure} for the blocks whose mask is more than padding (module doc)."""
    from tcexport.graph import probe

    # Every attention of a block (parallel branches too, where graph/blocks.py finds them).
    chains = {block.index: [c for c in map(logit_chain, getattr(block, "softmaxes", [block.softmax])) if c]
              for block in blocks}
    names = list(dict.fromkeys(node.outputs[0].name for found in chains.values() for chain in found
                               for node in chain))
    if not names:
        return {}
    values = probe.values(model, names, 1)  # batch 1: the attention masks are all ones, every token real
    found = {}
    for block in blocks:
        for chain in chains[block.index]:
            target = allowed_from_logits(values[chain[-1].outputs[0].name])
            final = classify(target, block.index)
            if final is None:
                continue
            node = next(n for n in chain if np.array_equal(allowed_from_logits(values[n.outputs[0].name]), target))
            found[block.index] = MaskStructure(block.index, final.kind, final.tokens, final.before, final.after,
                                               final.seen, node.name or node.op_type)
            break
    return found
