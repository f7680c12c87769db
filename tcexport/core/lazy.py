"""Modules imported on first use (the standard library's importlib.util.LazyLoader).

The method registry is read when a command's options are built (`compress --help`, `--stage`, recipes), but its
PyTorch references run only when a model is compressed or validated: the methods take torch from here, so
reading their declarations costs no torch import, and bad input is still reported at once.
"""

from __future__ import annotations

import importlib.util
import sys
import types


def lazy_import(name: str) -> types.ModuleType:
    """`name` as a module whose import runs on first attribute access (at once if it is already imported)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named '{name}'", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
