"""A stand-in for `tensorrt.plugin` (TensorRT's Python plugin API), enough to import tcexport/plugins/python.py
without TensorRT: decorators that keep what is registered, tensor descriptors with dimension expressions,
from_shape_expr, KernelLaunchParams, SymIntExprs and SymInt32."""

from __future__ import annotations

import types


class Expr:
    """A dimension expression: constant, or symbolic (the batch)."""

    def __init__(self, value=None, name=None):
        self.value, self.name = value, name

    is_constant = property(lambda self: self.value is not None)
    constant_value = property(lambda self: self.value)

    def __sub__(self, other):
        return Expr(self.value - other) if self.is_constant else Expr(name=f"({self.name}-{other})")

    def __repr__(self):
        return str(self.value) if self.is_constant else self.name


class Desc:
    def __init__(self, *dims, dtype="FLOAT"):
        self.shape_expr = [Expr(name="batch")] + [Expr(d) for d in dims]
        self.dtype = types.SimpleNamespace(name=dtype)


class Extras(list):
    def __init__(self, n):
        super().__init__([None] * n)


def make_modules() -> tuple[dict, dict]:
    """({'tensorrt': ..., 'tensorrt.plugin': ...} to put in sys.modules, the registry they fill)."""
    registry: dict = {}

    def decorator(kind):
        def make(plugin_id):
            def keep(fn):
                registry.setdefault(plugin_id, {})[kind] = fn
                return fn
            return keep
        return make

    plugin = types.ModuleType("tensorrt.plugin")
    plugin.register, plugin.impl, plugin.aot_impl = decorator("register"), decorator("impl"), decorator("aot_impl")
    plugin.TensorDesc = plugin.Tensor = Desc
    plugin.from_shape_expr = lambda shape, dtype: ([repr(d) for d in shape], dtype.name)
    plugin.KernelLaunchParams = types.SimpleNamespace
    plugin.SymIntExprs = Extras
    plugin.SymInt32 = lambda value: value
    tensorrt = types.ModuleType("tensorrt")
    tensorrt.plugin = plugin
    return {"tensorrt": tensorrt, "tensorrt.plugin": plugin}, registry
