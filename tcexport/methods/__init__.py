"""Registry of token-compression methods: name -> Method subclass. Adding a method touches one file."""

from __future__ import annotations

from tcexport.core.errors import UsageError
from tcexport.methods.base import Method, TokenState

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as METHODS[cls.name]."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute 'name'")
    if name in METHODS and METHODS[name] is not cls:
        raise TypeError(f"method name '{name}' is already taken by {METHODS[name].__qualname__}")
    METHODS[name] = cls
    return cls


def get(name: str) -> type[Method]:
    """The Method class registered as `name`."""
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method '{name}'; choose one of {', '.join(sorted(METHODS))}") from None


# Method modules register themselves on import; they import `register` from here, so this comes last.
from tcexport.methods import tome  # noqa: E402,F401
from tcexport.methods import prune_merge, adjacent  # noqa: E402,F401
from tcexport.methods import pool, baselines  # noqa: E402,F401
from tcexport.methods import topk  # noqa: E402,F401
from tcexport.methods import query  # noqa: E402,F401

__all__ = ["METHODS", "Method", "TokenState", "get", "register"]
