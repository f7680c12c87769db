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


def streaming(sink: int, window: int) -> Policy:
    def trim(state: dict[str, np.ndarray], mask: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        length = mask.shape[1]
        budget = sink + window - 1  # room for the token the next step adds
        if length <= budget:
            return state, mask
        keep = np.r_[0:sink, length - (budget - sink):length]
        trimmed = {}
        for name, value in state.items():
            if value.ndim == 4 and value.shape[2] == length:  # [batch, kv_heads, past, head_dim]
                trimmed[name] = np.ascontiguousarray(value[:, :, keep])
            else:
                trimmed[name] = value
        return trimmed, np.ascontiguousarray(mask[:, keep])

    return trim


def from_record(compression: dict | None) -> Policy | None:
    """The decode-time policy a compressed graph carries (None: the cache grows as generated)."""
    for stage in (compression or {}).get("decode_policies", []):
        if stage["method"] == "streaming":
            return streaming(int(stage["params"]["sink"]), int(stage["params"]["window"]))
    return None
