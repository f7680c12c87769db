"""The eager PyTorch reference of a compressed model: the ground truth the rewritten ONNX graph is validated against.

    plan = {0: ToMe(r=8), 3: ToMe(r=8)}            # block index -> method applied in that block
    ref = compressed_reference(source, plan)        # a deep copy of source.model, patched; source is untouched
    out = ref(*inputs)                              # same call signature and outputs as source.model
    out = ref(*inputs, query=q)                     # plans with a method that needs "query" take it by keyword
    ref.token_counts                                # [(n_in, n_out), ...] per block, from the last forward

One mechanism for every model (no forward written per architecture): the model's own forward runs under a
TorchFunctionMode (reference/mode.py) that finds the patch points by the structure the graph rewriter uses,
plus two patch points found on modules by type: transformers models route attention through tcexport's
AttentionInterface function, and sentence-transformers Pooling modules get the size-weighted mask.

Semantics (the ONNX rewriter implements exactly this)
-----------------------------------------------------
Token state through the blocks: x [B,N,C]; size [B,N,1] float32, ones at block 0; mask [B,N] float32
(1 real, 0 padding; from the input attention_mask for text models, None otherwise).

- Blocks are the self-attentions, in call order. In a block with a method the compression runs between the
  attention sublayer and the MLP sublayer, on the hidden state the MLP sublayer consumes: the residual add's
  output (pre-LN), or the LayerNorm after it when that LayerNorm is its only consumer (post-LN). The metric
  is this block's attention keys averaged over heads ([B,N,d]). The method gets `protected` leading tokens
  (the compression record's, by default the source's num_prefix_tokens: CLS, distillation, register tokens).
- After the first method that changed the token count, every later attention over the tokens (blocks and
  pooling heads) adds log(size) as [B,1,1,N] to its logits (prop_attn=True), and a padding mask added to the
  logits is rebuilt from the current mask: logits + (1 - mask)[:,None,None,:] * finfo(float32).min.
- Position terms follow the tokens (reference/positions.py, rule in reference/flow.py): relative position
  biases, rotary tables and position embeddings met after a compression are gathered at the current tokens'
  positions; a compressed token stands at the position of its largest constituent.
- Pooling over tokens is size-weighted: a mean over the token axis becomes sum_t(x_t size_t) / sum_t(size_t);
  sentence-transformers Pooling computes each of its modes from the compressed tokens (reference/pooling.py:
  mean becomes sum_t(x_t mask_t size_t) / max(sum_t(mask_t size_t), 1e-9); cls, weightedmean and lasttoken
  follow the tokens' positions). Token pooling (x[:,0]) is unchanged, since protected tokens stay first.
  Models returning last_hidden_state return fewer tokens.
- Masks that say who sees whom (found on each block's logits in the uncompressed pass, graph/masks.py): a sliding
  window stays a window over the tokens' original positions; a causal or other structured mask at or after the
  first compressed block is refused (UsageError), since no encoder compression keeps its meaning.
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Mapping

import torch

from tcexport.core.errors import UsageError
from tcexport.graph import masks
from tcexport.models.inputs import ATTENTION_MASK, TOKEN_IDS
from tcexport.methods.base import Method, TokenState
from tcexport.reference.flow import EXTRA_INPUTS, TokenFlow
from tcexport.reference.mode import Layout, TokenMode, set_tags, tags
from tcexport.reference import modules

Plan = Mapping[int, Method]


class CompressedReference(torch.nn.Module):
    """source.model with compression applied: same call signature, same outputs (possibly fewer tokens)."""

    def __init__(self, model: torch.nn.Module, flow: TokenFlow, mask_input: str | None, layout: Layout,
                 ids_input: str | None = None):
        super().__init__()
        self.model = model
        self.flow = flow
        self.mask_input = mask_input
        self.ids_input = ids_input
        self.layout = layout
        self.plan = flow.plan
        self.prop_attn = flow.prop_attn
        self.token_counts: list[tuple[int, int]] = []
        self.state: TokenState | None = None  # (x, size, mask) after the last block of the last forward
        self._signature = inspect.signature(model.forward)

    @property
    def extra_inputs(self) -> list[str]:
        """Inputs the compressed model takes besides the source model's (keywords of forward), e.g. ["query"]."""
        return [name for name in EXTRA_INPUTS if any(name in method.needs for method in self.plan.values())]

    def forward(self, *args, **kwargs):
        extra = {name: kwargs.pop(name, None) for name in self.extra_inputs}
        bound = self._signature.bind(*args, **kwargs)
        mask = self._input_mask(bound)
        self.flow.begin(mask, extra)
        with modules.active(self.model, TokenMode(self.flow, self.layout)):
            out = self.model(*bound.args, **bound.kwargs)
        self.token_counts = list(self.flow.counts)
        self.state = TokenState(self.flow.x, self.flow.size, self.flow.mask)
        return out

    def discover(self, *args):
        """Learn the block layout from one uncompressed pass (reference/mode.py: Layout); returns its output."""
        bound = self._signature.bind(*args)
        self.flow.begin(self._input_mask(bound))
        with torch.no_grad(), modules.active(self.model, TokenMode(self.flow, self.layout, discover=True)):
            out = self.model(*bound.args, **bound.kwargs)
        self.layout.blocks = len(self.flow.counts)
        return out

    def _input_mask(self, bound: inspect.BoundArguments) -> torch.Tensor | None:
        """The padding mask as float [B,N] (tagged, so the mode knows what descends from it), or None."""
        if self.mask_input is None:
            return None
        arguments = bound.arguments
        mask = arguments.get(self.mask_input)
        if mask is None:
            return None
        ids = arguments.get(self.ids_input) if self.ids_input else None
        if mask.dim() != 2 or (ids is not None and tuple(ids.shape) != tuple(mask.shape)):
            raise UsageError(f"{self.ids_input or 'the tokens'} {list(ids.shape) if ids is not None else '?'} and "
                             f"{self.mask_input} {list(mask.shape)} differ in batch/seq; pass both as [batch, seq]")
        tagged = mask.clone()
        set_tags(tagged, (True, *tags(tagged)[1:]))
        arguments[self.mask_input] = tagged
        return mask.to(torch.float32)


def compressed_reference(source, plan: Plan, prop_attn: bool = True, protected: int | None = None,
                         example: tuple[torch.Tensor, ...] | None = None) -> CompressedReference:
    """Build the eager reference of `source` with `plan` ({block index: Method}) applied; see the module doc.

    `example` inputs (default: the source's random inputs at batch 2) run one uncompressed pass that finds the
    blocks; a model the mechanism cannot cover fails here, with a UsageError naming what is missing."""
    model = copy.deepcopy(source.model)
    model.eval()
    modules.prepare(model)
    if protected is None:
        protected = int(source.info.get("num_prefix_tokens", 1))
    mask_input = next((spec.name for spec in source.inputs if spec.kind == ATTENTION_MASK), None)
    ids_input = next((spec.name for spec in source.inputs if spec.kind == TOKEN_IDS), None)
    flow = TokenFlow({}, int(protected), bool(prop_attn))
    reference = CompressedReference(model, flow, mask_input, Layout(), ids_input)
    inputs = example if example is not None else source.example_inputs(2)
    discovered = reference.discover(*inputs)
    if reference.layout.blocks == 0:
        raise UsageError(f"{source.spec}: found no self-attention in the model's forward; tcexport compresses "
                         "transformers with global self-attention")
    flow.plan = check_plan(plan, reference.layout.blocks)
    reference.plan = flow.plan
    masks.refuse_unkept(reference.layout.masks, flow.plan)  # causal and other structure: see reference/mode.py
    with torch.no_grad():
        refuse_unfaithful(source.spec, discovered, source.model(*inputs))
    return reference


def refuse_unfaithful(spec: str, reproduced, expected, rtol: float = 1e-3) -> None:
    """The reference's uncompressed pass must give the model's own outputs: where it does not, it leaves out part of
    the architecture (an attention argument it does not apply, a random draw per call), and a compressed graph
    checked against it would be checked against something else. Refused in one line; `rtol` of the output's
    magnitude (at least 1) covers the reference's own decomposition of attention."""
    from torch.utils._pytree import tree_flatten

    got = [t for t in tree_flatten(reproduced)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    want = [t for t in tree_flatten(expected)[0] if isinstance(t, torch.Tensor) and t.is_floating_point()]
    for a, b in zip(got, want):
        if a.shape != b.shape:
            raise UsageError(f"{spec}: tcexport's PyTorch reference gives an output of shape {list(a.shape)} where "
                             f"the model gives {list(b.shape)}, before any compression; tcexport cannot compress "
                             "this model")
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        error = float((a.float() - b.float()).abs().max()) if b.numel() else 0.0
        if not error <= rtol * scale:  # NaN fails too
            raise UsageError(f"{spec}: tcexport's PyTorch reference does not reproduce the model before any "
                             f"compression (max abs difference {error:.2g} on outputs up to {scale:.2g}): it misses "
                             "part of this architecture, so a compressed graph could not be checked against it; "
                             "tcexport cannot compress this model")


def check_plan(plan: Plan, depth: int) -> dict[int, Method]:
    """The plan as {int block index: Method}, every index in range; UsageError otherwise."""
    if not isinstance(plan, Mapping):
        raise UsageError(f"the compression plan must map block index -> method, got {type(plan).__name__}")
    checked: dict[int, Method] = {}
    for key, method in plan.items():
        try:
            if isinstance(key, bool):
                raise TypeError
            index = operator.index(key)
        except TypeError:
            raise UsageError(f"plan keys are block indices (int), got {key!r}") from None
        if not 0 <= index < depth:
            raise UsageError(f"block {index} is out of range: the model has {depth} blocks (0..{depth - 1})")
        if not isinstance(method, Method):
            raise UsageError(f"plan[{index}] must be a method instance such as ToMe(r=8), "
                             f"got {type(method).__name__}")
        checked[index] = method
    return dict(sorted(checked.items()))


__all__ = ["EXTRA_INPUTS", "CompressedReference", "TokenFlow", "check_plan", "compressed_reference"]
