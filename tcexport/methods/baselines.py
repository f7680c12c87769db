"""Baselines: keep a fixed subset of the tokens, the same for every input (random or spatially uniform).

Spec (both implementations below follow it; tests compare them)
---------------------------------------------------------------
Inputs as in `tcexport.methods.base`; no metric or signal is used (needs is empty). M = N - protected.

Parameters, exactly one of:
    keep        fraction of the unprotected tokens to keep, 0 < keep <= 1;
                n_keep = ceil(keep * M) (EViT's rounding; computed as ceil(keep * M - 1e-9) so 0.7 * 10
                keeps 7), at least 1 when M >= 1.
    keep_count  number of unprotected tokens to keep, an int >= 1; a block with fewer unprotected tokens
                keeps them all (check_fits rejects a count above M at the first compressed block).
random also takes seed (int >= 0, default 0).

 1. If M <= 0 or n_keep >= M the inputs are returned unchanged.
 2. Kept unprotected tokens (0-based after the protected ones), in increasing (original) order:
      random:  sorted(numpy.random.default_rng(seed).permutation(M)[:n_keep]); the subset depends on seed and
               M only, so every input, and every block with the same M, keeps the same tokens.
      uniform: i-th kept token = floor((i + 0.5) * M / n_keep) = ((2i + 1) * M) // (2 * n_keep),
               i = 0..n_keep-1: the centre of each of n_keep equal segments of the (row-major) token order;
               exact integer arithmetic, always distinct. No 2-D striding: on a G x G patch grid it spreads
               the tokens evenly along the row-major order (every row keeps about keep * G tokens).
 3. Output: the protected tokens first and unchanged, then the kept tokens; x, size and mask are copied
    (sizes are not changed: dropped tokens are gone). tokens_out = protected + n_keep, static.

ONNX form: one Gather on the token axis (axis=1) per tensor with constant indices [0..protected-1, kept...].
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from tcexport.core.errors import UsageError
from tcexport.core.lazy import lazy_import
from tcexport.methods.keep import KEEP_EXCLUSIVE, keep_parameters
from tcexport.methods.params import Param
from tcexport.methods.registry import register
from tcexport.methods.base import Method, TokenState
from tcexport.methods.emit import Emitter as _Emitter
from tcexport.methods.emit import ir_dtype as _ir_dtype
from tcexport.methods.emit import typed_state

torch = lazy_import("torch")  # the references need it; the declarations do not

RATE_EPS = 1e-9


class _FixedSubset(Method):
    """Keep a static subset of the unprotected tokens, chosen by `kept` (subclasses)."""

    needs = frozenset()
    family = "baselines"
    parameters = keep_parameters(0.6)
    exclusive = KEEP_EXCLUSIVE

    def n_keep(self, n_in: int, protected: int) -> int:
        """Unprotected tokens kept for n_in tokens in (spec: parameters)."""
        m = max(n_in - protected, 0)
        if m == 0:
            return 0
        if "keep" in self.params:
            return min(m, max(1, math.ceil(self.params["keep"] * m - RATE_EPS)))
        return min(m, self.params["keep_count"])

    def tokens_out(self, n_in: int, protected: int) -> int:
        if n_in - protected <= 0:
            return n_in
        return protected + self.n_keep(n_in, protected)

    def check_fits(self, n_in: int, protected: int) -> None:
        m = max(n_in - protected, 0)
        count = self.params.get("keep_count")
        if count is not None and count > m:
            raise UsageError(f"{self.name} keep_count={count} is more than a block with {n_in} tokens ({protected} "
                             f"protected) has: at most N - protected = {m}; lower --keep-count")

    def kept(self, m: int, n_keep: int) -> np.ndarray:
        """Indices (0-based among the M unprotected tokens, increasing) of the n_keep kept tokens."""
        raise NotImplementedError

    def indices(self, n_in: int, protected: int) -> np.ndarray | None:
        """Token indices to gather ([protected..., kept...], int64), or None when every token stays."""
        m = n_in - protected
        n_keep = self.n_keep(n_in, protected)
        if m <= 0 or n_keep >= m:
            return None
        kept = np.asarray(self.kept(m, n_keep), dtype=np.int64)
        return np.concatenate([np.arange(protected, dtype=np.int64), protected + kept])

    # ------------------------------------------------------------------ PyTorch reference

    def reference(self, x: torch.Tensor, metric: torch.Tensor | None, size: torch.Tensor,
                  mask: torch.Tensor | None, protected: int, signals: dict | None = None) -> TokenState:
        index = self.indices(x.shape[1], protected)
        if index is None:
            return TokenState(x, size, mask)
        index = torch.from_numpy(index).to(x.device)
        return TokenState(x[:, index], size[:, index], None if mask is None else mask[:, index])

    # ------------------------------------------------------------------ ONNX builder

    def build_onnx(self, op: tape.Tape, x: ir.Value, metric: ir.Value | None, size: ir.Value,
                   mask: ir.Value | None, n_in: int, protected: int,
                   name_prefix: str = "subset", signals: dict | None = None) -> TokenState:
        index = self.indices(n_in, protected)
        if index is None:
            return TokenState(x, size, mask)
        g = _Emitter(op, name_prefix, np.dtype(_ir_dtype(x).numpy()))
        kept = g.i64("kept", index)
        n_out = len(index)
        x_new = g.op("x_out", "Gather", x, kept, axis=1)
        size_new = g.op("size_out", "Gather", size, kept, axis=1)
        mask_new = None if mask is None else g.op("mask_out", "Gather", mask, kept, axis=1)
        return typed_state(x_new, size_new, mask_new, TokenState(x, size, mask), n_out)


@register
class RandomSubset(_FixedSubset):
    """Keep a seeded random subset of the unprotected tokens, fixed at build time (same for every input)."""

    name = "random"
    parameters = (*keep_parameters(0.6), Param("seed", int, "seed of the fixed subset", default=0, low=0))

    def kept(self, m: int, n_keep: int) -> np.ndarray:
        return np.sort(np.random.default_rng(self.params["seed"]).permutation(m)[:n_keep])


@register
class UniformSubset(_FixedSubset):
    """Keep evenly spaced unprotected tokens: the centre of each of n_keep equal segments."""

    name = "uniform"

    def kept(self, m: int, n_keep: int) -> np.ndarray:
        i = np.arange(n_keep, dtype=np.int64)
        return ((2 * i + 1) * m) // (2 * n_keep)
