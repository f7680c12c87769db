"""Adjacent: merge the most similar neighbouring tokens of an ordered sequence (A-ToMe, Li et al., Interspeech
2023, "Accelerating Transformer-Based Speech Recognition with Adjacent Token Merging").

For sequences whose order carries meaning (speech frames, text), merging is restricted to neighbours and the
merged token stays where its pair was, so the order is preserved.

Spec (both implementations below follow it; tests compare them)
---------------------------------------------------------------
Inputs as in `tcexport.methods.base`: x [B,N,C], metric [B,N,Ck] (keys averaged over heads), size [B,N,1],
mask [B,N] (0/1) or None, `protected` leading tokens p. Parameter r >= 0: tokens to remove at this block.

 1. Candidate pairs are fixed and disjoint: P_k = (p + 2k, p + 2k + 1) for k < cap = (N - p) // 2, i.e. the
    unprotected tokens taken two by two from the first one (the static even/odd split of ToMe for sequences:
    a token is the left member of at most one pair and the right member of at most one, so chosen pairs never
    overlap and no chain forms). With N - p odd the last token is in no pair. A neighbour pair that straddles
    two candidate pairs, (p + 2k + 1, p + 2k + 2), is never merged at this block.
 2. r_eff = min(r, cap); if r_eff == 0 the inputs are returned unchanged. tokens_out = N - r_eff.
 3. score_k = cosine of the keys of the pair: the metric scaled to unit L2 norm (norm clamped below at
    NORM_EPS), score_k = sum(unit_left * unit_right).
 4. With a mask, ToMe's PAD tiers: a pair of two padding tokens gets +PAD_BONUS (4), a pair mixing a real and a
    padding token -PAD_BONUS, a real pair keeps its cosine. So pure padding pairs merge first, then real pairs,
    and a mixed pair merges only when r_eff exceeds the number of pure pairs.
 5. The r_eff pairs with the largest score merge; ties go to the lower pair index k (ONNX TopK, largest=1,
    sorted=1; torch: stable descending sort).
 6. A merged pair becomes one token at the pair's place, size-weighted:
    x' = (size_l * x_l + size_r * x_r) / (size_l + size_r), size' = size_l + size_r, mask' = max(mask_l, mask_r).
    Unmerged tokens (and the protected ones) are copied unchanged. Output: every token in its original order,
    each merged pair as one token: x' [B, N - r_eff, C], size' [B, N - r_eff, 1], mask' [B, N - r_eff].

check_fits rejects r > cap at the first compressed block; later blocks holding fewer tokens cap r as ToMe does.
There is no per-block offset: pairs always start at the first unprotected token.

ONNX form: standard opset-18 ops, no Scatter*, static shapes, dynamic batch. Two strided Slices give the
pair members, ReduceSum their cosine, TopK (k = r_eff) the merged pairs; Equal against constant tables marks
the dropped right members and the merging left members ([B, r, N], ReduceMax); a TopK on negated float keys
lists the N - r_eff surviving tokens in order; a constant "next token" table (Gather) gives each survivor's
right neighbour; GatherND (batch_dims=1) copies rows and a Where picks merged or copied values. No integer
arithmetic on indices. TensorRT needs N < 3840.
"""

from __future__ import annotations


import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from tcexport.core.errors import UsageError
from tcexport.core.lazy import lazy_import
from tcexport.methods.params import REQUIRED, Param
from tcexport.methods.registry import register
from tcexport.methods.base import Method, TokenState
from tcexport.methods.tome import NORM_EPS, PAD_BONUS
from tcexport.methods.emit import Emitter as _Emitter
from tcexport.methods.emit import ir_dtype as _ir_dtype
from tcexport.methods.emit import rows as _rows
from tcexport.methods.emit import typed_state

torch = lazy_import("torch")  # the references need it; the declarations do not


def pair_cap(n_in: int, protected: int) -> int:
    """Candidate pairs in a block (spec step 1): the most tokens adjacent merging can remove there."""
    return max(0, (n_in - protected) // 2)


def effective_r(r: int, n_in: int, protected: int) -> int:
    return min(r, pair_cap(n_in, protected))


@register
class Adjacent(Method):
    """Merge the r most similar neighbouring pairs (fixed, disjoint pairs), keeping the sequence order."""

    name = "adjacent"
    needs = frozenset({"keys"})

    family = "similarity merging"
    parameters = (Param("r", int, "neighbouring pairs merged per block", default=REQUIRED, low=0, example=8),)

    @property
    def r(self) -> int:
        return self.params["r"]

    def tokens_out(self, n_in: int, protected: int) -> int:
        return n_in - effective_r(self.r, n_in, protected)

    def check_fits(self, n_in: int, protected: int) -> None:
        cap = pair_cap(n_in, protected)
        if self.r > cap:
            raise UsageError(f"adjacent r={self.r} is more than a block with {n_in} tokens ({protected} protected) "
                             f"can merge: at most (N - protected) // 2 = {cap} neighbouring pairs; lower --r")

    # ------------------------------------------------------------------ PyTorch reference

    def reference(self, x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor,
                  mask: torch.Tensor | None, protected: int, signals: dict | None = None) -> TokenState:
        n, p = x.shape[1], protected
        r = effective_r(self.r, n, p)
        if r == 0:
            return TokenState(x, size, mask)
        end = p + 2 * pair_cap(n, p)
        with torch.no_grad():
            unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
            score = (unit[:, p:end:2] * unit[:, p + 1:end:2]).sum(dim=-1)  # [B, cap]
            if mask is not None:
                pad_l, pad_r = mask[:, p:end:2] == 0, mask[:, p + 1:end:2] == 0
                score = torch.where(pad_l & pad_r, score + PAD_BONUS, score)
                score = torch.where(pad_l ^ pad_r, score - PAD_BONUS, score)
            chosen = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :r]  # pair indices
            merging = torch.zeros(x.shape[0], n, dtype=torch.bool, device=x.device)
            merging.scatter_(1, p + 2 * chosen, True)  # left members of merged pairs
            dropped = torch.zeros_like(merging)
            dropped.scatter_(1, p + 2 * chosen + 1, True)  # right members: they disappear
            token = torch.arange(n, device=x.device).expand(x.shape[0], n)
            keep_idx = torch.where(dropped, token + n, token).sort(dim=1).values[:, :n - r]
            right_idx = (keep_idx + 1).clamp_max(n - 1)
            merged = merging.gather(1, keep_idx)  # [B, N - r]

        x_k, s_k = _rows(x, keep_idx), _rows(size, keep_idx)
        x_r, s_r = _rows(x, right_idx), _rows(size, right_idx)
        m = merged[..., None]
        x_pair = (x_k * s_k + x_r * s_r) / (s_k + s_r)
        x_new = torch.where(m, x_pair, x_k)
        size_new = s_k + s_r * m.to(size.dtype)
        if mask is None:
            return TokenState(x_new, size_new, None)
        mask_new = torch.maximum(mask.gather(1, keep_idx), mask.gather(1, right_idx) * merged.to(mask.dtype))
        return TokenState(x_new, size_new, mask_new)

    # ------------------------------------------------------------------ ONNX builder

    def build_onnx(self, op: tape.Tape, x: ir.Value, metric: ir.Value, size: ir.Value,
                   mask: ir.Value | None, n_in: int, protected: int,
                   name_prefix: str = "adjacent", signals: dict | None = None) -> TokenState:
        n, p = n_in, protected
        r = effective_r(self.r, n, p)
        if r == 0:
            return TokenState(x, size, mask)
        cap = pair_cap(n, p)
        end = p + 2 * cap
        n_out = n - r
        float_type = _ir_dtype(x)
        g = _Emitter(op, name_prefix, np.dtype(float_type.numpy()))

        def strided(label: str, value: ir.Value, start: int) -> ir.Value:
            """value[:, start:end:2] along the token axis."""
            return g.op(label, "Slice", value, g.i64(f"{label}_start", [start]), g.i64(f"{label}_end", [end]),
                        g.i64(f"{label}_axis", [1]), g.i64(f"{label}_step", [2]))

        def rows(label: str, value: ir.Value, index: ir.Value) -> ir.Value:
            """value[b, index[b, i], :] for every batch row b: GatherND with batch_dims=1."""
            column = g.op(f"{label}_index", "Unsqueeze", index, g.i64(f"{label}_axis", [2]))
            return g.op(label, "GatherND", value, column, batch_dims=1)

        # Steps 3-5: pair scores and the r pairs that merge.
        norm = g.op("norm", "ReduceL2", metric, g.i64("axis_last", [-1]), keepdims=1)
        norm = g.op("norm_clamped", "Max", norm, g.const("eps", NORM_EPS))
        unit = g.op("unit", "Div", metric, norm)
        score = g.op("score", "ReduceSum", g.op("unit_prod", "Mul", strided("unit_left", unit, p),
                                                strided("unit_right", unit, p + 1)),
                     g.i64("axis_last_s", [-1]), keepdims=0)  # [B, cap]
        if mask is not None:
            pad = g.op("pad", "Sub", g.const("one", 1.0), mask)
            pad_l, pad_r = strided("pad_left", pad, p), strided("pad_right", pad, p + 1)
            # +PAD_BONUS for padding pairs, -PAD_BONUS for mixed pairs, 0 for real pairs (0/1 masks).
            both = g.op("pad_both", "Mul", pad_l, pad_r)
            either = g.op("pad_either", "Add", pad_l, pad_r)
            bias = g.op("pad_bias", "Sub", g.op("pad_both_w", "Mul", both, g.const("bonus3", 3 * PAD_BONUS)),
                        g.op("pad_either_w", "Mul", either, g.const("bonus", PAD_BONUS)))
            score = g.op("score_padded", "Add", score, bias)
        _, chosen = g.op_multi("chosen", "TopK", 2, score, g.i64("k", [r]), axis=-1, largest=1, sorted=1)
        chosen_col = g.op("chosen_col", "Unsqueeze", chosen, g.i64("axis2", [2]))  # [B, r, 1]

        def marks(label: str, offset: int) -> ir.Value:
            """[B, N] float: 1 at the member (offset 0 left, 1 right) of every chosen pair."""
            table = np.full(n, -1, dtype=np.int64)  # token -> pair index when it is that member, else -1
            table[p + offset:end:2] = np.arange(cap)
            hits = g.op(f"{label}_hits", "Equal", chosen_col, g.i64(f"{label}_table", table))  # [B, r, N]
            return g.op(label, "ReduceMax", g.op(f"{label}_hits_f", "Cast", hits, to=ir.DataType.FLOAT),
                        g.i64(f"{label}_axis", [1]), keepdims=0)

        merging, dropped = marks("merging", 0), marks("dropped", 1)
        # Survivors in original order: the N - r smallest keys index + N * dropped (float32: exact integers).
        key = g.op("keep_key", "Add", g.op("drop_push", "Mul", dropped, g.const("push_by", float(n), np.float32)),
                   g.const("token_index", np.arange(n), np.float32))
        _, keep_idx = g.op_multi("keep", "TopK", 2, g.op("neg_key", "Neg", key), g.i64("k_keep", [n_out]),
                                 axis=-1, largest=1, sorted=1)
        right_idx = g.op("right_idx", "Gather", g.i64("next_token", np.minimum(np.arange(n) + 1, n - 1)), keep_idx,
                         axis=0)  # [B, N - r]
        merged = g.op("merged", "GatherElements", merging, keep_idx, axis=1)  # [B, N - r], 1 = takes its right
        merged_col = g.op("merged_col", "Unsqueeze", merged, g.i64("axis2_m", [2]))
        takes = g.op("takes", "Greater", merged_col, g.const("half", 0.5, np.float32))

        # Step 6: size-weighted pairs, copies elsewhere.
        x_k, s_k = rows("x_keep", x, keep_idx), rows("size_keep", size, keep_idx)
        x_r, s_r = rows("x_right", x, right_idx), rows("size_right", size, right_idx)
        x_pair = g.op("x_pair", "Div", g.op("x_pair_sum", "Add", g.op("x_keep_w", "Mul", x_k, s_k),
                                            g.op("x_right_w", "Mul", x_r, s_r)),
                      g.op("size_pair", "Add", s_k, s_r))
        x_new = g.op("x_out", "Where", takes, x_pair, x_k)
        merged_f = g.op("merged_cast", "Cast", merged_col, to=_ir_dtype(size))
        size_new = g.op("size_out", "Add", s_k, g.op("size_right_w", "Mul", s_r, merged_f))
        mask_new = None
        if mask is not None:
            merged_m = g.op("merged_mask", "Cast", merged, to=_ir_dtype(mask))
            mask_k = g.op("mask_keep", "GatherElements", mask, keep_idx, axis=1)
            mask_r = g.op("mask_right", "Mul", g.op("mask_right_raw", "GatherElements", mask, right_idx, axis=1),
                          merged_m)
            mask_new = g.op("mask_out", "Max", mask_k, mask_r)
        return typed_state(x_new, size_new, mask_new, TokenState(x, size, mask), n_out)

