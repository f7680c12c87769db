"""Patch points found on modules by type, for what a torch-function mode cannot see or decide alone.

- transformers models: attention goes through tcexport's AttentionInterface function (registered once as
  "tcexport"), so the padding mask is known as such and every layer's attention reaches the mode, whatever
  attention implementation the model was loaded with.
- sentence-transformers Pooling: after a compression each of its modes is computed from the compressed token
  state (reference/pooling.py: mean and mean_sqrt_len over round(mask * size), max over the real tokens, cls,
  weightedmean and lasttoken by the tokens' positions); graph/pooling.py and graph/insert.py give the rewritten
  graph's pooling the same.
"""

from __future__ import annotations

import contextlib

import torch

from tcexport.reference import pooling

ATTENTION_NAME = "tcexport"
_active: list = []  # the TokenMode of the forward in progress (innermost last)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    if not _active:
        raise RuntimeError("tcexport's attention function runs only inside a compressed reference's forward")
    return _active[-1].hf_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _register_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
    except ImportError:
        return False
    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)  # additive float masks, as eager attention takes
    return True


def prepare(model: torch.nn.Module) -> None:
    """Route the (already copied) model's transformers attention through tcexport's function."""
    configs = {id(m.config): m.config for m in model.modules()
               if hasattr(getattr(m, "config", None), "_attn_implementation")}
    if configs and _register_attention():
        for config in configs.values():
            config._attn_implementation = ATTENTION_NAME


def _pooling_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        from sentence_transformers.models import Pooling
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, Pooling)]


@contextlib.contextmanager
def active(model: torch.nn.Module, mode):
    """Run one forward of `model` under `mode`, with the module patch points attached."""
    flow = mode.flow

    def compressed_pooling(module):
        own = module.forward

        def forward(features, *args, **kwargs):
            if not flow.compressed:
                return own(features, *args, **kwargs)
            with torch._C.DisableTorchFunction():  # tcexport's own computation, not the model's: no patch points
                return pooling.pool(module, features, flow)

        return forward

    poolers = _pooling_modules(model)
    for module in poolers:
        module.forward = compressed_pooling(module)  # an instance attribute, removed again below
    _active.append(mode)
    try:
        with mode:
            yield
    finally:
        _active.pop()
        for module in poolers:
            module.__dict__.pop("forward", None)
