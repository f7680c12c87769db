"""SnapKV: compress every layer's cache at the end of the prefill, per KV head, by what the prompt's last queries
attend to.

Li et al. (2024): the last `window` prompt queries "observe" the prompt; each key position's attention from them
(summed over the window, averaged over the query heads that share a KV head, smoothed by average pooling over
`kernel` neighbouring positions) ranks it, the `budget` best positions before the window are kept with the window
itself, in their original order. Decoding then attends to budget + window cached positions plus the new ones.
Padding positions are never kept (their attention is masked); every prompt must be longer than budget + window.

    select(probs [B, Hq, q, k], key_mask [B, k], kv_heads, prefill) -> indices [B, kv_heads, n_out]
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from tcexport.core.errors import UsageError
from tcexport.core.lazy import lazy_import
from tcexport.methods.decoder import DecoderMethod
from tcexport.methods.params import Param
from tcexport.methods.registry import register

torch = lazy_import("torch")


@register
class SnapKV(DecoderMethod):
    """Per-head KV-cache selection at the end of the prefill by the last queries' attention (SnapKV)."""

    name = "snapkv"
    family = "KV-cache compression (decoders)"
    acts: ClassVar[str] = "cache"  # rewrites every layer's present at the end of the prefill
    parameters = (Param("budget", int, "cached prompt positions kept per layer and KV head, besides the window",
                        default=256, low=1, example=256),
                  Param("window", int, "last prompt queries that vote; their own positions are always kept",
                        default=32, low=1, example=32),
                  Param("kernel", int, "average-pooling width over key positions (odd)", default=5, low=1,
                        example=5))

    @classmethod
    def check_more(cls, params: dict[str, Any]) -> dict[str, Any]:
        if params["kernel"] % 2 == 0:
            raise UsageError(f"snapkv kernel must be odd (it pools symmetrically), got {params['kernel']}")
        return params

    def check_prompt(self, n: int) -> None:
        need = self.params["budget"] + self.params["window"]
        if n <= need:
            raise UsageError(f"snapkv budget {self.params['budget']} + window {self.params['window']} is not smaller "
                             f"than a {n}-token prompt; lower --budget or give longer prompts")

    # -- PyTorch reference
    def select_cache(self, probs: "torch.Tensor", key_mask: "torch.Tensor", kv_heads: int) -> "torch.Tensor":
        batch, heads, queries, keys = probs.shape
        window, budget, kernel = self.params["window"], self.params["budget"], self.params["kernel"]
        votes = probs[:, :, -window:, :].sum(dim=2)  # [B, Hq, k]
        votes = votes.reshape(batch, kv_heads, heads // kv_heads, keys).mean(dim=2)
        pooled = torch.nn.functional.avg_pool1d(votes.reshape(batch * kv_heads, 1, keys), kernel, stride=1,
                                                padding=kernel // 2, count_include_pad=True)
        ranked = pooled.reshape(batch, kv_heads, keys).double()
        ranked = ranked.masked_fill(key_mask[:, None, :] == 0, float("-inf"))
        ranked[:, :, keys - window:] = float("inf")
        kept = min(keys, budget + window)
        return ranked.topk(kept, dim=-1).indices.sort(dim=-1).values

    # -- ONNX
    def build_select_cache(self, emit, probs, key_mask, kv_heads: int, heads: int, prefill):
        """ONNX of select_cache; probs [B, Hq, q, k] float, key_mask [B, k] int64, prefill bool [1]. In a decode
        step every position is kept (indices 0..k-1)."""
        window, budget, kernel = self.params["window"], self.params["budget"], self.params["kernel"]
        i64 = emit.i64
        votes = emit.op("votes", "ReduceSum", emit.op("window_rows", "Slice", probs, i64("w_from", [-window]),
                                                      i64("w_to", [np.iinfo(np.int64).max]), i64("w_axis", [2])),
                        i64("sum_axis", [2]), keepdims=0)
        keys = emit.op("keys", "Shape", probs, start=3, end=4)
        batch = emit.op("batch", "Shape", probs, start=0, end=1)
        grouped = emit.op("grouped", "Reshape", votes, emit.op("group_shape", "Concat", batch, i64("kvh", [kv_heads]),
                                                              i64("per", [heads // kv_heads]), keys, axis=0))
        mean = emit.op("head_mean", "ReduceMean", grouped, i64("mean_axis", [2]), keepdims=0)
        flat = emit.op("flat", "Reshape", mean, emit.op("flat_shape", "Concat", i64("any", [-1]), i64("one_c", [1]),
                                                      keys, axis=0))
        pooled = emit.op("pooled", "AveragePool", flat, kernel_shape=[kernel], strides=[1],
                         pads=[kernel // 2, kernel // 2], count_include_pad=1)
        ranked = emit.op("ranked_f64", "Cast", emit.op("unflat", "Reshape", pooled, emit.op(
            "back_shape", "Concat", batch, i64("kvh2", [kv_heads]), keys, axis=0)), to=ir.DataType.DOUBLE)
        masked = emit.op("padding", "Equal", emit.op("mask_rows", "Unsqueeze", key_mask, i64("mask_axis", [1])),
                         i64("zero", [0]))
        ranked = emit.op("no_padding", "Where", masked, emit.const("never", [float("-inf")], np.float64), ranked)
        position = emit.op("position", "Range", i64("zero_s", 0), emit.op("keys_s", "Squeeze", keys), i64("one_s", 1))
        in_window = emit.op("in_window", "GreaterOrEqual", position,
                            emit.op("window_start", "Sub", emit.op("keys_s2", "Squeeze", keys), i64("w_s", window)))
        ranked = emit.op("window_kept", "Where", in_window, emit.const("always", [float("inf")], np.float64), ranked)
        wanted = emit.op("wanted", "Min", keys, i64("budget_window", [budget + window]))
        total = emit.op("kept_total", "Where", prefill, wanted, keys)
        _, chosen = emit.op_multi("topk", "TopK", 2, ranked, total, axis=-1, largest=1, sorted=1)
        ordered, _ = emit.op_multi("order", "TopK", 2, emit.op("chosen_f", "Cast", chosen, to=ir.DataType.DOUBLE),
                                   total, axis=-1, largest=0, sorted=1)
        return emit.op("kept", "Cast", ordered, to=ir.DataType.INT64)
