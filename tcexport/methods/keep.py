"""The keep budget shared by pruning methods (topk, query): `keep` (a rate) or `keep_count` (a number).

    kept = min(M, keep_count)                         with keep_count
    kept = min(M, max(1, ceil(keep * M - 1e-9)))      with keep (EViT's ceiling; 0.7 * 10 keeps 7, not 8)

where M = n_in - protected. The slack keeps a product within 1e-9 of a whole number at that number.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tcexport.core.errors import UsageError
from tcexport.methods.params import Param

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


def keep_parameters(example: float) -> tuple[Param, Param]:
    """keep (a rate) and keep_count (a number), exactly one of which a pruning method takes."""
    return (Param("keep", float, "share of the unprotected tokens kept", low=0, high=1, low_open=True,
                  example=example),
            Param("keep_count", int, "number of unprotected tokens kept", low=1, example=100))


KEEP_EXCLUSIVE = (("keep", "keep_count"),)


def check_keep_fits(method: str, params: dict[str, Any], n_in: int, protected: int) -> None:
    """UsageError when a block with n_in tokens has nothing to prune or fewer tokens than keep_count."""
    m = n_in - protected
    if m < 1:
        raise UsageError(f"{method}: a block with {n_in} tokens ({protected} protected) has no token to prune")
    k = params.get("keep_count")
    if k is not None and k > m:
        raise UsageError(f"{method} keep_count={k} is more than the {m} unprotected tokens of a block with {n_in} "
                         f"tokens ({protected} protected); lower --keep-count")
