"""`compress` options generated from the method registry: each declared parameter becomes one option.

A parameter several methods declare becomes one option whose help names each of them (`--keep`: topk, query,
random, uniform). Bool parameters get --name/--no-name, per-layer ones take a comma list. Every option
defaults to None (not given), so a method sees only what the user said. The options are built when the
command is parsed or its help shown, not when `tcexport` starts: the registry imports torch.
"""

from __future__ import annotations

import click


def _methods():
    from tcexport import methods

    return methods.METHODS


def declared() -> dict[str, list]:
    """Parameter name -> [(method name, Param), ...] over the registered methods, in registry order."""
    table: dict[str, list] = {}
    for name, cls in _methods().items():
        for param in cls.parameters:
            table.setdefault(param.name, []).append((name, param))
    return table


def _help(entries: list) -> str:
    by_help: dict[str, list[str]] = {}
    for method, param in entries:
        by_help.setdefault(param.describe(), []).append(method)
    return "; ".join(f"{'/'.join(names)}: {text}" for text, names in by_help.items())


def option_for(name: str, entries: list) -> click.Option:
    from tcexport.methods.params import PLAN_NAMES

    if name in PLAN_NAMES:  # refused at registration too; a stale table would clash here
        owners = ", ".join(method for method, _ in entries)
        raise TypeError(f"method parameter '{name}' ({owners}) has the name of a compress option; rename it")
    kinds = {param.kind for _, param in entries}
    if len(kinds) > 1:
        owners = ", ".join(f"{method} ({param.kind.__name__})" for method, param in entries)
        raise TypeError(f"method parameter '{name}' has different types in {owners}; give it one type or rename it")
    kind = kinds.pop()
    flag = entries[0][1].flag
    if kind is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=_help(entries))
    per_layer = any(param.per_layer for _, param in entries)
    value_type = str if per_layer or kind is str else kind
    return click.Option([flag, name], type=value_type, default=None, help=_help(entries))


class MethodOptionsCommand(click.Command):
    """A click command whose method options come from the registry at parse/help time."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        help_option = [p for p in params if p.name == "help"]
        rest = [p for p in params if p.name != "help"]
        generated = [option_for(name, entries) for name, entries in declared().items()]
        return rest + generated + help_option


def method_params(given: dict) -> dict:
    """The method parameters the user gave (not None), by name."""
    return {key: value for key, value in given.items() if value is not None}
