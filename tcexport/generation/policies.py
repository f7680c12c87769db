"""Cache policies the loop applies between decode steps, read from a graph's tcexport.compression record.

A policy takes the state the graph returned and the attention mask, and returns them trimmed. StreamingLLM's
(`streaming`) keeps the first `sink` positions and the most recent `window` of every layer's cache, so the cache
stays at sink + window positions for any number of new tokens. Cached keys keep the rotary positions they were
computed at (the new token's position id keeps counting), which is the rule that needs no re-rotation of the
cache; the StreamingLLM paper re-numbers positions inside the cache instead.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tcexport.generation.loop import as_array, shape_of
from tcexport.methods.streaming import streaming_keep

Policy = Callable[[dict[str, np.ndarray], np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]]


def streaming(sink: int, window: int) -> Policy:
    def trim(state: dict[str, np.ndarray], mask: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        cache_len = mask.shape[1] - 1  # the mask already has the next token's slot
        keep = streaming_keep(cache_len, sink, window)
        if keep is None:
            return state, mask
        arrays = {name: as_array(value) for name, value in state.items()}
        trimmed = {name: np.ascontiguousarray(value[:, :, keep]) if value.ndim == 4 else value
                   for name, value in arrays.items()}
        return trimmed, np.ascontiguousarray(np.concatenate([mask[:, keep], mask[:, -1:]], axis=1))

    return trim


def compressed_cache_mask(state: dict[str, np.ndarray], mask: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """After a prefill that compressed every layer's cache (SnapKV): the mask becomes the cache's, all real
    positions (the selection keeps no padding) plus the next token's slot."""
    lengths = {shape_of(value)[2] for value in state.values() if len(shape_of(value)) == 4}
    if len(lengths) == 1 and (length := lengths.pop()) < mask.shape[1] - 1:
        return state, np.ones((mask.shape[0], length + 1), dtype=mask.dtype)
    return state, mask


def from_record(compression: dict | None) -> Policy | None:
    """The between-steps policy a compressed graph needs (None: the cache grows as generated)."""
    compression = compression or {}
    for stage in compression.get("decode_policies", []):
        if stage["method"] == "streaming":
            return streaming(int(stage["params"]["sink"]), int(stage["params"]["window"]))
    if compression.get("cache_stages"):
        return compressed_cache_mask
    return None
