"""Recipe field values: the checks one field's value goes through, and the annotated types the sections use.

Plain values (r, layers, batch sizes, input shapes, PyYAML's 1e-4 strings) are checked without the method
registry; a compression method's name and parameters are checked against tcexport.methods, imported when first
needed. A check raises ValueError with the problem alone; tcexport.recipes.loading puts the field's path before it.
"""

from __future__ import annotations

import difflib
import json
import re
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from tcexport.core.errors import UsageError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a recipe name (it names files)
_LAYERS_TEXT = re.compile(r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$")
_SHAPE = re.compile(r"^\d+(x\d+)*$")
_FLOAT_TEXT = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+\s*$")


# ---------------------------------------------------------------------------------------------- value checks


def yaml_float(value: Any) -> Any:
    """PyYAML reads 1e-4 (no dot) as a string; accept it as the number it is meant to be."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_r(value: Any) -> int | list[int]:
    """One r for every chosen layer, or a list with one per chosen layer (None: not given)."""
    if value is None:
        return None
    if isinstance(value, list):
        if not value:
            raise ValueError("must be an integer or a non-empty list of integers (one per chosen layer)")
        for position, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int):
                raise ValueError(f"must be an integer or a list of integers; item {position} is {show(item)}")
            if item < 0:
                raise ValueError(f"must be >= 0 (got {item} at position {position})")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer or a list of integers (one per chosen layer); got {show(value)}")
    if value < 0:
        raise ValueError(f"must be >= 0 (got {value})")
    return value


def _check_layers(value: Any) -> str | int | list[int]:
    """'all', a block index, a list of indices, or text like '0-5' / '3,6,9' / '0-2,7'."""
    hint = "must be 'all', a block index, a list of indices or a range like '0-5' or '3,6,9'"
    if isinstance(value, str):
        if value.strip().lower() == "all":
            return "all"
        if not _LAYERS_TEXT.match(value):
            raise ValueError(f"{hint}; got {show(value)}")
        layers_list(value)  # low <= high
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{hint}; got an empty list")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise ValueError(f"{hint}; the list holds {show(item)}")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a block twice: {show(value)}")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must be >= 0 (got {value})")
        return value
    raise ValueError(f"{hint}; got {show(value)}")


def layers_list(layers: str | int | list[int]) -> list[int] | None:
    """The chosen block indices, or None for 'all' (known only once the model's depth is)."""
    if isinstance(layers, int):
        return [layers]
    if isinstance(layers, list):
        return sorted(layers)
    if layers.strip().lower() == "all":
        return None
    chosen: set[int] = set()
    for part in layers.split(","):
        low, _, high = part.partition("-")
        low_i, high_i = int(low), int(high) if high.strip() else int(low)
        if low_i > high_i:
            raise ValueError(f"range {part.strip()} runs backwards; write it low-high")
        chosen.update(range(low_i, high_i + 1))
    return sorted(chosen)


def layers_text(layers: str | int | list[int]) -> str:
    """The form `tcexport compress --layers` takes."""
    if isinstance(layers, list):
        return ",".join(str(v) for v in layers)
    return str(layers).replace(" ", "")


def _check_batches(value: Any) -> list[int] | None:
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("must be a batch size or a non-empty list of batch sizes")
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ValueError(f"must be a positive batch size or a list of them; got {show(value)}")
    return list(dict.fromkeys(items))


def _check_export_batch(value: Any) -> str | int:
    if isinstance(value, str) and value.strip().lower() == "dynamic":
        return "dynamic"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"must be 'dynamic' or a positive integer; got {show(value)}")


def _check_input_shape(value: Any) -> str | None:
    """'3x224x224' or [3, 224, 224] -> '3x224x224' (channels, height, width; no batch)."""
    if value is None:
        return None
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = "x".join(str(v) for v in value)
    if not isinstance(value, str) or not _SHAPE.match(value.strip().lower()) or \
            any(int(d) <= 0 for d in value.strip().lower().split("x")):
        raise ValueError(f"must look like 3x224x224 or [3, 224, 224] (no batch); got {show(value)}")
    return value.strip().lower()


def skip_or_section(value: Any) -> Any:
    """`false` skips an optional stage, `true` runs it with defaults; a bare key (null) is ambiguous."""
    if value is False:
        return None
    if value is True:
        return {}
    if value is None:
        raise ValueError("is empty; give a mapping of options, true for the defaults, or false to skip the stage")
    return value


def show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


Tolerance = Annotated[float, BeforeValidator(yaml_float), Field(ge=0, allow_inf_nan=False)]
Seconds = Annotated[float, BeforeValidator(yaml_float), Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Batches = Annotated[list[int] | None, BeforeValidator(_check_batches)]
InputShape = Annotated[str | None, BeforeValidator(_check_input_shape)]
ExportBatch = Annotated[str | int, BeforeValidator(_check_export_batch)]
RValue = Annotated[int | list[int] | None, BeforeValidator(_check_r)]


# ---------------------------------------------------------------------------------------------- methods


def known_method(name: str) -> str:
    """A registered compression method (tcexport.methods.METHODS), with a hint for a near miss."""
    from tcexport import methods

    if name not in methods.METHODS:
        known = sorted(methods.METHODS)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; choose one of {', '.join(known)}")
    return name


def _check_params(value: Any) -> Any:
    """Method parameters as a mapping; keys written keep-count or keep_count; PyYAML's 1e-4 strings as numbers."""
    if not isinstance(value, dict):
        return value  # the schema says "must be a mapping"
    checked = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ValueError(f"parameter names must be words; got {show(key)}")
        if isinstance(item, str) and _FLOAT_TEXT.match(item):
            item = yaml_float(item)
        checked[key.strip().replace("-", "_")] = item
    return checked


def recipe_terms(text: str) -> str:
    """A method's message says --keep-count (the CLI flag); a recipe says keep_count."""
    return re.sub(r"(?<![\w-])--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), text)


def accepts(method: str, params: dict) -> bool:
    from tcexport import methods

    try:
        methods.get(method).check_params(dict(params))
    except UsageError:
        return False
    return True


def method_problem(method: str, params: dict) -> str | None:
    """The method's own complaint about these parameters (its check_params), in recipe terms; None when fine."""
    from tcexport import methods

    try:
        methods.get(method).check_params(dict(params))
    except UsageError as exc:
        return recipe_terms(str(exc))
    return None


Params = Annotated[dict[str, Any], BeforeValidator(_check_params)]
Layers = Annotated[str | int | list[int], BeforeValidator(_check_layers)]


def stage_from_text(value: Any) -> Any:
    """'tome:r=8@0-5' (what `tcexport compress --stage` takes) -> {method: tome, params: {r: 8}, layers: '0-5'}."""
    if not isinstance(value, str):
        return value
    from tcexport.compress import plan as compress_plan

    try:
        method, params, layers = compress_plan.parse_stage(value.strip())
    except UsageError as exc:
        raise ValueError(recipe_terms(str(exc)).replace("stage '", "stage text '", 1)) from None
    return {"method": method, "params": params, "layers": layers}


def stage_value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)
