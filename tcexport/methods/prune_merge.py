"""Prune-merge: keep the dominant tokens by CLS attention, merge the rest into a few contextual tokens.

The static form of the prune-then-merge hybrids (PuMer, LLaVA-PruMerge) as VisionZip runs it: a fixed number
of "dominant" tokens is kept by attention and a fixed number of "contextual" tokens summarises the others.
PruMerge's data-dependent IQR rule is out (engines need static counts, DESIGN.md section 4).

Spec (both implementations below follow it; tests compare them)
---------------------------------------------------------------
Inputs as in `tcexport.methods.base`: x [B,N,C], metric [B,N,Ck] (keys averaged over heads), size [B,N,1],
mask [B,N] (0/1) or None, `protected` leading tokens p, and signals["cls_attention"] [B,N] (how much the CLS
token, query 0, attends to each token, averaged over heads).
Parameters: dominant K >= 1 and contextual M >= 1, both required. contextual=0 is rejected: it would be
plain top-k pruning (the dropped tokens vanish), which is the `topk` method.

 1. U = N - p unprotected tokens. If U <= K + M there is nothing to compress: the inputs come back unchanged
    (tokens_out = N). Otherwise tokens_out = p + K + M, and R = U - K >= M + 1 tokens remain after step 3.
 2. Dominance score = cls_attention, minus PAD_BONUS (4) for padding tokens (mask 0), and PROTECTED_SCORE
    (-1e4) for protected ones. Attention lies in [0, 1], so every real token ranks above every padding token
    (padding already gets exactly 0 attention; the tier also covers real tokens whose attention underflowed
    to 0 and any other source of masks), and protected tokens rank last.
 3. Dominant tokens: the K unprotected tokens with the highest score, ties to the lower token index (ONNX
    TopK, largest=1, sorted=1; torch: stable descending sort). They are copied unchanged (x, size, mask) and
    laid out in their original order.
 4. The R remaining unprotected tokens are listed real tokens first, then padding tokens, each group in
    original order (key = index + N * is_padding; for the usual trailing padding this is just index order).
 5. Targets: the M tokens at list positions t_j = floor((j * (R - 1) * 2 + (M - 1)) / (2 * (M - 1))), i.e.
    round-half-up(j * (R - 1) / (M - 1)), for j = 0 .. M-1 (t_0 = 0 when M == 1): evenly spread over the
    list, first and last included (VisionZip spreads with step R // M from position 0; including the last
    position is what makes the padding rule below work). The positions are distinct because R > M.
 6. Every other remaining token (R - M of them) joins its most similar target: score = cosine of the keys
    (metric scaled to unit L2 norm, norm clamped below at NORM_EPS), plus the PAD tiers of ToMe: +PAD_BONUS
    when both are padding, -PAD_BONUS when one is, so a token joins a target of its own kind whenever one
    exists. Argmax over targets, ties to the lowest target index j.
    Padding rule: because the list is real-first and targets include both ends, with M >= 2 the first target
    is real whenever a real token remains and the last is padding whenever a padding token remains, so real
    and padding tokens never mix. With M == 1 the single target is the first listed token (real if any) and
    the other kind has to join it (unavoidable with one contextual token).
 7. Merge, size-weighted, for each target j over itself and the tokens that joined it:
    x'_j = sum(size_i * x_i) / sum(size_i), size'_j = sum(size_i), mask'_j = max(mask_i).
 8. Output: [protected tokens (unchanged), K dominant tokens (original order), M contextual tokens (target
    order j)]: x' [B, p+K+M, C], size' [B, p+K+M, 1], mask' [B, p+K+M] (or None).

check_fits rejects K + M > N - p at the first compressed block (U == K + M is allowed: a no-op). Later blocks
holding fewer tokens are no-ops by step 1.

ONNX form: standard opset-18 ops, no Scatter*, static shapes, dynamic batch. One TopK (k = U) ranks the
unprotected tokens; Slices split dominant and remaining; TopKs on negated float keys (k = K, k = R) restore
original / real-first order; Gather with constant positions picks targets and joiners; GatherND (batch_dims=1)
copies rows; the merge is a one-hot [B, M, R-M] @ [B, R-M, C] MatMul. TensorRT needs U < 3840.
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
from tcexport.methods.tome import NORM_EPS, PAD_BONUS, PROTECTED_SCORE, _first_argmax
from tcexport.methods.emit import Emitter as _Emitter
from tcexport.methods.emit import ir_dtype as _ir_dtype
from tcexport.methods.emit import rows as _rows
from tcexport.methods.emit import typed_state

torch = lazy_import("torch")  # the references need it; the declarations do not



def target_positions(remaining: int, contextual: int) -> np.ndarray:
    """Positions of the M targets in the remaining list of R tokens (spec step 5): round-half-up linspace."""
    if contextual == 1:
        return np.zeros(1, dtype=np.int64)
    j = np.arange(contextual, dtype=np.int64)
    return (j * (remaining - 1) * 2 + (contextual - 1)) // (2 * (contextual - 1))


@register
class PruneMerge(Method):
    """Keep K tokens by CLS attention, merge the rest into M evenly spread contextual tokens."""

    name = "prune-merge"
    needs = frozenset({"cls_attention", "keys"})

    family = "hybrid"
    parameters = (Param("dominant", int, "tokens kept by CLS attention", default=REQUIRED, low=1, example=54),
                  Param("contextual", int, "tokens the rest are merged into", default=REQUIRED, low=1, example=10,
                        hint=" (pruning without merging is --method topk)"))
    # No TensorRT plugin yet; ONNX Runtime runs the --impl plugin node (plugins/ort, prune_merge_rows.h).
    plugin = PluginSpec("TokenPruneMerge", description="keep K tokens by CLS attention, merge the rest into M",
                        fields=("dominant", "contextual", "protected"), ort=True)

    def plugin_fields(self, n_in: int, n_out: int, protected: int) -> dict[str, int]:
        """dominant K and contextual M as given; protected as the stage was built."""
        return {"dominant": self.dominant, "contextual": self.contextual, "protected": protected}

    @property
    def dominant(self) -> int:
        return self.params["dominant"]

    @property
    def contextual(self) -> int:
        return self.params["contextual"]

    def active(self, n_in: int, protected: int) -> bool:
        """False when the block holds no more than protected + K + M tokens (spec step 1: a no-op)."""
        return n_in - protected > self.dominant + self.contextual

    def tokens_out(self, n_in: int, protected: int) -> int:
        if not self.active(n_in, protected):
            return n_in
        return protected + self.dominant + self.contextual

    def check_fits(self, n_in: int, protected: int) -> None:
        free = n_in - protected
        if self.dominant + self.contextual > free:
            raise UsageError(f"prune-merge dominant={self.dominant} + contextual={self.contextual} is more than "
                             f"the {free} unprotected tokens of a block with {n_in} tokens ({protected} protected); "
                             "lower --dominant or --contextual")

    @staticmethod
    def _signal(signals: dict | None) -> Any:
        score = (signals or {}).get("cls_attention")
        if score is None:
            raise UsageError("prune-merge needs the CLS attention signal (signals['cls_attention'], [B, N])")
        return score

    # ------------------------------------------------------------------ PyTorch reference

    def reference(self, x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor,
                  mask: torch.Tensor | None, protected: int, signals: dict | None = None) -> TokenState:
        n, p = x.shape[1], protected
        if not self.active(n, p):
            return TokenState(x, size, mask)
        k, m = self.dominant, self.contextual
        u = n - p
        rem = u - k
        cls_attention = self._signal(signals)
        with torch.no_grad():
            score = cls_attention
            if mask is not None:
                score = score - (1.0 - mask) * PAD_BONUS
            token = torch.arange(n, device=x.device)
            score = torch.where(token < p, torch.full_like(score, PROTECTED_SCORE), score)
            ranked = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :u]
            dom_idx = ranked[:, :k].sort(dim=1).values
            rem_idx = ranked[:, k:]
            key = rem_idx.to(torch.float32)
            if mask is not None:
                key = key + (1.0 - mask).gather(1, rem_idx).to(torch.float32) * n
            rem_idx = rem_idx.gather(1, key.argsort(dim=1))  # keys are distinct
            t_pos = torch.from_numpy(target_positions(rem, m)).to(x.device)
            nt_pos = torch.from_numpy(np.setdiff1d(np.arange(rem), target_positions(rem, m))).to(x.device)
            tgt_idx, ntg_idx = rem_idx[:, t_pos], rem_idx[:, nt_pos]

            unit = metric / metric.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
            scores = _rows(unit, ntg_idx) @ _rows(unit, tgt_idx).transpose(-1, -2)  # [B, R-M, M]
            if mask is not None:
                pad_n = (mask.gather(1, ntg_idx) == 0)[:, :, None]
                pad_t = (mask.gather(1, tgt_idx) == 0)[:, None, :]
                scores = torch.where(pad_n & pad_t, scores + PAD_BONUS, scores)
                scores = torch.where(pad_n ^ pad_t, scores - PAD_BONUS, scores)
            assign = _first_argmax(scores)  # [B, R-M]
            joins = (assign[:, None, :] == torch.arange(m, device=x.device)[None, :, None]).to(x.dtype)  # [B,M,R-M]

        x_t, s_t = _rows(x, tgt_idx), _rows(size, tgt_idx)
        x_n, s_n = _rows(x, ntg_idx), _rows(size, ntg_idx)
        size_ctx = s_t + joins @ s_n
        x_ctx = (x_t * s_t + joins @ (x_n * s_n)) / size_ctx
        x_new = torch.cat([x[:, :p], _rows(x, dom_idx), x_ctx], dim=1)
        size_new = torch.cat([size[:, :p], _rows(size, dom_idx), size_ctx], dim=1)
        if mask is None:
            return TokenState(x_new, size_new, None)
        m_t, m_n = mask.gather(1, tgt_idx), mask.gather(1, ntg_idx)
        mask_ctx = ((m_t[..., None] + joins @ m_n[..., None])[..., 0] > 0).to(mask.dtype)
        mask_new = torch.cat([mask[:, :p], mask.gather(1, dom_idx), mask_ctx], dim=1)
        return TokenState(x_new, size_new, mask_new)

    # ------------------------------------------------------------------ ONNX builder

    def build_onnx(self, op: tape.Tape, x: ir.Value, metric: ir.Value, size: ir.Value,
                   mask: ir.Value | None, n_in: int, protected: int,
                   name_prefix: str = "prune_merge", signals: dict | None = None) -> TokenState:
        n, p = n_in, protected
        if not self.active(n, p):
            return TokenState(x, size, mask)
        cls_attention = self._signal(signals)
        k, m = self.dominant, self.contextual
        u = n - p
        rem = u - k
        n_out = p + k + m
        float_type = _ir_dtype(x)
        g = _Emitter(op, name_prefix, np.dtype(float_type.numpy()))
        f32 = ir.DataType.FLOAT

        def rows(label: str, value: ir.Value, index: ir.Value) -> ir.Value:
            """value[b, index[b, i], :] for every batch row b: GatherND with batch_dims=1."""
            column = g.op(f"{label}_index", "Unsqueeze", index, g.i64(f"{label}_axis", [2]))
            return g.op(label, "GatherND", value, column, batch_dims=1)

        def sorted_by(label: str, index: ir.Value, key: ir.Value, count: int) -> ir.Value:
            """index reordered by ascending key (distinct float keys): TopK on the negated key."""
            _, order = g.op_multi(f"{label}_order", "TopK", 2, g.op(f"{label}_neg_key", "Neg", key),
                                  g.i64(f"{label}_k", [count]), axis=-1, largest=1, sorted=1)
            return g.op(label, "GatherElements", index, order, axis=1)

        def tokens(label: str, start: int, end: int, value: ir.Value) -> ir.Value:
            return g.op(label, "Slice", value, g.i64(f"{label}_start", [start]), g.i64(f"{label}_end", [end]),
                        g.i64(f"{label}_axis", [1]))

        # Steps 2-3: rank the unprotected tokens by CLS attention; the first K are dominant.
        score = cls_attention
        pad = None
        if mask is not None:
            pad = g.op("pad", "Sub", g.const("one", 1.0), mask)
            score = g.op("score_padded", "Sub", score, g.op("pad_bonus", "Mul", pad, g.const("bonus", PAD_BONUS)))
        if p:
            score = g.op("score_locked", "Where", g.const("locked", np.arange(n) < p, np.bool_),
                         g.const("protected_score", PROTECTED_SCORE), score)
        _, ranked = g.op_multi("ranked", "TopK", 2, score, g.i64("k_ranked", [u]), axis=-1, largest=1, sorted=1)
        dom_raw = tokens("dominant_ranked", 0, k, ranked)
        rem_raw = tokens("remaining_ranked", k, u, ranked)
        dom_idx = sorted_by("dominant_idx", dom_raw, g.op("dominant_key", "Cast", dom_raw, to=f32), k)
        # Step 4: remaining tokens real first, each group in original order.
        rem_key = g.op("remaining_key", "Cast", rem_raw, to=f32)
        if pad is not None:
            rem_pad = g.op("remaining_pad", "Cast", g.op("remaining_pad_raw", "GatherElements", pad, rem_raw, axis=1),
                           to=f32)
            rem_key = g.op("remaining_key_padded", "Add", rem_key,
                           g.op("remaining_pad_push", "Mul", rem_pad, g.const("push_by", float(n), np.float32)))
        rem_idx = sorted_by("remaining_idx", rem_raw, rem_key, rem)
        # Step 5: targets at static positions in the remaining list; the others join them.
        t_pos = target_positions(rem, m)
        nt_pos = np.setdiff1d(np.arange(rem), t_pos)
        tgt_idx = g.op("target_idx", "Gather", rem_idx, g.i64("target_pos", t_pos), axis=1)  # [B, M]
        ntg_idx = g.op("joiner_idx", "Gather", rem_idx, g.i64("joiner_pos", nt_pos), axis=1)  # [B, R-M]

        # Step 6: each joiner's most similar target.
        norm = g.op("norm", "ReduceL2", metric, g.i64("axis_last", [-1]), keepdims=1)
        norm = g.op("norm_clamped", "Max", norm, g.const("eps", NORM_EPS))
        unit = g.op("unit", "Div", metric, norm)
        unit_t = g.op("unit_target_t", "Transpose", rows("unit_target", unit, tgt_idx), perm=[0, 2, 1])
        scores = g.op("scores", "MatMul", rows("unit_joiner", unit, ntg_idx), unit_t)  # [B, R-M, M]
        if pad is not None:
            pad_n = g.op("pad_joiner", "Unsqueeze", g.op("pad_joiner_flat", "GatherElements", pad, ntg_idx, axis=1),
                         g.i64("axis2", [2]))
            pad_t = g.op("pad_target", "Unsqueeze", g.op("pad_target_flat", "GatherElements", pad, tgt_idx, axis=1),
                         g.i64("axis1", [1]))
            # +PAD_BONUS for padding pairs, -PAD_BONUS for mixed pairs, 0 for real pairs (0/1 masks).
            both = g.op("pad_both", "Mul", pad_n, pad_t)
            either = g.op("pad_either", "Add", pad_n, pad_t)
            bias = g.op("pad_bias", "Sub", g.op("pad_both_w", "Mul", both, g.const("bonus3", 3 * PAD_BONUS)),
                        g.op("pad_either_w", "Mul", either, g.const("bonus_tier", PAD_BONUS)))
            scores = g.op("scores_padded", "Add", scores, bias)
        assign = g.op("assign", "ArgMax", scores, axis=-1, keepdims=0, select_last_index=0)  # [B, R-M]
        joins = g.op("joins", "Equal", g.op("assign_row", "Unsqueeze", assign, g.i64("axis1_a", [1])),
                     g.i64("target_index", np.arange(m)[:, None]))  # [B, M, R-M]
        joins = g.op("joins_f", "Cast", joins, to=float_type)

        # Step 7: size-weighted merge into the targets.
        x_t, s_t = rows("x_target", x, tgt_idx), rows("size_target", size, tgt_idx)
        x_n, s_n = rows("x_joiner", x, ntg_idx), rows("size_joiner", size, ntg_idx)
        size_ctx = g.op("size_ctx", "Add", s_t, g.op("size_in", "MatMul", joins, s_n))
        x_sum = g.op("x_ctx_sum", "Add", g.op("x_target_w", "Mul", x_t, s_t),
                     g.op("x_in", "MatMul", joins, g.op("x_joiner_w", "Mul", x_n, s_n)))
        x_ctx = g.op("x_ctx", "Div", x_sum, size_ctx)

        # Step 8: [protected, dominant, contextual].
        def layout(label: str, value: ir.Value, dominant_part: ir.Value, ctx_part: ir.Value) -> ir.Value:
            parts = [dominant_part, ctx_part]
            if p:
                parts.insert(0, tokens(f"{label}_protected", 0, p, value))
            return g.op(label, "Concat", *parts, axis=1)

        x_new = layout("x_out", x, rows("x_dominant", x, dom_idx), x_ctx)
        size_new = layout("size_out", size, rows("size_dominant", size, dom_idx), size_ctx)
        mask_new = None
        if mask is not None:
            m_t = g.op("mask_target", "GatherElements", mask, tgt_idx, axis=1)
            m_n = g.op("mask_joiner", "Unsqueeze", g.op("mask_joiner_flat", "GatherElements", mask, ntg_idx, axis=1),
                       g.i64("axis2_m", [2]))
            m_in = g.op("mask_in", "Squeeze", g.op("mask_in_col", "MatMul", joins, m_n), g.i64("axis2_q", [2]))
            mask_ctx = g.op("mask_ctx", "Cast", g.op("mask_ctx_real", "Greater", g.op("mask_ctx_sum", "Add", m_t, m_in),
                                                     g.const("zero", 0.0)), to=_ir_dtype(mask))
            mask_new = layout("mask_out", mask, g.op("mask_dominant", "GatherElements", mask, dom_idx, axis=1),
                              mask_ctx)
        return typed_state(x_new, size_new, mask_new, TokenState(x, size, mask), n_out)

