"""StreamingLLM: a fixed-size cache in decoding, the first `sink` positions plus the `window` most recent ones.

Xiao et al. (2024) keep a few "attention sink" tokens and a sliding window, so memory stays bounded for any
number of new tokens. The graph does not change: the generation loop trims every layer's cache between steps
(tcexport/generation/policies.py) and the reference trims transformers' DynamicCache the same way. Cached keys
keep the rotary positions they were computed at and new tokens keep counting (the paper re-numbers positions
inside the cache instead; that needs the keys stored before rotation).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from tcexport.core.errors import UsageError
from tcexport.methods.decoder import DecoderMethod
from tcexport.methods.params import Param
from tcexport.methods.registry import register


@register
class StreamingLLM(DecoderMethod):
    """Bounded cache in decoding: attention sinks plus a recent window (StreamingLLM)."""

    name = "streaming"
    family = "KV-cache eviction (decoders)"
    acts: ClassVar[str] = "decode"  # a policy of the generation loop, not a graph rewrite
    parameters = (Param("sink", int, "first cache positions always kept (attention sinks)", default=4, low=0,
                        example=4),
                  Param("window", int, "most recent cache positions kept", default=252, low=1, example=252))

    @classmethod
    def check_more(cls, params: dict[str, Any]) -> dict[str, Any]:
        if params["sink"] + params["window"] < 2:
            raise UsageError("streaming needs sink + window >= 2 (room for the cache and the new token)")
        return params

    def check_prompt(self, n: int) -> None:
        """Nothing: the policy trims any prompt's cache."""


def streaming_keep(cache_len: int, sink: int, window: int) -> np.ndarray | None:
    """Cache positions kept before a step that adds one token (None: keep all): the first `sink` and the last
    `window - 1`, so the cache holds sink + window positions once the step's token is in."""
    budget = sink + window - 1
    if cache_len <= budget:
        return None
    return np.r_[0:sink, cache_len - (budget - sink):cache_len]
