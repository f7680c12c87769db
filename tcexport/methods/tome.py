"""ToMe: token merging by bipartite soft matching (Bolya et al., ICLR 2023).

Spec (both implementations below follow it; tests compare them)
---------------------------------------------------------------
Inputs as in `tcexport.methods.base`: x [B,N,C], metric [B,N,Ck], size [B,N,1], mask [B,N] (0/1) or None,
`protected` leading tokens. Parameter r >= 0: tokens to remove at this block.

 1. r_eff = min(r, (N - protected) // 2). If r_eff == 0 the inputs are returned unchanged.
 2. The metric is scaled to unit L2 norm along its last axis (norm clamped below at NORM_EPS, so an
    all-zero row gives zero scores instead of NaN), so scores are cosine similarities. Tokens are split
    alternately: A = tokens 0, 2, 4, ...; B = tokens 1, 3, 5, ...
 3. scores = A @ B^T, [B, Na, Nb], Na = ceil(N/2), Nb = floor(N/2).
 4. With a mask: a pair of two padding tokens gets +PAD_BONUS, a pair mixing a real and a padding token gets
    -PAD_BONUS, a real pair keeps its cosine. Cosines lie in [-1, 1] and PAD_BONUS = 4, so every padding pair
    ranks above every real pair and every mixed pair below, while the cosine still orders pairs within each
    tier. A short sentence padded to 128 tokens thus loses padding only, as long as r is at most the number
    of padding A tokens (and there is at least one padding B token).
 5. Protected tokens: rows of A and columns of B whose token index is < protected are set to PROTECTED_SCORE
    (-1e4, finite so no inf/NaN arithmetic; far below the other tiers, whose scores stay >= -5).
 6. node_max, node_idx = max and argmax over B for each A token; argmax ties go to the lowest B index.
 7. The r_eff A tokens with the largest node_max are merged into their node_idx B token; ties in node_max go
    to the lower A index (ONNX TopK, sorted=1, largest=1). Protected A tokens are never chosen and merges
    never land on a protected B token: every unprotected A row has an unprotected B column scoring >= -5,
    and there are always at least r_eff unprotected A tokens.
 8. Output order: the protected tokens in their original order, then the unmerged A tokens in their
    original order, then the unprotected B tokens in their original order. This is ToMe's layout
    (class_token=True puts CLS first; with distill_token=True ToMe emits [CLS, distill, A..., B...],
    which is exactly "protected first" for protected=2).
 9. Merging is size-weighted: for every output token j over the input tokens i assigned to it,
    x'_j = sum(size_i * x_i) / sum(size_i), size'_j = sum(size_i), mask'_j = max(mask_i).
    Outputs: x' [B, N - r_eff, C], size' [B, N - r_eff, 1], mask' [B, N - r_eff] (or None).

Proportional attention (adding log(size) to the attention logits of later blocks) is the rewriter's job;
`log_size_bias` gives that bias for the PyTorch reference model.

ONNX form: standard opset-18 ops, no Scatter*, static output shapes, dynamic batch. ONNX Runtime spends a few
microseconds on every node at batch 1 and moves bytes at memory speed at batch 8, so a merge should have few
nodes and, above all, few passes over the full-width tokens. Only the unprotected tokens are scored (slicing them
out equals scoring the protected ones PROTECTED_SCORE). One TopK ranks every token, A tokens by their best score
and then the protected and B tokens (padded in with PROTECTED_SCORE, in index order): its first r entries merge
and the other N - r are the output tokens, which one small TopK over token-number keys puts in step 8's order.
Each merge then computes the whole new row of its B token from the r merged rows alone (a [r, r] x [r, C] GEMM),
those r rows are appended to x, and one GatherND of every output row from [x; merged rows] writes the output:
x is read once and x' written once, the only full-width passes. Every index is a [B, k, 1] column that GatherND
(batch_dims=1) takes as is.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from tcexport.core.errors import UsageError
from tcexport.core.lazy import lazy_import
from tcexport.methods.params import REQUIRED, Param
from tcexport.methods.plugin import PluginSpec
from tcexport.methods.registry import register
from tcexport.methods.base import Method, TokenState
from tcexport.methods.emit import Emitter as _Emitter
from tcexport.methods.emit import numpy_dtype as _numpy_dtype
from tcexport.methods.emit import rows, typed_state

torch = lazy_import("torch")  # the references need it; the declarations do not

PAD_BONUS = 4.0
PROTECTED_SCORE = -1.0e4
NORM_EPS = 1e-6
OPSET = 18
SCHEDULES = ("constant", "decreasing")


def effective_r(r: int, n_in: int, protected: int) -> int:
    """Tokens actually removed: at most half of the unprotected tokens (spec step 1)."""
    return max(0, min(r, (n_in - protected) // 2))


def log_size_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional-attention bias for attention logits [B, H, Nq, N]: log(size) as [B, 1, 1, N]."""
    return size.log()[:, None, None, :, 0]


def schedule(r: int, num_layers: int, kind: str = "constant") -> list[int]:
    """Tokens to remove at each of `num_layers` blocks, as ToMe's `parse_r`.

    constant:   [r] * num_layers (ToMe's r or (r, 0)).
    decreasing: ToMe's (r, -1), the paper's "decreasing schedule": r falls linearly from 2r at the first
                layer to 0 at the last, each value truncated to int: int(2r + i * (-2r / (num_layers - 1))),
                computed in floating point in that order so it equals ToMe's list value for value.
    With one layer ToMe would divide by zero; here the schedule is then its first value ([r] or [2r]).
    The per-block cap (r_eff) still applies when the schedule is used.
    """
    _check_count("r", r)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise UsageError(f"schedule needs num_layers as an int >= 1, got {num_layers!r}")
    if kind not in SCHEDULES:
        raise UsageError(f"unknown ToMe schedule '{kind}'; choose one of {', '.join(SCHEDULES)}")
    inflect = 0.0 if kind == "constant" else -1.0
    first = int(r * (1.0 - inflect))
    last = 2 * r - first
    if num_layers == 1:
        return [first]
    step = (last - first) / (num_layers - 1)
    return [int(first + step * i) for i in range(num_layers)]


def _check_count(label: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"ToMe parameter {label} must be a whole number of tokens, got {value!r}")
    if value < 0:
        raise UsageError(f"ToMe parameter {label} must be >= 0, got {value}")


def _first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum along the last axis (explicit, not relying on torch's tie rule)."""
    best = scores.amax(dim=-1, keepdim=True)
    index = torch.arange(scores.shape[-1], device=scores.device).expand_as(scores)
    return torch.where(scores == best, index, scores.shape[-1]).amin(dim=-1)


@register
class ToMe(Method):
    """ToMe bipartite soft matching: merge the r most similar A->B token pairs per block, size-weighted."""

    name = "tome"

    family = "similarity merging"
    parameters = (Param("r", int, "tokens removed per chosen layer: one int, or one per layer", default=REQUIRED,
                        low=0, per_layer=True, example=8),)
    plugin = PluginSpec("ToMeMerge", description="ToMe bipartite soft matching: merge r token pairs (size-weighted)",
                        python_aot=True, fields=("r", "protected"), cpp=True, ort=True)

    def plugin_fields(self, n_in: int, n_out: int, protected: int) -> dict[str, int]:
        """r = tokens this block removes (ToMe's per-block cap applied); protected as the stage was built."""
        return {"r": n_in - n_out, "protected": protected}

    @property
    def r(self) -> int:
        return self.params["r"]

    def tokens_out(self, n_in: int, protected: int) -> int:
        return n_in - effective_r(self.r, n_in, protected)

    def check_fits(self, n_in: int, protected: int) -> None:
        cap = max(0, (n_in - protected) // 2)
        if self.r > cap:
            raise UsageError(f"ToMe r={self.r} is more than a block with {n_in} tokens ({protected} protected) can "
                             f"merge: at most (N - protected) // 2 = {cap}; lower --r")

    # ------------------------------------------------------------------ PyTorch reference

    def reference(self, x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor,
                  mask: torch.Tensor | None, protected: int, signals: dict | None = None) -> TokenState:
        n_in = x.shape[1]
        r = effective_r(self.r, n_in, protected)
        if r == 0:
            return TokenState(x, size, mask)
        with torch.no_grad():
            src_idx, dst_idx, unm_idx = self._match(metric, mask, protected, r)
        return self._merge(x, size, mask, protected, src_idx, dst_idx, unm_idx)

    @staticmethod
    def _match(metric, mask, protected, r):
        """Which A tokens merge (src_idx, [B, r]) into which B tokens (dst_idx), and which A stay (unm_idx)."""
        unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2)
        if mask is not None:
            pad_a = (mask[:, ::2] == 0)[:, :, None]
            pad_b = (mask[:, 1::2] == 0)[:, None, :]
            scores = torch.where(pad_a & pad_b, scores + PAD_BONUS, scores)
            scores = torch.where(pad_a ^ pad_b, scores - PAD_BONUS, scores)
        token = torch.arange(metric.shape[1], device=metric.device)
        locked = (token[::2, None] < protected) | (token[None, 1::2] < protected)
        scores = scores.masked_fill(locked, PROTECTED_SCORE)

        node_max = scores.amax(dim=-1)
        node_idx = _first_argmax(scores)
        ranked = torch.sort(node_max, dim=-1, descending=True, stable=True).indices
        src_idx = ranked[:, :r]
        unm_idx = ranked[:, r:].sort(dim=-1).values
        dst_idx = node_idx.gather(1, src_idx)
        return src_idx, dst_idx, unm_idx

    @staticmethod
    def _merge(x, size, mask, protected, src_idx, dst_idx, unm_idx):
        """Size-weighted merge of the chosen A tokens into B; lay out [protected, unmerged A, B]."""
        channels = x.shape[-1]
        weighted = x * size
        a_sum, b_sum = weighted[:, ::2], weighted[:, 1::2]
        a_size, b_size = size[:, ::2], size[:, 1::2]

        b_sum = b_sum.scatter_add(1, dst_idx[..., None].expand(-1, -1, channels), rows(a_sum, src_idx))
        b_size = b_size.scatter_add(1, dst_idx[..., None], rows(a_size, src_idx))

        # Protected tokens are never merged: they pass through unchanged. They are the first
        # ceil(p/2) unmerged A tokens and the first floor(p/2) B tokens.
        keep_a, keep_b = (protected + 1) // 2, protected // 2
        unm_idx = unm_idx[:, keep_a:]
        x_new = torch.cat([x[:, :protected],
                           rows(a_sum, unm_idx) / rows(a_size, unm_idx),
                           b_sum[:, keep_b:] / b_size[:, keep_b:]], dim=1)
        size_new = torch.cat([size[:, :protected], rows(a_size, unm_idx), b_size[:, keep_b:]], dim=1)
        if mask is None:
            return TokenState(x_new, size_new, None)
        a_mask, b_mask = mask[:, ::2], mask[:, 1::2]
        b_mask = b_mask.scatter_reduce(1, dst_idx, a_mask.gather(1, src_idx), reduce="amax")
        mask_new = torch.cat([mask[:, :protected], a_mask.gather(1, unm_idx), b_mask[:, keep_b:]], dim=1)
        return TokenState(x_new, size_new, mask_new)

    # ------------------------------------------------------------------ ONNX builder

    def build_onnx(self, op: tape.Tape, x: ir.Value, metric: ir.Value, size: ir.Value,
                   mask: ir.Value | None, n_in: int, protected: int,
                   name_prefix: str = "tome", signals: dict | None = None) -> TokenState:
        r = effective_r(self.r, n_in, protected)
        if r == 0:
            return TokenState(x, size, mask)
        g = _Emitter(op, name_prefix, _numpy_dtype(x))
        n, p = n_in, protected
        # Only unprotected tokens take part in the matching (steps 2-7): A = even indices >= p, B = odd ones.
        # Leaving protected rows and columns out is the same as scoring them PROTECTED_SCORE (spec step 5).
        a0, b0 = p + p % 2, p + 1 - p % 2
        a_tokens, b_tokens = np.arange(a0, n, 2), np.arange(b0, n, 2)
        n_a, n_b = len(a_tokens), len(b_tokens)
        n_stay = n_a - r + p  # tokens copied unchanged: the protected ones and the unmerged A tokens
        n_out = n - r

        # Steps 2-5: scores [B, Na, Nb] of unit metrics.
        norm = g.op("norm", "ReduceL2", metric, g.i64("axis_last", [-1]), keepdims=1)
        norm = g.op("norm_clamped", "Max", norm, g.const("eps", NORM_EPS))
        unit = g.op("unit", "Div", metric, norm)
        unit_bt = g.op("unit_b_t", "Transpose", g.every_other("unit_b", unit, b0, n), perm=[0, 2, 1])
        scores = g.op("scores", "MatMul", g.every_other("unit_a", unit, a0, n), unit_bt)
        if mask is not None:
            pad = g.op("pad", "Sub", g.const("one", 1.0), mask)
            pad_a = g.op("pad_a", "Unsqueeze", g.every_other("pad_a_flat", pad, a0, n), g.i64("axis2", [2]))
            pad_b = g.op("pad_b", "Unsqueeze", g.every_other("pad_b_flat", pad, b0, n), g.i64("axis1", [1]))
            # +PAD_BONUS for padding pairs, -PAD_BONUS for mixed pairs, 0 for real pairs (0/1 masks):
            # 3*PAD_BONUS*pad_a*pad_b - PAD_BONUS*(pad_a + pad_b).
            both = g.op("pad_both", "Mul", pad_a, pad_b)
            either = g.op("pad_either", "Add", pad_a, pad_b)
            bias = g.op("pad_bias", "Sub", g.op("pad_both_w", "Mul", both, g.const("bonus3", 3 * PAD_BONUS)),
                        g.op("pad_either_w", "Mul", either, g.const("bonus", PAD_BONUS)))
            scores = g.op("scores_padded", "Add", scores, bias)

        # Steps 6-7, with every index kept as a [B, k, 1] column so GatherND (batch_dims=1) takes it as is.
        # Best B partner of each A token, [B, Na, 1] each: TopK with k=1 gives the max and its first index.
        node_max, node_idx = g.op_multi("node_best", "TopK", 2, scores, g.i64("k_best", [1]), axis=-1, largest=1,
                                        sorted=1)
        # The protected tokens and then the B tokens join the ranking last (PROTECTED_SCORE, ties kept in index
        # order): one ranking yields the r merged A tokens and, after them, every output token in some order.
        n_ranked = n_a + p + n_b
        ranked = g.op("ranked", "Pad", node_max, g.i64("pads", [0, 0, 0, 0, p + n_b, 0]),
                      g.const("protected_score", PROTECTED_SCORE))
        _, order = g.op_multi("rank", "TopK", 2, ranked, g.i64("k_all", [n_ranked]), axis=1, largest=1, sorted=1)
        src, rest = g.op_multi("split", "Split", 2, order, g.i64("split_sizes", [r, n_out]), axis=1)
        src_tok = g.op("src_tok", "Gather", g.i64("a_tokens", a_tokens), src, axis=0)  # [B, r, 1]
        dst = g.op("dst_idx", "GatherElements", node_idx, src, axis=1)  # [B, r, 1], into the B tokens
        dst_tok = g.op("dst_tok", "Gather", g.i64("b_tokens", b_tokens), dst, axis=0)
        # Step 8's layout from one sort of token keys (float32: TopK on integers is not portable; small integers
        # are exact): protected and A tokens are keyed by their number, B tokens by their number + N, so they
        # sort last; subtracting N again from the last Nb keys gives every output token's source row.
        table = np.concatenate([a_tokens, np.arange(p), b_tokens + n])
        keys = g.op("out_keys", "Gather", g.const("out_key_table", table, np.float32), rest, axis=0)
        sorted_keys, _ = g.op_multi("out_sorted", "TopK", 2, keys, g.i64("k_out", [n_out]), axis=1, largest=0,
                                    sorted=1)
        offsets = np.concatenate([np.zeros(n_stay), np.full(n_b, n)])[:, None]
        out_rows = g.op("out_rows", "Sub", sorted_keys, g.const("out_offsets", offsets, np.float32))  # [B, N - r, 1]

        # Step 9. Each merge k computes the new row of its B token j = dst_k in full (all merges landing on j
        # give j the same row): x'_j = (size_j x_j + sum_k' size_src_k' x_src_k') / size'_j over the merges k'
        # landing on j, summed as the reference sums it, so equal shares stay exactly equal (graph/positions.py
        # reads the largest share). Those r rows are appended to x, and one gather of every output row from
        # [x; merged rows] writes x': x is read and x' written once each, the only full-width passes.
        def rows(label: str, value: ir.Value, index: ir.Value) -> ir.Value:
            return g.op(label, "GatherND", value, index, batch_dims=1)

        dst_row = g.op("dst_row", "Transpose", dst, perm=[0, 2, 1])  # [B, 1, r]
        same_dst = g.op("same_dst", "Equal", dst, dst_row)  # [B, r, r]: merges k and k' land on one B token
        zero = g.const("zero", 0.0)
        size_src = rows("size_src", size, src_tok)
        size_dst = rows("size_dst", size, dst_tok)
        inflow = g.op("inflow", "Where", same_dst, g.op("size_src_row", "Transpose", size_src, perm=[0, 2, 1]), zero)
        size_merged = g.op("size_merged", "Add", size_dst,
                           g.op("inflow_sum", "ReduceSum", inflow, g.i64("axis_last_r", [-1]), keepdims=1))
        x_sum = g.op("x_merged_sum", "Add", g.op("x_dst_weighted", "Mul", rows("x_dst", x, dst_tok), size_dst),
                     g.op("x_in", "MatMul", inflow, rows("x_src", x, src_tok)))  # [B, r, C]
        x_merged = g.op("x_merged", "Div", x_sum, size_merged)

        # Which row each output token reads: a B token that received merges reads row N + k of a merge k landing
        # on it (any such k: they computed the same row; N + k exceeds every token number, so a max picks one),
        # every other token its own row. Float32 until the one Cast: token numbers are exact there.
        lands = g.op("lands", "Equal", dst_row, g.i64("out_position", np.arange(n_out)[:, None] - n_stay))
        merged_rows = g.op("merged_rows", "Where", lands, g.const("merged_row_number", n + np.arange(r)[None, :],
                                                                  np.float32), g.const("zero_f", 0.0, np.float32))
        source_row = g.op("source_row", "Cast", g.op("source_row_f", "Max", out_rows, g.op(
            "merged_row", "ReduceMax", merged_rows, g.i64("axis_last_k", [-1]), keepdims=1)), to=ir.DataType.INT64)

        def gathered(label: str, value: ir.Value, merged: ir.Value) -> ir.Value:
            table = g.op(f"{label}_rows", "Concat", value, merged, axis=1)  # [B, N + r, ...]
            return rows(label, table, source_row)

        x_new = gathered("x_out", x, x_merged)
        size_new = gathered("size_out", size, size_merged)
        mask_new = None
        if mask is not None:  # 0/1 masks: a token is real when it or any token merged into it is
            mask_col = g.op("mask_col", "Unsqueeze", mask, g.i64("axis2_m", [2]))  # [B, N, 1]
            mask_src = g.op("mask_src_row", "Transpose", rows("mask_src", mask_col, src_tok), perm=[0, 2, 1])
            mask_in = g.op("mask_in", "Where", same_dst, mask_src, g.const("mask_zero", 0.0, _numpy_dtype(mask)))
            mask_merged = g.op("mask_merged", "Max", rows("mask_dst", mask_col, dst_tok),
                               g.op("mask_in_any", "ReduceMax", mask_in, g.i64("axis_last_m", [-1]), keepdims=1))
            mask_new = g.op("mask_out", "Squeeze", gathered("mask_out_col", mask_col, mask_merged),
                            g.i64("axis2_q", [2]))
        return typed_state(x_new, size_new, mask_new, TokenState(x, size, mask), n_out)
