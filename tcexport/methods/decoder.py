"""The contract of decoder methods: which prompt tokens later layers keep, from one layer's attention.

A decoder method acts in the prefill of a causal LM at a named layer L. It ranks the current tokens of its span
by a score ([B, n], from layer L's attention probabilities) and returns, per batch row, the indices of the
tokens that layers after L see, in their original order (tokens outside the span are always kept). Everything
else (gathering the hidden states, rotary positions and masks of later layers, their shorter caches) is the
mechanism's, the same for every method: tcexport/graph/decoder_prune.py in the graph and
tcexport/reference/decoder.py in transformers' own forward.

The span is `span=A:B`, a slice of the prompt as in Python (negative values count from its end), resolved once
on the prompt's length into P tokens before it and S after it; later stages keep those same P and S tokens
(pruning happens inside the span only). `keep` is the share of the original span that remains after the stage
(rounded half up, at least 1), `keep_count` a number of span tokens; multi-stage plans therefore read as
cumulative budgets (pdrop:keep=0.5,0.25,0.125). Only the prefill prunes (the cache is empty): a decode step
keeps its token.

    select(scores, n_prompt, prefill) -> indices [B, n_out]   (reference: torch; build_select: ONNX)

Both sides compute the same count with the same float64 rounding and break ties alike (the earlier token first,
as ONNX TopK does): tokens outside the span are ranked +inf and always kept, and indices are sorted after the
top-k.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from tcexport.core.errors import UsageError
from tcexport.core.lazy import lazy_import
from tcexport.methods.base import Method
from tcexport.methods.params import Param

torch = lazy_import("torch")

DEFAULT_SPAN = "4:-8"


def parse_span(text: str) -> tuple[int | None, int | None]:
    """'4:-8' -> (4, -8); ':' and '' -> (None, None); UsageError otherwise."""
    head, colon, tail = str(text).strip().partition(":")
    if not colon:
        raise UsageError(f"span must look like A:B (a slice of the prompt, e.g. 4:-8 or 10:200), got '{text}'")
    try:
        return (int(head) if head.strip() else None, int(tail) if tail.strip() else None)
    except ValueError:
        raise UsageError(f"span must look like A:B with whole numbers, e.g. 4:-8; got '{text}'") from None


def span_ends(span: str, n: int) -> tuple[int, int]:
    """(P, S): how many prompt tokens stand before and after the span on a prompt of n tokens."""
    start, stop = parse_span(span)
    a, b, _ = slice(start, stop).indices(n)
    b = max(a, b)
    return a, n - b


class DecoderMethod(Method):
    """A prefill pruning method of causal LMs (see the module docstring). Subclasses may override `count`."""

    applies_to: ClassVar[str] = "decoder"
    acts: ClassVar[str] = "prefill"  # "prefill": a graph rewrite; "decode": a policy of the generation loop
    needs: ClassVar[frozenset[str]] = frozenset({"last_query_attention"})

    @classmethod
    def check_more(cls, params: dict[str, Any]) -> dict[str, Any]:
        parse_span(params.get("span", DEFAULT_SPAN))
        if params.get("keep") == 1:
            raise UsageError(f"{cls.name} keep=1 keeps every token; give a share in (0, 1)")
        return params

    # -- the count both sides use
    def count(self, span_len: int, original_span_len: int) -> int:
        """Span tokens kept out of `span_len` now, for a span of `original_span_len` tokens in the prompt."""
        if span_len <= 0:
            return 0
        if self.params.get("keep_count") is not None:
            return min(int(self.params["keep_count"]), span_len)
        return min(span_len, max(1, math.floor(float(self.params["keep"]) * original_span_len + 0.5)))

    def check_prompt(self, n: int) -> None:
        """UsageError when a prompt of n tokens leaves this stage nothing to prune."""
        before, after = span_ends(self.params["span"], n)
        if n - before - after <= 0:
            raise UsageError(f"{self.name} span {self.params['span']} is empty on a {n}-token prompt; give a "
                             "longer prompt or a wider span")

    # -- PyTorch reference
    def select(self, scores: "torch.Tensor", n_prompt: int, prefill: bool) -> "torch.Tensor":
        """Indices [B, n_out] of the tokens later layers keep, ascending, from scores [B, n] over the current
        tokens (n <= n_prompt after earlier stages)."""
        batch, n = scores.shape
        before, after = span_ends(self.params["span"], n_prompt)
        span_len = max(n - before - after, 0)
        keep = self.count(span_len, n_prompt - before - after) if prefill else span_len
        position = torch.arange(n)
        outside = (position < before) | (position >= n - after)
        ranked = scores.double().masked_fill(outside[None, :], float("inf"))
        # Ties go to the earlier token, as ONNX TopK breaks them (torch.topk does not promise an order): a layer
        # with a sliding window gives every span token outside the last query's window the score 0.
        chosen = ranked.sort(dim=-1, descending=True, stable=True).indices[:, : n - span_len + keep]
        return chosen.sort(dim=-1).values

    # -- ONNX: the same selection with dynamic sizes
    def build_select(self, emit, scores, n_prompt, prefill):
        """ONNX of `select`. `emit` is a methods.emit.Emitter; scores [B, n] float, n_prompt an int64 scalar [1]
        (the prompt's length), prefill a bool [1] (the cache is empty). Returns int64 indices [B, n_out]."""
        start, stop = parse_span(self.params["span"])
        i64 = emit.i64
        zero, one = i64("zero", [0]), i64("one", [1])
        n = emit.op("n", "Shape", scores, start=1, end=2)

        def resolve(label, bound, default):  # slice.indices on n_prompt, as Python does
            if bound is None:
                return default
            if bound >= 0:
                return emit.op(label, "Min", i64(f"{label}_raw", [bound]), n_prompt)
            return emit.op(label, "Max", emit.op(f"{label}_from_end", "Add", n_prompt, i64(f"{label}_raw", [bound])),
                           zero)

        a = resolve("span_start", start, zero)
        b = emit.op("span_stop_ordered", "Max", resolve("span_stop", stop, n_prompt), a)
        before, after = a, emit.op("after", "Sub", n_prompt, b)
        original = emit.op("span_prompt", "Sub", b, a)
        span_len = emit.op("span_now", "Max", emit.op("span_now_raw", "Sub", emit.op("n_less_before", "Sub", n, before),
                                                      after), zero)
        if self.params.get("keep_count") is not None:
            keep = emit.op("keep_count", "Min", i64("keep_count_raw", [int(self.params["keep_count"])]), span_len)
        else:
            scaled = emit.op("keep_scaled", "Mul", emit.op("span_prompt_f", "Cast", original, to=ir.DataType.DOUBLE),
                             emit.const("keep_rate", [float(self.params["keep"])], np.float64))
            rounded = emit.op("keep_rounded", "Cast", emit.op("keep_floor", "Floor", emit.op(
                "keep_half", "Add", scaled, emit.const("half", [0.5], np.float64))), to=ir.DataType.INT64)
            keep = emit.op("keep", "Min", span_len, emit.op("keep_at_least_one", "Max", rounded,
                                                          emit.op("one_if_any", "Min", one, span_len)))
        keep = emit.op("keep_now", "Where", prefill, keep, span_len)
        total = emit.op("kept_total", "Add", emit.op("outside", "Sub", n, span_len), keep)
        position = emit.op("position", "Range", emit.op("zero_s", "Squeeze", zero), emit.op("n_s", "Squeeze", n),
                           emit.op("one_s", "Squeeze", one))
        inside = emit.op("inside", "And", emit.op("past_before", "GreaterOrEqual", position, before),
                         emit.op("ahead_of_after", "Less", position, emit.op("n_less_after", "Sub", n, after)))
        ranked = emit.op("ranked", "Where", emit.op("inside_row", "Unsqueeze", inside, zero),
                         emit.op("scores_f64", "Cast", scores, to=ir.DataType.DOUBLE),
                         emit.const("always", [float("inf")], np.float64))
        _, chosen = emit.op_multi("topk", "TopK", 2, ranked, total, axis=-1, largest=1, sorted=1)
        as_float = emit.op("chosen_f", "Cast", chosen, to=ir.DataType.DOUBLE)
        ordered, _ = emit.op_multi("order", "TopK", 2, as_float, total, axis=-1, largest=0, sorted=1)
        return emit.op("kept", "Cast", ordered, to=ir.DataType.INT64)

    # -- the encoder contract does not apply
    def tokens_out(self, n_in: int, protected: int) -> int:
        raise UsageError(f"{self.name} is a decoder method: its token count depends on the prompt")

    def reference(self, *args, **kwargs):
        raise UsageError(f"{self.name} prunes the prompt of a causal LM; compress a decoder graph with it")

    def build_onnx(self, *args, **kwargs):
        raise UsageError(f"{self.name} prunes the prompt of a causal LM; compress a decoder graph with it")


def span_param() -> Param:
    return Param("span", str, "the prompt tokens that may be pruned, as a slice A:B (negative values count from "
                 "the prompt's end)", default=DEFAULT_SPAN, example="4:-8")


def keep_params(example: float) -> tuple[Param, Param]:
    return (Param("keep", float, "share of the span's tokens kept (of the prompt's span: cumulative over stages)",
                  low=0, high=1, low_open=True, per_layer=True, example=example),
            Param("keep_count", int, "number of span tokens kept", low=1, per_layer=True, example=64))
