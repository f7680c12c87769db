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

Policy = Callable[[dict[str, np.ndarray], np.ndarray], tuple[dict[str, np.ndarray], np.ndarray]]


def streaming_keep(cache_len: int, sink: int, window: int) -> np.ndarray | None:
    """Cache positions kept before a step that adds one token (None: keep all): the first `sink` and the last
    `window - 1`, so the cache holds sink + window positions once the step's token is in."""
    budget = sink + window - 1
    if cache_len <= budget:
        return None
    return np.r_[0:sink, cache_len - (budget - sink):cache_len]


def streaming(sink: int, window: int) -> Policy:
    def trim(state: dict[str, np.ndarray], mask: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        cache_len = mask.shape[1] - 1  # the mask already has the next token's slot
        keep = streaming_keep(cache_len, sink, window)
        if keep is None:
            return state, mask
        trimmed = {name: np.ascontiguousarray(value[:, :, keep]) if value.ndim == 4 else value
                   for name, value in state.items()}
        return trimmed, np.ascontiguousarray(np.concatenate([mask[:, keep], mask[:, -1:]], axis=1))

    return trim


def from_record(compression: dict | None) -> Policy | None:
    """The decode-time policy a compressed graph carries (None: the cache grows as generated)."""
    for stage in (compression or {}).get("decode_policies", []):
        if stage["method"] == "streaming":
            return streaming(int(stage["params"]["sink"]), int(stage["params"]["window"]))
    return None
