"""The eager PyTorch reference of a compressed model: the ground truth the rewritten ONNX graph is validated against.

    plan = {0: ToMe(r=8), 3: ToMe(r=8)}            # block index -> method applied in that block
    ref = compressed_reference(source, plan)        # a deep copy of source.model, patched; source is untouched
    out = ref(*inputs)                              # same call signature and outputs as source.model
    out = ref(*inputs, query=q)                     # plans with a method that needs "query" take it by keyword
    ref.token_counts                                # [(n_in, n_out), ...] per block, from the last forward

Semantics (the ONNX rewriter implements exactly this)
-----------------------------------------------------
Token state through the blocks: x [B,N,C]; size [B,N,1] float32, ones at block 0; mask [B,N] float32
(1 real, 0 padding; from the input attention_mask for text models, None for vision models).

- In a block with a method the compression runs between the attention sublayer and the MLP sublayer, on the
  hidden state the MLP sublayer consumes (pre-LN timm: x after the attention residual; post-LN BERT: the
  attention module's output after its LayerNorm). The metric is this block's attention keys averaged over
  heads (k [B,H,N,d] -> [B,N,d]; timm: after k_norm, before any scale). The method gets
  protected = source.info["num_prefix_tokens"]; the MLP sublayer then runs on the new x.
- "Merged" blocks are the blocks after the first block with a method. In those only:
  proportional attention (prop_attn=True) adds log(size) as [B,1,1,N] to the scaled logits before softmax,
  and text models rebuild their attention mask from the current mask:
  logits + (1 - mask)[:,None,None,:] * finfo(float32).min + log(size).
  In the first method block itself and before it, attention uses the model's own masking and no size bias.
- Pooling over tokens is size-weighted: sentence-transformers mean pooling becomes
  sum_t(x_t mask_t size_t) / max(sum_t(mask_t size_t), 1e-9); timm global_pool='avg' becomes
  sum_t(x_t size_t) / sum_t(size_t) over the tokens it averages. Token pooling (x[:,0], x[:,1]) is unchanged,
  since protected tokens stay first. hf: models return last_hidden_state with fewer tokens.

One module per model family: `vit` (timm VisionTransformer, DeiT incl. distilled) and `bert`
(transformers BertModel, bare (hf:) or inside a sentence-transformers pipeline (st:)).
"""

from __future__ import annotations

import copy
import inspect
import operator
from collections.abc import Mapping

import torch

from tcexport.errors import UsageError
from tcexport.methods.base import Method, TokenState
from tcexport.methods.tome import log_size_bias

Plan = Mapping[int, Method]
# Signals that come from outside the model: a method needing one makes the compressed model take an input of
# that name (graph/insert.py), and the reference a keyword argument of that name.
EXTRA_INPUTS = ("query",)


class TokenFlow:
    """The token state of one forward pass, shared by the patched blocks of one reference model."""

    def __init__(self, plan: dict[int, Method], protected: int, prop_attn: bool):
        self.plan = plan
        self.protected = protected
        self.prop_attn = prop_attn
        self.first = min(plan) if plan else None
        self.begin(None)

    def begin(self, input_mask: torch.Tensor | None, extra: dict | None = None) -> None:
        """Start a forward pass; `input_mask` [B,N] (text) or None (vision); `extra`: the inputs the compressed
        model takes besides the source model's (EXTRA_INPUTS, e.g. {"query": [B,C]}), handed to methods as signals."""
        self.input_mask = input_mask
        self.extra = dict(extra or {})
        self.size: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.counts: list[tuple[int, int]] = []
        self.stage_sizes: list[torch.Tensor] = []  # size after each method: a fingerprint of its token choices
        self.stage_metrics: list[torch.Tensor] = []  # what each method measured its choices on
        self.x: torch.Tensor | None = None  # the last block's output
        self._n_in = 0

    def enter(self, index: int, x: torch.Tensor) -> None:
        """Called as block `index` starts on x [B,N,C]; block 0 creates the state."""
        batch, tokens = x.shape[0], x.shape[1]
        if index == 0 or self.size is None:
            self.size = torch.ones(batch, tokens, 1, dtype=torch.float32, device=x.device)
            self.mask = self.input_mask
        if self.mask is not None and tuple(self.mask.shape) != (batch, tokens):
            raise UsageError(f"block {index} got hidden states for batch {batch} x {tokens} tokens but the "
                             f"attention mask is {tuple(self.mask.shape)}; pass input_ids and attention_mask "
                             "of the same [batch, seq] shape")
        self._n_in = tokens

    def leave(self, index: int, x: torch.Tensor) -> None:
        self.counts.append((self._n_in, int(x.shape[1])))
        self.x = x

    def merged(self, index: int) -> bool:
        """True after the first block with a method: size (and the rebuilt mask) apply to the attention."""
        return self.first is not None and index > self.first

    def explicit(self, index: int) -> bool:
        """Whether block `index` must be computed by hand rather than by the model's own forward."""
        return index in self.plan or (self.merged(index) and (self.prop_attn or self.mask is not None))

    def attention_bias(self, index: int, own: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive bias for the scaled attention logits [B,H,N,N] of block `index`.

        `own` is the model's own additive mask (or None); it is used up to and including the first method
        block. Afterwards the mask is rebuilt from the current token mask, plus log(size) with prop_attn.
        """
        if not self.merged(index):
            return own
        bias = None
        if self.mask is not None:
            bias = (1.0 - self.mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min
        if self.prop_attn:
            size_bias = log_size_bias(self.size).to(dtype)
            bias = size_bias if bias is None else bias + size_bias
        return bias

    def compress(self, index: int, x: torch.Tensor, metric: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the method planned for block `index` (if any) to the state; return the new x.

        metric: the block's keys averaged over heads [B,N,d]; probs: its attention probabilities [B,H,N,N]."""
        method = self.plan.get(index)
        if method is None:
            return x
        n_in = x.shape[1]
        signals = {}
        if "cls_attention" in method.needs:
            signals["cls_attention"] = probs[:, :, 0, :].mean(dim=1)
        for name in EXTRA_INPUTS:
            if name in method.needs:
                if self.extra.get(name) is None:
                    raise UsageError(f"block {index}: the {method.name} method needs the input '{name}'; call the "
                                     f"reference with {name}=...")
                signals[name] = self.extra[name]
        x, self.size, self.mask = method.reference(x, metric, self.size, self.mask, self.protected, signals=signals)
        if x.shape[1] != n_in:  # the ONNX graph names a size output only where the method changed the count
            self.stage_sizes.append(self.size.detach().clone())
            # What the method decided on: the keys metric, else its first signal (e.g. CLS attention).
            decided_on = metric if "keys" in method.needs else next(iter(signals.values()), None)
            self.stage_metrics.append(decided_on.detach().clone() if decided_on is not None else None)
        return x


class CompressedReference(torch.nn.Module):
    """source.model with compression applied: same call signature, same outputs (possibly fewer tokens)."""

    def __init__(self, model: torch.nn.Module, flow: TokenFlow, text: bool):
        super().__init__()
        self.model = model
        self.flow = flow
        self.text = text
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
        self.flow.begin(self._input_mask(args, kwargs) if self.text else None, extra)
        out = self.model(*args, **kwargs)
        self.token_counts = list(self.flow.counts)
        self.state = TokenState(self.flow.x, self.flow.size, self.flow.mask)
        return out

    def _input_mask(self, args, kwargs) -> torch.Tensor:
        bound = self._signature.bind(*args, **kwargs).arguments
        ids, mask = bound.get("input_ids"), bound.get("attention_mask")
        if ids is None or ids.dim() != 2:
            raise UsageError("the reference of a text model needs input_ids of shape [batch, seq]")
        if mask is None:
            return torch.ones(ids.shape, dtype=torch.float32, device=ids.device)
        if tuple(mask.shape) != tuple(ids.shape):
            raise UsageError(f"input_ids {list(ids.shape)} and attention_mask {list(mask.shape)} differ in "
                             "batch/seq; pass both as [batch, seq]")
        return mask.to(torch.float32)


def compressed_reference(source, plan: Plan, prop_attn: bool = True) -> CompressedReference:
    """Build the eager reference of `source` with `plan` ({block index: Method}) applied; see the module doc."""
    family = source.info.get("family")
    if family == "timm":
        from tcexport.reference import vit as family_module
    elif family in ("hf", "st"):
        from tcexport.reference import bert as family_module
    else:
        raise UsageError(f"no compressed reference for '{source.spec}' (family {family!r}); supported: timm "
                         "VisionTransformer/DeiT, hf: and st: BERT encoders")
    model = copy.deepcopy(source.model)
    depth = family_module.depth(model, source)
    flow = TokenFlow(check_plan(plan, depth), int(source.info.get("num_prefix_tokens", 1)), bool(prop_attn))
    family_module.patch(model, source, flow)
    model.eval()
    return CompressedReference(model, flow, text=family in ("hf", "st"))


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


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A model's own attention mask as an additive bias: bool (True = attend) -> 0 / finfo.min; float as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)
    return mask.to(dtype)


__all__ = ["EXTRA_INPUTS", "CompressedReference", "TokenFlow", "additive_mask", "check_plan", "compressed_reference"]
