"""Token-compression methods, one file each, registered by name (registry.py); importing this loads them all."""

from __future__ import annotations

from tcexport.methods.base import Method, TokenState
from tcexport.methods.registry import METHODS, encoder_methods, get, register

# Each built-in method module registers itself on import (with registry.register).
# The import order is the registry's order, which the README's method table follows.
from tcexport.methods import tome, topk, prune_merge, adjacent, pool, query, baselines, fastv, snapkv, streaming  # noqa: E402,F401,I001

__all__ = ["METHODS", "Method", "TokenState", "encoder_methods", "get", "register"]
