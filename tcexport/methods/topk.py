"""Top-k: attention-based token pruning, EViT style (Liang et al., ICLR 2022, "Not All Patches are What You Need").

Spec (both implementations below follow it; tests compare them)
---------------------------------------------------------------
Inputs as in `tcexport.methods.base`: x [B,N,C], size [B,N,1], mask [B,N] (0/1) or None, `protected` leading
tokens, and signals["cls_attention"] [B,N]: how much the CLS token (query 0) attends to each token in this
block, averaged over heads (masks and proportional attention already applied). The keys metric is not used.

Parameters: exactly one of
    keep        rate in (0, 1]: the share of the unprotected tokens to keep,
    keep_count  int >= 1: how many unprotected tokens to keep;
and fuse (bool, default False), keep_order (bool, default False).

 1. M = N - protected (the unprotected tokens). Kept count K, static:
      keep_count: K = min(keep_count, M)            (capped, as ToMe caps r, for later blocks holding fewer
                                                     tokens; check_fits rejects keep_count > M at the first
                                                     compressed block)
      keep:       K = min(M, max(1, ceil(keep * M - 1e-9)))
                  i.e. the ceiling of keep * M as EViT does (math.ceil(keep_rate * (N - 1))), except that a
                  product within 1e-9 of a whole number counts as that number, so keep=0.7 with M=10 keeps 7
                  (plain float ceil gives 8 because 0.7 * 10 = 7.000000000000001). At least one token.
    If K == M (nothing to drop) the block is a no-op: inputs come back unchanged and in their order, with no
    fused token, even with fuse=True.
 2. score = cls_attention[:, protected:], [B, M].
 3. The K unprotected tokens with the highest score are kept. Ties go to the lower token index (ONNX TopK,
    largest=1, sorted=1; torch: stable descending sort). Kept tokens are copied unchanged (x, size, mask).
 4. Order of the kept tokens: descending score (ties: lower index first), or with keep_order=True their
    original order.
 5. fuse=True (EViT's "inattentive token fusion"): the D = M - K dropped tokens become one extra token,
    appended last:
      S    = sum of the dropped scores
      w_i  = score_i / S             when S > 0
             1 / D                   when S == 0 (every dropped token has zero attention, e.g. all padding)
      x_f  = sum_i w_i x_i,   size_f = sum_i size_i,   mask_f = max_i mask_i.
    EViT itself uses the raw attention as weights (no division by S); normalising keeps the fused token on the
    scale of a token, which matters with several pruning blocks and with proportional attention. Scores are
    probabilities (>= 0), so S == 0 exactly when every dropped score is exactly 0.
 6. Output: [protected tokens (unchanged, original order), K kept tokens, (fused token)];
    tokens_out = protected + K (+ 1 with fuse), or N when K == M.

Padding (text models): a padding key gets exactly 0 attention (its logit carries finfo.min), so padding tokens
score lowest and are dropped first, and among equal scores (all the zeros) the lower index is kept: real tokens
with an underflowed 0 score still go before the padding behind them. No extra rule is needed. A fused token
whose dropped tokens are all padding is padding (mask 0) and holds their plain mean; one that mixes real and
padding tokens is real, takes its value from the real ones (padding has weight 0), and its size counts every
dropped token, padding included (size = original tokens represented, as in ToMe).

ONNX form: standard opset-18 ops, no Scatter*, static output shapes, dynamic batch. TopK (sorted=1, constant
K: K for plain pruning, M with fuse since the dropped tokens are the tail of the full ranking) ranks the
scores; GatherND (batch_dims=1) / GatherElements copy the kept rows; keep_order re-sorts the K kept indices
with a second TopK on their negated (float) values; the fused token is a [B,1,D] @ [B,D,C] MatMul of the
weights with the dropped rows. TensorRT needs every K < 3840, i.e. M < 3840 with fuse.

When K tokens are kept but the count does not change (fuse with exactly one dropped token: it is replaced by
itself, moved last) the outputs are labelled *_reordered instead of *_out: `validate` reads a stage's token
choices from values named <prefix>_size_out, and the reference records a stage only when the count changes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from tcexport.core.errors import UsageError
from tcexport.core.lazy import lazy_import
from tcexport.methods.registry import register
from tcexport.methods.base import Method, TokenState
from tcexport.methods.keep import KEEP_EXCLUSIVE, check_keep_fits, keep_parameters, kept_count
from tcexport.methods.params import Param
from tcexport.methods.plugin import PluginSpec
from tcexport.methods.emit import Emitter as _Emitter
from tcexport.methods.emit import ir_dtype as _ir_dtype
from tcexport.methods.emit import typed_state

torch = lazy_import("torch")  # the references need it; the declarations do not





@register
class TopK(Method):
    """Keep the tokens the CLS token attends to most; optionally fuse the rest into one token (EViT)."""

    name = "topk"
    needs = frozenset({"cls_attention"})

    family = "attention pruning"
    parameters = (*keep_parameters(0.7),
                  Param("fuse", bool, "add one token, the attention-weighted sum of the dropped ones (EViT)",
                        default=False),
                  Param("keep_order", bool, "keep surviving tokens in their original order", default=False))
    exclusive = KEEP_EXCLUSIVE
    plugin = PluginSpec("TokenPrune", description="keep the K tokens with the highest CLS attention (EViT)",
                        python_aot=True, fields=("k", "protected", "fuse", "keep_order"), cpp=True, ort=True)

    def plugin_fields(self, n_in: int, n_out: int, protected: int) -> dict[str, int]:
        """k = kept unprotected tokens (the per-block cap applied), protected, fuse and keep_order as 0/1."""
        return {"k": self.kept(n_in, protected), "protected": protected, "fuse": int(self.fuse),
                "keep_order": int(self.keep_order)}

    @property
    def fuse(self) -> bool:
        return self.params["fuse"]

    @property
    def keep_order(self) -> bool:
        return self.params["keep_order"]

    def kept(self, n_in: int, protected: int) -> int:
        return kept_count(n_in, protected, self.params.get("keep"), self.params.get("keep_count"))

    def tokens_out(self, n_in: int, protected: int) -> int:
        k = self.kept(n_in, protected)
        if k >= n_in - protected:
            return n_in
        return protected + k + int(self.fuse)

    def check_fits(self, n_in: int, protected: int) -> None:
        check_keep_fits("topk", self.params, n_in, protected)

    # ------------------------------------------------------------------ PyTorch reference

    @staticmethod
    def _signal(signals: dict | None) -> Any:
        score = (signals or {}).get("cls_attention")
        if score is None:
            raise UsageError("topk needs the CLS attention signal (signals['cls_attention'], [B, N])")
        return score

    def reference(self, x: torch.Tensor, metric: torch.Tensor | None, size: torch.Tensor,
                  mask: torch.Tensor | None, protected: int, signals: dict | None = None) -> TokenState:
        n_in, p = x.shape[1], protected
        m = n_in - p
        k = self.kept(n_in, p)
        if k >= m:
            return TokenState(x, size, mask)
        score = self._signal(signals)[:, p:]
        with torch.no_grad():
            ranked = torch.sort(score, dim=1, descending=True, stable=True).indices  # [B, M]
            keep_idx = ranked[:, :k]
            if self.keep_order:
                keep_idx = keep_idx.sort(dim=1).values
            keep_idx = keep_idx + p

        def rows(t, idx):
            return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

        x_parts = [x[:, :p], rows(x, keep_idx)]
        size_parts = [size[:, :p], rows(size, keep_idx)]
        mask_parts = None if mask is None else [mask[:, :p], mask.gather(1, keep_idx)]
        if self.fuse:
            drop = ranked[:, k:]
            drop_score = score.gather(1, drop)  # [B, D]
            total = drop_score.sum(dim=1, keepdim=True)
            positive = total > 0
            weights = torch.where(positive, drop_score / torch.where(positive, total, torch.ones_like(total)),
                                  torch.full_like(drop_score, 1.0 / (m - k)))
            drop = drop + p
            x_parts.append(weights[:, None, :].to(x.dtype) @ rows(x, drop))
            size_parts.append(rows(size, drop).sum(dim=1, keepdim=True))
            if mask_parts is not None:
                mask_parts.append(mask.gather(1, drop).amax(dim=1, keepdim=True))
        mask_new = None if mask_parts is None else torch.cat(mask_parts, dim=1)
        return TokenState(torch.cat(x_parts, dim=1), torch.cat(size_parts, dim=1), mask_new)

    # ------------------------------------------------------------------ ONNX builder

    def build_onnx(self, op: tape.Tape, x: ir.Value, metric: ir.Value | None, size: ir.Value,
                   mask: ir.Value | None, n_in: int, protected: int,
                   name_prefix: str = "topk", signals: dict | None = None) -> TokenState:
        n, p = n_in, protected
        m = n - p
        k = self.kept(n, p)
        if k >= m:
            return TokenState(x, size, mask)
        n_out = self.tokens_out(n, p)
        suffix = "out" if n_out != n else "reordered"
        g = _Emitter(op, name_prefix, np.dtype(_ir_dtype(x).numpy()))
        signal = self._signal(signals)
        score_dtype = np.dtype(_ir_dtype(signal).numpy())
        score = signal
        if p:
            score = g.op("score", "Slice", score, g.i64("score_start", [p]), g.i64("score_end", [n]),
                         g.i64("score_axis", [1]))
        # Ranking: the K best (plain) or the whole ranking (fuse: the dropped tokens are its tail).
        _, ranked = g.op_multi("rank", "TopK", 2, score, g.i64("k_rank", [m if self.fuse else k]),
                               axis=-1, largest=1, sorted=1)  # [B, K] or [B, M], ties -> lower index
        keep_idx = ranked
        if self.fuse:
            keep_idx = g.op("keep_idx", "Slice", ranked, g.i64("keep_start", [0]), g.i64("keep_end", [k]),
                            g.i64("keep_axis", [1]))
        if self.keep_order:
            # Ascending token index: the K largest of -index (distinct, exact in float32 below 2^24).
            neg = g.op("keep_idx_neg", "Neg", g.op("keep_idx_f", "Cast", keep_idx, to=ir.DataType.FLOAT))
            _, position = g.op_multi("order", "TopK", 2, neg, g.i64("k_order", [k]), axis=-1, largest=1, sorted=1)
            keep_idx = g.op("keep_idx_ordered", "GatherElements", keep_idx, position, axis=1)
        if p:
            keep_idx = g.op("keep_idx_tokens", "Add", keep_idx, g.i64("protected", [p]))

        def rows(label: str, value: ir.Value, index: ir.Value) -> ir.Value:
            """value[b, index[b, j], :] for every batch row b: GatherND with batch_dims=1."""
            column = g.op(f"{label}_index", "Unsqueeze", index, g.i64(f"{label}_axis", [2]))
            return g.op(label, "GatherND", value, column, batch_dims=1)

        x_parts = [rows("x_kept", x, keep_idx)]
        size_parts = [rows("size_kept", size, keep_idx)]
        mask_parts = None if mask is None else [g.op("mask_kept", "GatherElements", mask, keep_idx, axis=1)]
        if self.fuse:
            d = m - k
            drop_idx = g.op("drop_idx", "Slice", ranked, g.i64("drop_start", [k]), g.i64("drop_end", [m]),
                            g.i64("drop_axis", [1]))  # [B, D], positions among the unprotected tokens
            drop_score = g.op("drop_score", "GatherElements", score, drop_idx, axis=1)
            total = g.op("drop_total", "ReduceSum", drop_score, g.i64("axis1_sum", [1]), keepdims=1)  # [B, 1]
            zero = g.const("zero", 0.0, score_dtype)
            positive = g.op("drop_total_positive", "Greater", total, zero)
            safe = g.op("drop_total_safe", "Where", positive, total, g.const("one", 1.0, score_dtype))
            weights = g.op("fuse_weights", "Where", positive, g.op("drop_share", "Div", drop_score, safe),
                           g.const("uniform", 1.0 / d, score_dtype))  # [B, D]
            if _ir_dtype(signal) != _ir_dtype(x):
                weights = g.op("fuse_weights_cast", "Cast", weights, to=_ir_dtype(x))
            if p:
                drop_idx = g.op("drop_idx_tokens", "Add", drop_idx, g.i64("protected_d", [p]))
            weights_row = g.op("fuse_weights_row", "Unsqueeze", weights, g.i64("axis1_w", [1]))  # [B, 1, D]
            x_parts.append(g.op("x_fused", "MatMul", weights_row, rows("x_dropped", x, drop_idx)))
            size_parts.append(g.op("size_fused", "ReduceSum", rows("size_dropped", size, drop_idx),
                                   g.i64("axis1_size", [1]), keepdims=1))
            if mask_parts is not None:
                mask_parts.append(g.op("mask_fused", "ReduceMax",
                                       g.op("mask_dropped", "GatherElements", mask, drop_idx, axis=1),
                                       g.i64("axis1_mask", [1]), keepdims=1))

        def layout(label: str, value: ir.Value, parts: list[ir.Value]) -> ir.Value:
            """[protected tokens, kept tokens, (fused token)] along the token axis."""
            if p:
                parts = [g.op(f"{label}_protected", "Slice", value, g.i64(f"{label}_p0", [0]),
                              g.i64(f"{label}_p1", [p]), g.i64(f"{label}_paxis", [1])), *parts]
            return g.op(label, "Concat", *parts, axis=1)

        x_new = layout(f"x_{suffix}", x, x_parts)
        size_new = layout(f"size_{suffix}", size, size_parts)
        mask_new = None if mask is None else layout(f"mask_{suffix}", mask, mask_parts)
        return typed_state(x_new, size_new, mask_new, TokenState(x, size, mask), n_out)
