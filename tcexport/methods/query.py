"""Query-guided pruning: keep the tokens most similar to an external query vector.

This is the post-hoc form of query-based token compression (as in text-guided pruning of visual tokens for
retrieval or vision-language models): the compressed model takes one extra graph input

    query  [batch, C]  float32   C = the hidden width at the compressed block(s)

(graph/insert.py creates it once, named exactly "query", dynamic batch "batch"; every query stage reads the
same input) and at each chosen block keeps the tokens whose hidden state points the most like it.

Spec (both implementations below follow it; tests compare them)
---------------------------------------------------------------
Inputs as in `tcexport.methods.base`: x [B,N,C], size [B,N,1], mask [B,N] (0/1) or None, `protected` leading
tokens, and signals["query"] [B,C] (cast to the dtype of x). The keys metric is not used.

Parameters: exactly one of
    keep        rate in (0, 1]: the share of the unprotected tokens to keep,
    keep_count  int >= 1: how many unprotected tokens to keep.

 1. M = N - protected. Kept count K, static (the same rule as topk):
      keep_count: K = min(keep_count, M)    (capped in later, smaller blocks; check_fits rejects keep_count > M
                                             at the first compressed block)
      keep:       K = min(M, max(1, ceil(keep * M - 1e-9)))   (a product within 1e-9 of a whole number counts
                                                              as that number; at least one token)
    If K == M the block is a no-op: the inputs come back unchanged.
 2. score_i = cosine(x_i, query) for the unprotected tokens i: x and the query are each scaled to unit L2 norm
    along C (norm clamped below at NORM_EPS, so an all-zero row or query scores 0 instead of NaN), then
    score = sum_c(unit_x * unit_q), [B, M]. An elementwise product and a sum, not a matrix product: GEMM
    kernels (ONNX Runtime's and torch's) round a row's dot product differently depending on its position in
    the matrix, so two equal tokens could score differently and the tie rule below would not hold.
 3. Tier rule for padding: with a mask, score_i -= PAD_PENALTY * (1 - mask_i). Cosines lie in [-1, 1] and
    PAD_PENALTY = 4, so every real token ranks above every padding token (padding is never kept before a real
    token) while the cosine still orders tokens within each tier.
 4. The K unprotected tokens with the highest score are kept; ties go to the lower token index (ONNX TopK,
    largest=1, sorted=1; torch: stable descending sort). They are copied unchanged (x, size, mask: sizes are
    not touched, nothing is merged) and laid out in their original order, after the protected tokens, which
    are always kept and stay first.
    Outputs: x' [B, protected + K, C], size' [B, protected + K, 1], mask' [B, protected + K] (or None).

ONNX form: standard opset-18 ops, no Scatter*, static output shapes, dynamic batch: ReduceL2 norms, Mul and
ReduceSum for the cosines, TopK (sorted=1, constant K) for the ranking, a second TopK on the negated indices to restore
the original order, GatherND (batch_dims=1) / GatherElements to copy the kept rows. Outputs are labelled
x_out, size_out, mask_out (validate reads a stage's token choices from <prefix>_size_out).
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
from tcexport.methods.emit import Emitter as _Emitter
from tcexport.methods.emit import ir_dtype as _ir_dtype
from tcexport.methods.emit import typed_state

torch = lazy_import("torch")  # the references need it; the declarations do not

QUERY = "query"  # the signal and the graph input it comes from
NORM_EPS = 1e-6
PAD_PENALTY = 4.0




@register
class QueryPrune(Method):
    """Keep the tokens whose hidden state has the highest cosine similarity to an external query [B, C]."""

    name = "query"
    needs = frozenset({QUERY})
    decides_from_x = True  # cosine of each token's hidden state with the query

    family = "query-based"
    parameters = keep_parameters(0.5)
    exclusive = KEEP_EXCLUSIVE

    def kept(self, n_in: int, protected: int) -> int:
        return kept_count(n_in, protected, self.params.get("keep"), self.params.get("keep_count"))

    def tokens_out(self, n_in: int, protected: int) -> int:
        k = self.kept(n_in, protected)
        return n_in if k >= n_in - protected else protected + k

    def check_fits(self, n_in: int, protected: int) -> None:
        check_keep_fits("query", self.params, n_in, protected)

    # ------------------------------------------------------------------ PyTorch reference

    @staticmethod
    def _signal(signals: dict | None) -> Any:
        query = (signals or {}).get(QUERY)
        if query is None:
            raise UsageError("query needs the query vector (signals['query'], [B, C]: the model's 'query' input)")
        return query

    def reference(self, x: torch.Tensor, metric: torch.Tensor | None, size: torch.Tensor,
                  mask: torch.Tensor | None, protected: int, signals: dict | None = None) -> TokenState:
        n_in, p = x.shape[1], protected
        k = self.kept(n_in, p)
        if k >= n_in - p:
            return TokenState(x, size, mask)
        query = self._signal(signals)
        if query.dim() != 2 or query.shape[0] != x.shape[0] or query.shape[1] != x.shape[2]:
            raise UsageError(f"query must be [batch, channels] = [{x.shape[0]}, {x.shape[2]}] for this block, "
                             f"got {list(query.shape)}")
        with torch.no_grad():
            query = query.to(x.dtype)
            tokens = x[:, p:]
            unit_x = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
            unit_q = query / query.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)
            score = (unit_x * unit_q[:, None, :]).sum(dim=-1)  # [B, M]
            if mask is not None:
                score = score - (1.0 - mask[:, p:].to(score.dtype)) * PAD_PENALTY
            ranked = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
            keep_idx = ranked.sort(dim=1).values + p

        def rows(t, idx):
            return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))

        x_new = torch.cat([x[:, :p], rows(x, keep_idx)], dim=1)
        size_new = torch.cat([size[:, :p], rows(size, keep_idx)], dim=1)
        mask_new = None if mask is None else torch.cat([mask[:, :p], mask.gather(1, keep_idx)], dim=1)
        return TokenState(x_new, size_new, mask_new)

    # ------------------------------------------------------------------ ONNX builder

    def build_onnx(self, op: tape.Tape, x: ir.Value, metric: ir.Value | None, size: ir.Value,
                   mask: ir.Value | None, n_in: int, protected: int,
                   name_prefix: str = "query", signals: dict | None = None) -> TokenState:
        n, p = n_in, protected
        k = self.kept(n, p)
        if k >= n - p:
            return TokenState(x, size, mask)
        n_out = p + k
        x_dtype = _ir_dtype(x)
        g = _Emitter(op, name_prefix, np.dtype(x_dtype.numpy()))
        query = self._signal(signals)
        if _ir_dtype(query) != x_dtype:
            query = g.op("query_cast", "Cast", query, to=x_dtype)

        def unprotected(label: str, value: ir.Value) -> ir.Value:
            if not p:
                return value
            return g.op(label, "Slice", value, g.i64(f"{label}_start", [p]), g.i64(f"{label}_end", [n]),
                        g.i64(f"{label}_axis", [1]))

        # Steps 2-3: cosine of every unprotected token with the query, padding a tier below.
        eps = g.const("eps", NORM_EPS)
        tokens = unprotected("tokens", x)  # [B, M, C]
        x_norm = g.op("x_norm", "Max", g.op("x_norm_raw", "ReduceL2", tokens, g.i64("axis_x", [-1]), keepdims=1),
                      eps)
        unit_x = g.op("unit_x", "Div", tokens, x_norm)
        q_norm = g.op("q_norm", "Max", g.op("q_norm_raw", "ReduceL2", query, g.i64("axis_q", [-1]), keepdims=1),
                      eps)
        unit_q = g.op("unit_q", "Unsqueeze", g.op("unit_q_row", "Div", query, q_norm), g.i64("axis_q2", [1]))
        score = g.op("score", "ReduceSum", g.op("products", "Mul", unit_x, unit_q), g.i64("axis_s", [-1]),
                     keepdims=0)  # [B, M]
        if mask is not None:
            pad = g.op("pad", "Sub", g.const("one", 1.0), unprotected("mask_tokens", mask))
            if _ir_dtype(mask) != x_dtype:
                pad = g.op("pad_cast", "Cast", pad, to=x_dtype)
            score = g.op("score_tiered", "Sub", score, g.op("pad_penalty", "Mul", pad, g.const("penalty",
                                                                                            PAD_PENALTY)))
        # Step 4: the K best (ties -> lower index), then back in original order: the K largest of -index
        # (distinct, exact in float32 below 2^24).
        _, ranked = g.op_multi("rank", "TopK", 2, score, g.i64("k", [k]), axis=-1, largest=1, sorted=1)
        neg = g.op("rank_neg", "Neg", g.op("rank_f", "Cast", ranked, to=ir.DataType.FLOAT))
        _, position = g.op_multi("order", "TopK", 2, neg, g.i64("k_order", [k]), axis=-1, largest=1, sorted=1)
        keep_idx = g.op("keep_idx", "GatherElements", ranked, position, axis=1)
        if p:
            keep_idx = g.op("keep_idx_tokens", "Add", keep_idx, g.i64("protected", [p]))
        column = g.op("keep_idx_col", "Unsqueeze", keep_idx, g.i64("axis_k", [2]))  # [B, K, 1]

        def layout(label: str, value: ir.Value, gather) -> ir.Value:
            """[protected tokens, kept tokens] along the token axis; gather(label) copies the kept rows."""
            if not p:
                return gather(label)
            head = g.op(f"{label}_protected", "Slice", value, g.i64(f"{label}_p0", [0]), g.i64(f"{label}_p1", [p]),
                        g.i64(f"{label}_paxis", [1]))
            return g.op(label, "Concat", head, gather(f"{label}_kept"), axis=1)

        x_new = layout("x_out", x, lambda label: g.op(label, "GatherND", x, column, batch_dims=1))
        size_new = layout("size_out", size, lambda label: g.op(label, "GatherND", size, column, batch_dims=1))
        mask_new = None
        if mask is not None:
            mask_new = layout("mask_out", mask,
                              lambda label: g.op(label, "GatherElements", mask, keep_idx, axis=1))
        return typed_state(x_new, size_new, mask_new, TokenState(x, size, mask), n_out)
