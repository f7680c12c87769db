"""Pool: transformation-based compression, size-weighted average pooling of the token grid (or sequence).

Spec (both implementations below follow it; tests compare them)
---------------------------------------------------------------
Inputs as in `tcexport.methods.base`: x [B,N,C], size [B,N,1], mask [B,N] or None, `protected` leading tokens.
No metric or signal is used (needs is empty). Parameters:

    kernel  int >= 1 (required): window size, k x k on a 2-D grid, k on a sequence.
    grid    "auto" (default), "2d" or "1d": how the M = N - protected unprotected tokens are laid out.
            auto = "2d" when M is a perfect square, else "1d".

 1. M = N - protected. If M <= 0 or kernel == 1 the inputs are returned unchanged (after the grid check).
 2. 2d: the unprotected tokens are a row-major G x G grid, G = sqrt(M); M must be a perfect square and k must
    divide G (else UsageError from check_fits naming the grid). Unprotected token j (0-based after the
    protected ones) sits at row j // G, column j % G and falls in window (row // k) * (G // k) + (col // k).
    W = (G // k)^2 windows, in row-major order of the pooled (G/k x G/k) grid (stride k, no overlap).
 3. 1d: token j falls in window j // k. W = ceil(M / k). When k does not divide M the last window holds the
    remaining M mod k tokens (a shorter window; size weighting makes that exact, nothing is padded in).
 4. Pooling is size-weighted over the tokens i of each window w:
    x'_w = sum(size_i * x_i) / sum(size_i), size'_w = sum(size_i), mask'_w = max(mask_i).
 5. Output: the protected tokens unchanged and first, then the W pooled tokens. tokens_out = protected + W,
    static. With a mask, a window that mixes real and padding tokens counts as real (max) and its x mixes
    both, as the formula says; pool text with care.

ONNX form: standard opset-18 ops, O(M * C), no data-dependent shapes, dynamic batch. The unprotected tokens are
sliced off, multiplied by their sizes, reshaped to the windows ([B, G/k, k, G/k, k, C] for 2d, [B, W, k, C]
for 1d after a zero Pad of the short tail) and summed with ReduceSum; x' = sum(size * x) / sum(size). The mask
uses ReduceMax over the same windows (the Pad value 0 never wins: masks are >= 0). Reshape copies the batch
dimension (shape entry 0), so no Shape ops are needed and no constant grows with the token count.
"""

from __future__ import annotations

import math

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
from tcexport.methods.emit import ir_dtype as _ir_dtype
from tcexport.methods.emit import typed_state

torch = lazy_import("torch")  # the references need it; the declarations do not

GRIDS = ("auto", "2d", "1d")


@register
class Pool(Method):
    """Average-pool the patch grid (k x k, stride k) or the sequence (k, stride k), weighted by token size."""

    name = "pool"
    needs = frozenset()

    family = "transformation"
    parameters = (Param("kernel", int, "pooling kernel (k x k on the patch grid, k on sequences)", default=REQUIRED,
                        low=1, example=2),
                  Param("grid", str, "token layout: 2d (a square patch grid), 1d (a sequence) or auto (2d when the "
                        "unprotected tokens form a square)", default="auto", choices=GRIDS))
    plugin = PluginSpec("TokenPool", description="average-pool the token grid (no plugin implementation yet)",
                        fields=("kernel", "protected", "grid_side"))

    def plugin_fields(self, n_in: int, n_out: int, protected: int) -> dict[str, int]:
        """kernel, protected, and grid_side = G of a 2-D G x G grid (0 for 1-D pooling), resolved from grid=auto."""
        mode, _, side = self.layout(n_in, protected)
        return {"kernel": self.kernel, "protected": protected, "grid_side": side if mode == "2d" else 0}

    @property
    def kernel(self) -> int:
        return self.params["kernel"]

    def layout(self, n_in: int, protected: int) -> tuple[str, int, int]:
        """(mode, M, side) for n_in tokens: mode "2d" (side = G) or "1d" (side = M), "none" when M <= 0.

        Raises UsageError when the tokens do not form the grid the parameters ask for."""
        m = n_in - protected
        if m <= 0:
            return "none", max(m, 0), 0
        k, grid = self.kernel, self.params["grid"]
        side = math.isqrt(m)
        square = side * side == m
        mode = grid if grid != "auto" else ("2d" if square else "1d")
        if mode == "1d":
            return "1d", m, m
        if not square:
            raise UsageError(f"pool grid=2d needs the {m} unprotected tokens ({n_in} tokens, {protected} protected) "
                             "to form a square grid; use grid=1d or set --protected")
        if side % k:
            divisors = [d for d in range(2, side + 1) if side % d == 0]
            hint = f"choose a kernel dividing {side} ({', '.join(map(str, divisors))})" if divisors else \
                "no kernel > 1 tiles it"
            raise UsageError(f"pool kernel {k} does not tile the {side}x{side} patch grid ({n_in} tokens, "
                             f"{protected} protected): {hint}, or pool 1-D with grid=1d")
        return "2d", m, side

    def windows(self, n_in: int, protected: int) -> int:
        mode, m, side = self.layout(n_in, protected)
        if mode == "none":
            return 0
        if mode == "2d":
            return (side // self.kernel) ** 2
        return -(-m // self.kernel)

    def tokens_out(self, n_in: int, protected: int) -> int:
        if n_in - protected <= 0:
            return n_in
        return protected + self.windows(n_in, protected)

    def check_fits(self, n_in: int, protected: int) -> None:
        self.layout(n_in, protected)

    def window_index(self, n_in: int, protected: int) -> np.ndarray:
        """Window of each unprotected token (spec steps 2-3), [M] int64; used by tests as a third opinion."""
        mode, m, side = self.layout(n_in, protected)
        j = np.arange(m)
        k = self.kernel
        if mode == "2d":
            return (j // side // k) * (side // k) + (j % side) // k
        return j // k

    # ------------------------------------------------------------------ PyTorch reference

    def reference(self, x: torch.Tensor, metric: torch.Tensor | None, size: torch.Tensor,
                  mask: torch.Tensor | None, protected: int, signals: dict | None = None) -> TokenState:
        n_in = x.shape[1]
        mode, m, side = self.layout(n_in, protected)
        k = self.kernel
        if mode == "none" or k == 1:
            return TokenState(x, size, mask)
        p = protected
        batch = x.shape[0]

        def window_sums(t: torch.Tensor, reduce: str) -> torch.Tensor:
            """t [B, M, D] -> [B, W, D], summed (or max-reduced) over each window."""
            d = t.shape[-1]
            if mode == "2d":
                g = side // k
                t = t.reshape(batch, g, k, g, k, d)
                out = t.sum(dim=(2, 4)) if reduce == "sum" else t.amax(dim=(2, 4))
                return out.reshape(batch, g * g, d)
            w = -(-m // k)
            t = torch.nn.functional.pad(t, (0, 0, 0, w * k - m))  # zeros: add nothing to sums, never win a max
            t = t.reshape(batch, w, k, d)
            return t.sum(dim=2) if reduce == "sum" else t.amax(dim=2)

        size_u = size[:, p:]
        size_sum = window_sums(size_u, "sum")
        x_new = window_sums(x[:, p:] * size_u, "sum") / size_sum
        x_new = torch.cat([x[:, :p], x_new], dim=1)
        size_new = torch.cat([size[:, :p], size_sum], dim=1)
        mask_new = None
        if mask is not None:
            mask_new = torch.cat([mask[:, :p], window_sums(mask[:, p:, None], "max")[..., 0]], dim=1)
        return TokenState(x_new, size_new, mask_new)

    # ------------------------------------------------------------------ ONNX builder

    def build_onnx(self, op: tape.Tape, x: ir.Value, metric: ir.Value | None, size: ir.Value,
                   mask: ir.Value | None, n_in: int, protected: int,
                   name_prefix: str = "pool", signals: dict | None = None) -> TokenState:
        mode, m, side = self.layout(n_in, protected)
        k = self.kernel
        if mode == "none" or k == 1:
            return TokenState(x, size, mask)
        g = _Emitter(op, name_prefix, np.dtype(_ir_dtype(x).numpy()))
        p = protected
        n_out = self.tokens_out(n_in, protected)
        w = n_out - p
        tail = w * k - m if mode == "1d" else 0

        def unprotected(label: str, value: ir.Value) -> ir.Value:
            if not p:
                return value
            return g.op(label, "Slice", value, g.i64(f"{label}_start", [p]), g.i64(f"{label}_end", [n_in]),
                        g.i64(f"{label}_axis", [1]))

        def pooled(label: str, value: ir.Value, reduce: str, rank: int) -> ir.Value:
            """value [B, M(, D)] -> [B, W(, D)], reduced over each window; `label` names the result."""
            if tail:  # 1d: zero-pad the short last window up to k tokens
                pads = [0] * (2 * rank)
                pads[rank + 1] = tail
                value = g.op(f"{label}_pad", "Pad", value, g.i64(f"{label}_pads", pads), mode="constant")
            channel = [-1] if rank == 3 else []
            if mode == "2d":
                grid_shape, axes = [0, side // k, k, side // k, k, *channel], [2, 4]
            else:
                grid_shape, axes = [0, w, k, *channel], [2]
            windows = g.op(f"{label}_windows", "Reshape", value, g.i64(f"{label}_windows_shape", grid_shape))
            reduced = g.op(f"{label}_reduced" if mode == "2d" else label, reduce, windows,
                           g.i64(f"{label}_axes", axes), keepdims=0)
            if mode == "1d":
                return reduced
            return g.op(label, "Reshape", reduced, g.i64(f"{label}_shape", [0, w, *channel]))

        def layout(label: str, source: ir.Value, pooled_part: ir.Value) -> ir.Value:
            """[protected tokens, pooled tokens] along the token axis."""
            head = g.op(f"{label}_protected", "Slice", source, g.i64(f"{label}_p0", [0]), g.i64(f"{label}_p1", [p]),
                        g.i64(f"{label}_paxis", [1]))
            return g.op(label, "Concat", head, pooled_part, axis=1)

        size_u = unprotected("size_tokens", size)
        weighted = g.op("x_weighted", "Mul", unprotected("x_tokens", x), size_u)
        size_sum = pooled("size_out" if not p else "size_pooled", size_u, "ReduceSum", 3)
        x_sum = pooled("x_sum", weighted, "ReduceSum", 3)
        x_pooled = g.op("x_out" if not p else "x_pooled", "Div", x_sum, size_sum)
        x_new = layout("x_out", x, x_pooled) if p else x_pooled
        size_new = layout("size_out", size, size_sum) if p else size_sum
        mask_new = None
        if mask is not None:
            mask_pooled = pooled("mask_out" if not p else "mask_pooled", unprotected("mask_tokens", mask),
                                 "ReduceMax", 2)
            mask_new = layout("mask_out", mask, mask_pooled) if p else mask_pooled
        return typed_state(x_new, size_new, mask_new, TokenState(x, size, mask), n_out)
