"""Compressed reference for transformers BertModel (post-LN), bare (hf:) or in a sentence-transformers pipeline (st:).

Each BertLayer is wrapped. A layer runs its own forward until something changes it; then it is recomputed from
its own modules (query/key/value Linear, eager attention with the bias from TokenFlow, BertSelfOutput (dense,
residual, LayerNorm), compression, BertIntermediate + BertOutput).

Masks in transformers 5.x: BertModel turns the 2D attention_mask into a 4D [B,1,N,N] mask once
(masking_utils.create_bidirectional_mask) and hands it to every layer. With attn_implementation="eager" it is
float, 0 where attended and finfo(dtype).min at padded keys; with "sdpa" it is bool (True = attend); in both it
is None when nothing is padded. Up to the first method layer the reference uses that mask (as an additive
bias); after it, the mask is rebuilt from the current token mask (TokenFlow.attention_bias).
"""

from __future__ import annotations

import torch

from tcexport.errors import UsageError
from tcexport.reference import TokenFlow, additive_mask


def depth(model: torch.nn.Module, source) -> int:
    return len(_bert(model, source).encoder.layer)


def patch(model: torch.nn.Module, source, flow: TokenFlow) -> None:
    bert = _bert(model, source)
    for index, layer in enumerate(list(bert.encoder.layer)):
        bert.encoder.layer[index] = CompressedLayer(layer, index, flow)
    if source.info.get("family") == "st":
        _patch_pooling(model.st, flow)


def _bert(model: torch.nn.Module, source) -> torch.nn.Module:
    """The BertModel inside an hf: (LastHiddenState) or st: (SentenceEmbedding) source model."""
    from transformers.models.bert.modeling_bert import BertLayer, BertModel, BertSelfAttention

    from tcexport.sources import LastHiddenState, SentenceEmbedding

    if isinstance(model, LastHiddenState):
        inner = model.model
    elif isinstance(model, SentenceEmbedding):
        first = model.st[0] if len(model.st) else None
        inner = getattr(first, "auto_model", None)
    else:
        inner = None
    if not isinstance(inner, BertModel):
        kind = type(inner).__name__ if inner is not None else type(model).__name__
        raise UsageError(f"{source.spec}: the compressed reference supports BertModel encoders, not {kind}")
    config = inner.config
    if config.is_decoder or getattr(config, "add_cross_attention", False):
        raise UsageError(f"{source.spec}: BERT used as a decoder is not supported; use an encoder")
    for index, layer in enumerate(inner.encoder.layer):
        if (type(layer).forward is not BertLayer.forward
                or type(layer.attention.self).forward is not BertSelfAttention.forward):
            raise UsageError(f"{source.spec}: layer {index} is a modified BertLayer ({type(layer).__name__}); "
                             "the compressed reference follows the stock BertLayer only")
    return inner


class CompressedLayer(torch.nn.Module):
    """A BertLayer with the token state: compression after BertSelfOutput, before the intermediate/output."""

    def __init__(self, layer: torch.nn.Module, index: int, flow: TokenFlow):
        super().__init__()
        self.layer = layer
        self.index = index
        self.flow = flow

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        flow, index, layer = self.flow, self.index, self.layer
        flow.enter(index, hidden_states)
        if not flow.explicit(index):
            out = layer(hidden_states, attention_mask, *args, **kwargs)
        else:
            dtype = hidden_states.dtype
            bias = flow.attention_bias(index, additive_mask(attention_mask, dtype), dtype)
            context, metric, probs = self_attention(layer.attention.self, hidden_states, bias)
            x = layer.attention.output(context, hidden_states)  # dense, dropout, LayerNorm(x + residual)
            x = flow.compress(index, x, metric, probs)
            out = layer.output(layer.intermediate(x), x)
        flow.leave(index, out)
        return out


def self_attention(attn: torch.nn.Module, hidden: torch.Tensor, bias: torch.Tensor | None):
    """BertSelfAttention with eager attention written out; returns (context [B,N,C], mean keys [B,N,d],
    probs [B,H,N,N])."""
    batch, tokens, _ = hidden.shape
    shape = (batch, tokens, -1, attn.attention_head_size)
    q = attn.query(hidden).view(shape).transpose(1, 2)
    k = attn.key(hidden).view(shape).transpose(1, 2)
    v = attn.value(hidden).view(shape).transpose(1, 2)
    logits = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
    if bias is not None:
        logits = logits + bias
    probs = torch.nn.functional.softmax(logits, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=attn.dropout.p, training=attn.training)
    context = torch.matmul(probs, v).transpose(1, 2).reshape(batch, tokens, -1)
    return context, k.mean(dim=1), probs


def _patch_pooling(st: torch.nn.Module, flow: TokenFlow) -> None:
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    for position, module in enumerate(st):
        if isinstance(module, Pooling):
            modes = (module.pooling_mode,) if isinstance(module.pooling_mode, str) else tuple(module.pooling_mode)
            if modes != ("mean",):
                raise UsageError(f"sentence-transformers pooling {'+'.join(modes)} is not implemented for "
                                 "compressed models; only mean pooling is")
            st[position] = SizeWeightedMeanPooling(flow)
            return
    raise UsageError("the sentence-transformers pipeline has no Pooling module; cannot pool a compressed model")


class SizeWeightedMeanPooling(torch.nn.Module):
    """Mean pooling where a merged token counts for its size: sum(x*mask*size) / max(sum(mask*size), 1e-9)."""

    def __init__(self, flow: TokenFlow):
        super().__init__()
        self.flow = flow

    def forward(self, features: dict, **kwargs) -> dict:
        x = features["token_embeddings"]
        weight = (self.flow.mask[..., None] * self.flow.size).to(x.dtype)
        total = weight.sum(dim=1).clamp(min=1e-9)
        features["sentence_embedding"] = (x * weight).sum(dim=1) / total
        return features
