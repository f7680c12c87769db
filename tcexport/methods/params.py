"""A method's parameters, declared once: name, type, default, help, valid range.

Everything that takes method parameters reads these declarations: the method's own check (Method.check_params),
the `compress` options (tcexport/cli/compress.py), `--stage METHOD:k=v@LAYERS` text (compress/plan.py), recipe
checks and the README's method table (scripts/method_table.py). A method that declares its parameters needs no
edit anywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np

from tcexport.core.errors import UsageError

REQUIRED = "required"  # default of a parameter that must be given
KINDS = (int, float, bool, str)
# What a compression plan says besides the method's own parameters (compress options, recipe fields): a method
# parameter cannot take one of these names.
PLAN_NAMES = ("model", "output", "method", "stages", "layers", "schedule", "prop_attn", "impl", "protected")


@dataclass(frozen=True)
class Param:
    """One parameter of a method. `default` None: optional with no value (e.g. one of an exclusive pair)."""

    name: str
    kind: type
    help: str
    default: Any = None
    low: float | None = None  # inclusive, unless low_open
    high: float | None = None  # inclusive
    low_open: bool = False
    choices: tuple = ()
    # One value, or a comma list with one value per chosen layer (ToMe's --r 4,8,12).
    per_layer: bool = False
    example: Any = None
    hint: str = ""  # appended to a range error (e.g. where the user should go instead)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def expects(self) -> str:
        """What a valid value is, in words: 'a rate in (0, 1]', 'a whole number >= 1', 'one of auto, 1d, 2d'."""
        if self.kind is bool:
            return "true or false"
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind is str:
            return "a word"
        if self.kind is float and self.low is not None and self.high is not None:
            left = "(" if self.low_open else "["
            noun = "a rate" if (self.low, self.high) == (0, 1) else "a number"
            return f"{noun} in {left}{_num(self.low)}, {_num(self.high)}]"
        noun = "a whole number" if self.kind is int else "a number"
        bounds = [f"{'>' if self.low_open else '>='} {_num(self.low)}"] if self.low is not None else []
        bounds += [f"<= {_num(self.high)}"] if self.high is not None else []
        return " ".join([noun, *bounds])

    def check(self, method: str, value: Any) -> Any:
        """The value as its kind; UsageError naming the method, the parameter and what it takes."""
        wrong = UsageError(f"{method} {self.name} must be {self.expects()}"
                           f"{f', e.g. {self.example}' if self.example is not None else ''}; got {value!r}")
        if self.kind is bool:
            if not isinstance(value, (bool, np.bool_)):
                raise wrong
            return bool(value)
        if self.kind is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise wrong
            return value
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, Integral if self.kind is int else Real):
            raise wrong
        value = self.kind(value)
        # Written as "inside" so that NaN, which compares false with everything, is outside.
        above_low = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below_high = self.high is None or value <= self.high
        if not (above_low and below_high and value == value):
            raise UsageError(f"{method} {self.name} must be {self.expects()}; got {value!r}{self.hint}")
        return value

    def parse(self, text: str) -> Any:
        """A value written as text (--stage, a CLI string) in this parameter's kind; the check comes later."""
        text = str(text).strip()
        if self.kind is bool:
            lowered = text.lower()
            return {"true": True, "false": False, "1": True, "0": False}.get(lowered, text)
        if self.kind in (int, float):
            for kind in (int, float):
                try:
                    number = kind(text)
                except ValueError:
                    continue
                return float(number) if self.kind is float else number
        return text

    def describe(self) -> str:
        """One line for docs: '--keep-count: number of tokens kept (a whole number >= 1)'."""
        default = "" if self.default in (None, REQUIRED) else f", default {_show(self.default)}"
        return f"{self.help} ({self.expects()}{default})"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _show(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def check_declared(method: str, declared: tuple[Param, ...], exclusive: tuple[tuple[str, ...], ...],
                   params: dict[str, Any]) -> dict[str, Any]:
    """Validated parameters, declared order, defaults filled in; one UsageError line for the first problem."""
    names = [p.name for p in declared]
    unknown = sorted(set(params) - set(names))
    if unknown:
        takes = ", ".join(names) if names else "no parameters"
        raise UsageError(f"unknown {method} parameter(s) {', '.join(unknown)}; {method} takes {takes}")
    by_name = {p.name: p for p in declared}
    grouped = {name for group in exclusive for name in group}
    for group in exclusive:
        given = [name for name in group if params.get(name) is not None]
        options = [by_name[name] for name in group]
        if not given:
            wanted = " or ".join(f"{p.flag} ({p.help}{f', e.g. {p.example}' if p.example is not None else ''})"
                                 for p in options)
            raise UsageError(f"{method} needs {wanted}")
        if len(given) > 1:
            raise UsageError(f"{method} takes {' or '.join(p.flag for p in options)}, not both")
    checked: dict[str, Any] = {}
    for p in declared:
        value = params.get(p.name)
        if value is None:
            if p.required and p.name not in grouped:
                example = f", e.g. {p.flag} {p.example}" if p.example is not None else ""
                raise UsageError(f"{method} needs {p.flag} ({p.help}){example}")
            if p.default is None or p.required:
                continue
            value = p.default
        checked[p.name] = p.check(method, value)
    return checked


def check_declaration(owner: str, declared: tuple[Param, ...], exclusive: tuple[tuple[str, ...], ...]) -> None:
    """TypeError for a method whose declaration cannot work (a mistake in code, caught at registration)."""
    names = [p.name for p in declared]
    if len(set(names)) != len(names):
        raise TypeError(f"{owner} declares a parameter twice: {names}")
    for p in declared:
        if p.kind not in KINDS:
            raise TypeError(f"{owner} parameter {p.name}: kind must be one of int, float, bool, str")
        if not p.name.isidentifier():
            raise TypeError(f"{owner} parameter {p.name!r} must be a Python identifier")
        if p.name in PLAN_NAMES:
            raise TypeError(f"{owner} parameter '{p.name}' is a compress plan option; rename it")
        if p.per_layer and p.kind not in (int, float):
            raise TypeError(f"{owner} parameter {p.name}: per-layer values are numbers (kind int or float)")
    for group in exclusive:
        if not set(group) <= set(names):
            raise TypeError(f"{owner}: exclusive group {group} names undeclared parameters")
