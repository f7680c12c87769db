"""What a sentence-transformers pipeline pools with: read off its Pooling module, recorded in the export's
provenance (tcexport.source info: "pooling", the modes in the order the module concatenates them, and
"pooling_include_prompt"), so compress can refuse what it cannot keep before any work (reference/pooling.py)."""

from __future__ import annotations

MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# sentence-transformers < 5: one boolean attribute per mode, concatenated in this order.
_LEGACY = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
           "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
           "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def modes_of(module) -> list[str]:
    """The pooling modes of a sentence-transformers Pooling module, in the order it concatenates them."""
    mode = getattr(module, "pooling_mode", None)
    if isinstance(mode, str):
        return [mode]
    if isinstance(mode, (tuple, list)):
        return [str(m) for m in mode]
    return [name for attribute, name in _LEGACY.items() if getattr(module, attribute, False)]


def poolers(model) -> list:
    """The sentence-transformers Pooling modules inside `model` (none when sentence-transformers is missing)."""
    try:
        from sentence_transformers.models import Pooling
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, Pooling)]


def describe(model) -> dict:
    """The provenance entries of a pipeline's pooling: {} when it has no sentence-transformers Pooling module."""
    found = poolers(model)
    if not found:
        return {}
    modes = [mode for module in found for mode in modes_of(module)]
    return {"pooling": modes,
            "pooling_include_prompt": all(bool(getattr(m, "include_prompt", True)) for m in found)}
