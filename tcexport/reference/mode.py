"""The patch points of the eager reference, found while the model's own forward runs (no forward per family).

A TorchFunctionMode sees every torch call the model makes. It tags tensors with what they descend from — the
input attention mask, the newest logits matmul, the newest block's attention — and acts at the same places the
graph rewriter does (graph/blocks.py, graph/insert.py, graph/tokens.py), found by the same structure:

  attention      a softmax over [B,H,Nq,Nk] logits (or an SDPA call, or an HF attention-interface call, which are
                 decomposed into one). Nq == Nk: a block, counted in call order (shared layer weights count per
                 call). Nq != Nk: a pooling attention over the tokens (a learned probe). The keys are the right
                 operand of the newest matmul the logits descend from; their mean over heads is the metric.
                 After a compression: logits + log(size) (proportional attention), and the model's own padding mask
                 is replaced by one rebuilt from the current mask.
  mask structure what a block's mask allows beyond padding, seen on its logits in the uncompressed pass (the rule of
                 graph/masks.py): causal and other structured masks are refused at or after a compressed block; a
                 sliding window is kept over the tokens' original positions when the mask is rebuilt. SDPA's
                 is_causal becomes the explicit triangular mask it stands for, so it is found the same way.
  block boundary the first add after block i's attention that joins something computed from that attention with
                 something that is not (the residual). Its output is the hidden state the MLP consumes (pre-LN),
                 or, when a LayerNorm is its only consumer, that LayerNorm's output (post-LN). Which of the two is
                 learned once from an uncompressed pass (`Layout`), since eager code cannot see ahead.
  side inputs    an elementwise op that meets the compressed tokens with a tensor still holding the original
                 count on that axis: a padding-mask term on the logits becomes the rebuilt mask; anything else is
                 a position term (relative position bias, rotary tables, position embeddings) and is gathered at
                 the current tokens' positions (flow.positions).
  pooling        a mean over the token axis of a compressed [B,N,C] tensor becomes size-weighted; nn.MultiheadAttention
                 over the tokens (attention-pool heads) gets log(size) on its keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from tcexport.core.errors import UsageError
from tcexport.graph import masks as masks_mod
from tcexport.reference import positions as positions_mod
from tcexport.reference.flow import TokenFlow

TAG = "_tcexport_tags"  # (from_mask, newest matmul id, newest attention block, holds compressed tokens)
NO_TAGS = (False, -1, -1, False)

SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}
MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__,
       torch.Tensor.add_}
LAYER_NORM = {F.layer_norm, torch.layer_norm}
MEAN = {torch.mean, torch.Tensor.mean}
ELEMENTWISE = ADD | {torch.sub, torch.Tensor.sub, torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.Tensor.__isub__,
                     torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__imul__,
                     torch.Tensor.mul_, torch.div, torch.Tensor.div, torch.Tensor.__truediv__,
                     torch.Tensor.__itruediv__, torch.where, torch.Tensor.masked_fill, torch.Tensor.masked_fill_}
MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "bias_k",
            "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training", "key_padding_mask",
            "need_weights", "attn_mask")
# Calls that read a tensor's metadata: not consumers of it.
METADATA = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.__len__, torch.Tensor.numel, torch.Tensor.is_contiguous,
            torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
            torch.Tensor.ndim.__get__, torch.Tensor.is_floating_point, torch.Tensor.element_size}


class _Tagged:
    """Tags without a tensor, to merge into one."""

    def __init__(self, value: tuple):
        setattr(self, TAG, value)


def tags(value) -> tuple:
    return getattr(value, TAG, NO_TAGS)


def set_tags(value: torch.Tensor, new: tuple) -> None:
    if isinstance(value, torch.nn.Parameter):
        return
    try:
        setattr(value, TAG, new)
    except (AttributeError, RuntimeError):  # some internal tensor types take no attributes
        pass


def merge_tags(values) -> tuple:
    mask, matmul, attention, tokens = NO_TAGS
    for value in values:
        t = tags(value)
        mask, matmul, attention, tokens = mask or t[0], max(matmul, t[1]), max(attention, t[2]), tokens or t[3]
    return mask, matmul, attention, tokens


@dataclass
class Layout:
    """What an uncompressed pass learned about each block: is its hidden state after a LayerNorm (post-LN)? Does its
    mask allow more than padding (causal, sliding window: graph/masks.py)?"""

    post_norm: dict[int, bool] = field(default_factory=dict)
    blocks: int = 0
    masks: dict[int, masks_mod.MaskStructure] = field(default_factory=dict)


@dataclass
class _Block:
    index: int
    metric: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    residual: torch.Tensor | None = None  # the residual add's output, once found
    consumers: list = field(default_factory=list)  # discovery: the calls that read `residual`
    done: bool = False


def _refuse_skip_around(block: _Block, args, out) -> None:
    """After block i's residual add, another add that joins what block i computed with a whole [B, N, C] state from
    before its attention: the block's input skips around its compression point (MobileBERT's bottleneck adds each
    layer's input back after its feed-forward stack), which no method can merge as it merges x. Refused, as the
    graph rewriter refuses it (graph/blocks.py)."""
    if len(args) < 2 or not all(isinstance(a, torch.Tensor) for a in args[:2]) or out.dim() != 3:
        return
    for inside, outside in ((args[0], args[1]), (args[1], args[0])):
        if (tags(inside)[2] == block.index and tags(outside)[2] < block.index and tuple(outside.shape) == tuple(out.shape)
                and not isinstance(outside, torch.nn.Parameter)):
            raise UsageError(f"after block {block.index}'s residual add, an add joins what the block computed with a "
                             "[batch, tokens, channels] state from before its attention: a skip connection around the "
                             "point where tcexport compresses (as MobileBERT's bottleneck adds each layer's input "
                             "back after its feed-forward stack); tcexport compresses models whose only skip around "
                             "a compressed point is the residual around attention")


class TokenMode(TorchFunctionMode):
    """Runs one forward of the model with the flow's compression applied at the patch points (module doc).

    discover=True runs the model unchanged and fills `layout` instead."""

    def __init__(self, flow: TokenFlow, layout: Layout, discover: bool = False):
        super().__init__()
        self.flow = flow
        self.layout = layout
        self.discover = discover
        self.block: _Block | None = None
        self.blocks = 0
        self.matmuls = 0
        self.keys: dict[int, torch.Tensor] = {}  # matmul id -> its right operand (kept for the newest few)
        self.pending_norm: torch.Tensor | None = None  # post-LN: the residual output whose LayerNorm is the hidden

    # ------------------------------------------------------------------ dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = [v for v in tree_flatten((args, kwargs))[0] if isinstance(v, torch.Tensor)]
        if self.discover:
            self._count_consumers(func, flat)
        if func is F.scaled_dot_product_attention:
            out = self._sdpa(*args, **kwargs)
        elif func is F.multi_head_attention_forward:
            out = self._multi_head_attention(func, args, kwargs)
        elif func in SOFTMAX and self._is_logits(args, kwargs):
            out = self._softmax(func, args, kwargs)
        else:
            if func in ELEMENTWISE and self.flow.compressed:
                args = self._fix_operands(func, args)
            if func in MEAN and self.flow.compressed:
                weighted = self._weighted_mean(args, kwargs)
                if weighted is not None:
                    set_tags(weighted, merge_tags(flat))
                    return weighted
            out = func(*args, **kwargs)
            if func in ADD:
                out = self._maybe_block_boundary(args, out)
            elif func in LAYER_NORM and self.pending_norm is not None and args and args[0] is self.pending_norm:
                out = self._hidden_state(out)
        new = merge_tags(flat)
        if func in MATMUL and isinstance(out, torch.Tensor) and out.dim() >= 3 and len(args) >= 2:
            self.matmuls += 1
            self.keys = {k: v for k, v in self.keys.items() if k > self.matmuls - 8}  # only the newest matter
            self.keys[self.matmuls] = args[1]
            new = (new[0], self.matmuls, new[2], new[3])
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):  # outputs keep what a handler tagged them with, plus their inputs'
                set_tags(value, merge_tags([value, _Tagged(new)]))
        return out

    # ------------------------------------------------------------------ attention

    @staticmethod
    def _is_logits(args, kwargs) -> bool:
        logits = args[0] if args else kwargs.get("input")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", -1)
        return isinstance(logits, torch.Tensor) and logits.dim() == 4 and dim in (-1, 3)

    def _softmax(self, func, args, kwargs):
        logits = args[0]
        newest = tags(logits)[1]
        keys_t = self.keys.get(newest)  # [B,H,d,Nk]: the right operand of q @ k^T
        metric = keys_t.mean(dim=1).transpose(1, 2) if keys_t is not None and keys_t.dim() == 4 else None
        return self.attend(logits, metric, lambda biased: func(biased, *args[1:], **kwargs))

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
              position_bias=None):
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        scale = query.shape[-1] ** -0.5 if scale is None else scale
        logits = (query @ key.transpose(-2, -1)) * scale
        if is_causal:  # what SDPA means by it (top-left aligned): structure, found as such by attend()
            allowed = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).tril()
            logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        if position_bias is not None:  # a position term on the logits (T5's bucketed bias): follows the tokens
            logits = self._add(logits, position_bias)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:  # True = attend, as an additive mask
                keep = attn_mask
                attn_mask = torch.zeros_like(keep, dtype=logits.dtype).masked_fill(~keep, torch.finfo(logits.dtype).min)
                set_tags(attn_mask, tags(keep))
            logits = self._add(logits, attn_mask)
        metric = key.mean(dim=1) if key.dim() == 4 else None
        probs = self.attend(logits, metric, lambda biased: biased.softmax(dim=-1))
        out = probs @ value
        set_tags(out, merge_tags([query, key, value, probs]))
        return out

    def hf_attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """A transformers AttentionInterface function: eager attention through the patch points. Its
        attention_mask argument is the padding mask by transformers' contract, whatever its tags say. A
        `position_bias` (T5 and its kin: the bucketed relative bias computed by layer 0 and passed to every later
        layer) is added to the logits before the mask, as their eager attention adds it, and follows the tokens
        like any position term; logit soft-capping and attention sinks are refused."""
        for name in ("softcap", "s_aux", "sinks"):
            if kwargs.get(name) is not None:
                raise UsageError(f"{type(module).__name__} passes '{name}' to its attention function; tcexport's "
                                 "reference does not reproduce it, so it cannot compress this model")
        with torch._C.DisableTorchFunction():  # called from model code, so the mode is still active here
            if attention_mask is not None:
                set_tags(attention_mask, (True, *tags(attention_mask)[1:]))
            if key.shape[1] != query.shape[1]:  # grouped-query attention
                repeat = query.shape[1] // key.shape[1]
                key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
            out = self._sdpa(query, key, value, attention_mask, scale=scaling, position_bias=kwargs.get("position_bias"))
            probs = self.block.probs if self.block is not None else None
            result = out.transpose(1, 2).contiguous()
            set_tags(result, tags(out))
            return result, probs

    def _add(self, logits: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.flow.compressed:
            _, bias = self._fix_operands(torch.add, (logits, bias))
        out = logits + bias
        set_tags(out, merge_tags([logits, bias]))
        return out

    def attend(self, logits: torch.Tensor, metric: torch.Tensor | None, softmax) -> torch.Tensor:
        """The softmax point of every attention: blocks are counted, biases added, probabilities returned."""
        queries, keys = logits.shape[-2], logits.shape[-1]
        flow = self.flow
        branch = self._parallel_branch(logits)
        if branch:  # a second attention of the current block, beside the first (timm's parallel blocks)
            pass
        elif queries == keys and (flow.count is None or keys == flow.count):
            index = self.blocks
            self.blocks += 1
            if index == 0:
                flow.start(logits.shape[0], keys, logits.device)
            self.block = _Block(index, metric)
            if self.discover:
                allowed = masks_mod.allowed_from_logits(logits[0].detach().float().cpu().numpy())
                structure = masks_mod.classify(allowed, index)
                if structure is not None:
                    self.layout.masks[index] = structure
        elif flow.count is not None and keys == flow.count:
            self.block = None  # a pooling attention (a probe over the tokens): no block, but the size bias
        else:
            raise UsageError(f"an attention over {queries} queries and {keys} keys does not match the {flow.count} "
                             "tokens of the compressed model (windowed or local attention?); tcexport compresses "
                             "global self-attention only")
        bias = flow.attention_bias(logits.dtype)
        probs = softmax(logits if bias is None else logits + bias)
        if self.block is not None:
            if not branch:  # a parallel block's metric and probabilities are its first branch's (graph/blocks.py)
                self.block.probs = probs
            index = self.block.index
            set_tags(probs, (False, -1, index, False))
        else:
            set_tags(probs, (False, -1, self.blocks - 1, False))
        return probs

    def _parallel_branch(self, logits: torch.Tensor) -> bool:
        """Whether this self-attention is a parallel branch of the current block: that block has not reached its
        residual add yet, attends over the same tokens, and these logits are not computed from its attention."""
        block = self.block
        return (block is not None and not block.done and block.probs is not None
                and logits.shape[-1] == logits.shape[-2] and tuple(block.probs.shape[-2:]) == tuple(logits.shape[-2:])
                and tags(logits)[2] < block.index)

    def _multi_head_attention(self, func, args, kwargs):
        """nn.MultiheadAttention (e.g. an attention-pool head) over the compressed tokens: log(size) on its keys."""
        query, key = args[0], args[1]
        bias = self.flow.attention_bias(torch.float32)
        if bias is None or key.shape[0] != self.flow.count:
            return func(*args, **kwargs)
        params = dict(zip(MHA_ARGS, args))
        params.update(kwargs)
        length = query.shape[0]  # F.multi_head_attention_forward takes [L, B, E]
        extra = bias[:, 0].repeat_interleave(params["num_heads"], 0).expand(-1, length, -1).to(query.dtype)
        mask = params.get("attn_mask")
        params["attn_mask"] = extra if mask is None else extra + mask
        return func(**params)

    # ------------------------------------------------------------------ block boundary

    def _maybe_block_boundary(self, args, out):
        block = self.block
        if block is not None and block.done and self.discover:
            _refuse_skip_around(block, args, out)
        if block is None or block.done or len(args) < 2 or not all(isinstance(a, torch.Tensor) for a in args[:2]):
            return out
        a, b = tags(args[0])[2], tags(args[1])[2]
        if not ((a == block.index and b < block.index) or (b == block.index and a < block.index)):
            return out
        if args[0].shape != args[1].shape or out.dim() != 3:
            return out
        block.done = True
        if self.discover:
            block.residual = out
            self.layout.post_norm[block.index] = False  # decided once its consumers are seen
            self._discovering = block
            self.flow.counts.append((int(out.shape[1]), int(out.shape[1])))
            return out
        if self.layout.post_norm.get(block.index):
            self.pending_norm = out
            return out
        return self._hidden_state(out)

    def _hidden_state(self, x: torch.Tensor) -> torch.Tensor:
        """The block's hidden state between attention and MLP: where its method runs."""
        self.pending_norm = None
        block = self.block
        if block is None:
            return x
        out = self.flow.compress(block.index, x, block.metric, block.probs)
        if out is not x:
            set_tags(out, (tags(x)[0], tags(x)[1], block.index, True))
        self.flow.counts.append((int(x.shape[1]), int(out.shape[1])))
        self.flow.x = out
        return out

    def _count_consumers(self, func, flat) -> None:
        block = getattr(self, "_discovering", None)
        if block is None or func in METADATA:
            return
        if any(v is block.residual for v in flat):
            block.consumers.append(func)
            self.layout.post_norm[block.index] = len(block.consumers) == 1 and block.consumers[0] in LAYER_NORM

    # ------------------------------------------------------------------ side inputs and pooling

    def _fix_operands(self, func, args):
        """Give an operand that still holds the original token count the current tokens (module doc)."""
        tensors = [i for i, a in enumerate(args[:3]) if isinstance(a, torch.Tensor)]
        if len(tensors) < 2:
            return args
        args = list(args)
        structure = self.layout.masks.get(self.blocks)  # masks are added before the softmax that counts the block
        window = (structure.before, structure.after) if structure is not None and structure.kept else None
        for i in tensors:
            for j in tensors:
                if i == j:
                    continue
                fixed = positions_mod.follow_tokens(self.flow, args[i], args[j], from_mask=tags(args[i])[0],
                                                    window=window)
                if fixed is not args[i]:
                    set_tags(fixed, tags(args[i]))
                    args[i] = fixed
        return tuple(args)

    def _weighted_mean(self, args, kwargs):
        x = args[0]
        dim = args[1] if len(args) > 1 else kwargs.get("dim")
        if not tags(x)[3] or x.dim() != 3 or dim not in (1, -2, (1,), [1], (-2,), [-2]):
            return None
        count, tokens = self.flow.count, x.shape[1]
        if not 0 <= count - tokens <= self.flow.protected:
            return None
        keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
        weights = self.flow.size[:, count - tokens:].to(x.dtype)
        pooled = (x * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)
        return pooled if keepdim else pooled[:, 0]
