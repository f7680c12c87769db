"""Token-compression methods, one file each, registered by name (registry.py); importing this loads them all."""

from __future__ import annotations

from tcexport.methods.base import Method, TokenState
from tcexport.methods.registry import METHODS, get, register

# Each built-in method module registers itself on import (with registry.register).
from tcexport.methods import adjacent, baselines, pool, prune_merge, query, tome, topk  # noqa: E402,F401

__all__ = ["METHODS", "Method", "TokenState", "get", "register"]
