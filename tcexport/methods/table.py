"""The README's method table, written from the registry (scripts/method_table.py puts it in README.md)."""

from __future__ import annotations

from tcexport.methods.registry import METHODS

START, END = "<!-- methods table: scripts/method_table.py -->", "<!-- end of methods table -->"


def _options(cls) -> str:
    flags = []
    for param in cls.parameters:
        flag = f"`{param.flag}/--no-{param.flag[2:]}`" if param.kind is bool else f"`{param.flag}`"
        flags.append(flag)
    return ", ".join(flags) or "none"


def markdown() -> str:
    """One row per registered method: name, family, what it does (its docstring's first line), its options."""
    rows = ["| `--method` | family | what it does | options |", "|---|---|---|---|"]
    for name, cls in METHODS.items():
        rows.append(f"| `{name}` | {cls.family} | {cls.summary()} | {_options(cls)} |")
    return "\n".join(rows)


def replace_in(text: str) -> str:
    """`text` with the block between the START and END markers replaced by the current table."""
    if START not in text or END not in text:
        raise ValueError(f"the markers {START!r} and {END!r} are missing")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{markdown()}\n{END}{tail}"
