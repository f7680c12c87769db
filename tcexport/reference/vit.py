"""Compressed reference for timm VisionTransformer (ViT, DeiT, DeiT distilled): pre-LN blocks.

Each block is wrapped. A block runs timm's own forward until something changes it (a method in this block,
or size/prop-attn after the first method block); then it is recomputed from timm's own modules with the
attention written out (softmax(q*scale @ k^T + bias), no fused SDPA) so the bias and the keys are at hand.
"""

from __future__ import annotations

import types

import torch

from tcexport.errors import UsageError
from tcexport.reference import TokenFlow

HANDLED_POOLS = ("token", "avg", "")


def depth(model: torch.nn.Module, source) -> int:
    _check_model(model)
    return len(model.blocks)


def patch(model: torch.nn.Module, source, flow: TokenFlow) -> None:
    for index, block in enumerate(list(model.blocks)):
        model.blocks[index] = CompressedBlock(block, index, flow)
    if model.global_pool == "avg":
        model.tc_flow = flow
        model.pool = types.MethodType(_size_weighted_pool, model)


def _vit_class():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def _check_model(model: torch.nn.Module) -> None:
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    name = type(model).__name__
    if not isinstance(model, _vit_class()):
        raise UsageError(f"timm model class {name} is not supported by the compressed reference; "
                         "supported: VisionTransformer and DeiT (incl. distilled)")
    for index, block in enumerate(model.blocks):
        if type(block).forward is not Block.forward or type(block.attn).forward is not Attention.forward:
            raise UsageError(f"{name} block {index} is a {type(block).__name__} with {type(block.attn).__name__}; "
                             "the compressed reference supports timm's pre-LN Block with the standard Attention")
    if getattr(model, "attn_pool", None) is not None or model.global_pool not in HANDLED_POOLS:
        raise UsageError(f"{name} pools with global_pool={model.global_pool!r}: not implemented for compressed "
                         f"models (handled: {', '.join(repr(p) for p in HANDLED_POOLS)})")
    if model.global_pool == "avg" and type(model).forward_head is not _vit_class().forward_head:
        raise UsageError(f"{name} has its own forward_head; size-weighted 'avg' pooling is implemented only for "
                         "VisionTransformer.forward_head")


class CompressedBlock(torch.nn.Module):
    """A timm Block with the token state: compression between attention and MLP, prop-attn after merges."""

    def __init__(self, block: torch.nn.Module, index: int, flow: TokenFlow):
        super().__init__()
        self.block = block
        self.index = index
        self.flow = flow

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise UsageError("the compressed reference of a timm ViT does not take attn_mask/is_causal")
        flow, index, block = self.flow, self.index, self.block
        flow.enter(index, x)
        if not flow.explicit(index):
            x = block(x)
        else:
            bias = flow.attention_bias(index, None, x.dtype)
            attended, metric, probs = attention(block.attn, block.norm1(x), bias)
            x = x + block.drop_path1(block.ls1(attended))
            x = flow.compress(index, x, metric, probs)
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        flow.leave(index, x)
        return x


def attention(attn: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None):
    """timm Attention.forward written out; returns (output [B,N,C], head-averaged keys [B,N,d], probs [B,H,N,N])."""
    batch, tokens, channels = x.shape
    head_dim = getattr(attn, "head_dim", channels // attn.num_heads)
    attn_dim = getattr(attn, "attn_dim", attn.num_heads * head_dim)
    gate_layer = getattr(attn, "gate", None)
    gate = gate_layer(x).sigmoid() if gate_layer is not None else None
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if bias is not None:
        logits = logits + bias
    probs = attn.attn_drop(logits.softmax(dim=-1))
    out = (probs @ v).transpose(1, 2).reshape(batch, tokens, attn_dim)
    out = getattr(attn, "norm", torch.nn.Identity())(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, k.mean(dim=1), probs


def _size_weighted_pool(model, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """VisionTransformer.pool with 'avg' weighted by token size (a merged token counts for its size)."""
    pool_type = model.global_pool if pool_type is None else pool_type
    if pool_type != "avg":
        return _vit_class().pool(model, x, pool_type)
    start = 0 if getattr(model, "pool_include_prefix", False) else model.num_prefix_tokens
    size = model.tc_flow.size[:, start:].to(x.dtype)
    return (x[:, start:] * size).sum(dim=1) / size.sum(dim=1)
