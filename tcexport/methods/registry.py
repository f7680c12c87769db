"""Registry of token-compression methods: name -> Method subclass (timm-style: adding a method touches one file).

Method modules register themselves with @register; `tcexport.methods` imports the built-in ones. Everything a
caller derives from the methods (CLI options, --stage parsing, recipe checks, the README's method table, the
plugin table) is read from here, so a method registered anywhere shows up everywhere.
"""

from __future__ import annotations

from tcexport.core.errors import UsageError
from tcexport.methods.base import Method
from tcexport.methods.plugin import PLUGIN_DOMAIN, PluginSpec, default_op_type

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make `cls` available as METHODS[cls.name]."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__qualname__} needs a class attribute 'name'")
    if name in METHODS and METHODS[name] is not cls:
        raise TypeError(f"method name '{name}' is already taken by {METHODS[name].__qualname__}")
    cls.check_declaration()
    # One parameter name has one type across methods: the compress CLI has one option for it.
    for param in cls.parameters:
        for other in METHODS.values():
            theirs = next((p for p in other.parameters if p.name == param.name), None)
            if other is not cls and theirs is not None and theirs.kind is not param.kind:
                raise TypeError(f"{cls.__qualname__} parameter {param.name} is {param.kind.__name__}, but method "
                                f"'{other.name}' declares it {theirs.kind.__name__}; use its type or another name")
    METHODS[name] = cls
    return cls


def encoder_methods() -> dict[str, type[Method]]:
    """The methods that compress an encoder's tokens (the decoder methods act on a causal LM's prompt or cache)."""
    return {name: cls for name, cls in METHODS.items() if getattr(cls, "applies_to", "encoder") != "decoder"}


def unregister(name: str) -> None:
    """Remove a method (tests that register a throwaway one clean up with this)."""
    METHODS.pop(name, None)


def get(name: str) -> type[Method]:
    """The Method class registered as `name`."""
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method '{name}'; choose one of {', '.join(sorted(METHODS))}") from None


def op_type(name: str) -> str:
    """The op type (and function name) of a method's --impl function/plugin node."""
    cls = METHODS.get(name)
    return cls.plugin.name if cls is not None and cls.plugin is not None else default_op_type(name)


def plugin_specs() -> dict[tuple[str, str], PluginSpec]:
    """tcexport's plugins by the (domain, op_type) their ONNX nodes carry: every registered method's spec."""
    return {(cls.plugin.namespace, cls.plugin.name): cls.plugin for cls in METHODS.values() if cls.plugin}


def plugin_spec(op: str) -> PluginSpec:
    """The registered plugin of that op type, or a plain spec (namespace tcexport, version 1)."""
    return plugin_specs().get((PLUGIN_DOMAIN, op), PluginSpec(op))
