"""The keep budget shared by pruning methods (topk, query): `keep` (a rate) or `keep_count` (a number).

    kept = min(M, keep_count)                         with keep_count
    kept = min(M, max(1, ceil(keep * M - 1e-9)))      with keep (EViT's ceiling; 0.7 * 10 keeps 7, not 8)

where M = n_in - protected. The slack keeps a product within 1e-9 of a whole number at that number.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np

from tcexport.core.errors import UsageError

CEIL_SLACK = 1e-9


def is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def kept_count(n_in: int, protected: int, keep: float | None = None, keep_count: int | None = None) -> int:
    """Unprotected tokens kept in a block with n_in tokens."""
    m = n_in - protected
    if m <= 0:
        return 0
    if keep_count is not None:
        return min(int(keep_count), m)
    return min(m, max(1, math.ceil(float(keep) * m - CEIL_SLACK)))


def check_keep(method: str, params: dict[str, Any], example: float) -> dict[str, Any]:
    """{"keep": rate} or {"keep_count": n} from params; UsageError unless exactly one valid value is given."""
    keep, keep_count = params.get("keep"), params.get("keep_count")
    if keep is None and keep_count is None:
        raise UsageError(f"{method} needs --keep (share of tokens kept, e.g. {example}) or --keep-count (tokens kept)")
    if keep is not None and keep_count is not None:
        raise UsageError(f"{method} takes --keep or --keep-count, not both")
    if keep is not None:
        if is_bool(keep) or not isinstance(keep, Real) or not 0.0 < float(keep) <= 1.0:
            raise UsageError(f"{method} keep must be a rate in (0, 1], e.g. {example}; got {keep!r}")
        return {"keep": float(keep)}
    if is_bool(keep_count) or not isinstance(keep_count, Integral) or keep_count < 1:
        raise UsageError(f"{method} keep_count must be a whole number of tokens >= 1; got {keep_count!r}")
    return {"keep_count": int(keep_count)}


def check_keep_fits(method: str, params: dict[str, Any], n_in: int, protected: int) -> None:
    """UsageError when a block with n_in tokens has nothing to prune or fewer tokens than keep_count."""
    m = n_in - protected
    if m < 1:
        raise UsageError(f"{method}: a block with {n_in} tokens ({protected} protected) has no token to prune")
    k = params.get("keep_count")
    if k is not None and k > m:
        raise UsageError(f"{method} keep_count={k} is more than the {m} unprotected tokens of a block with {n_in} "
                         f"tokens ({protected} protected); lower --keep-count")
