"""Reading a recipe: the YAML file, its checks against the schema, and one line for the first problem.

`load(path)` reads and checks a recipe file; any problem (missing file, YAML syntax, schema) is a UsageError of
one line naming the file, the field path and the problem, e.g. "recipes/x.yaml: compress.r: must be >= 0 (got -1)".
`parse(data)` checks plain data (what a YAML file holds) the same way.

Relative paths in a recipe resolve against the recipe file's directory: model.checkpoint, an .onnx model.spec,
and hf:/st: directories written ./DIR or ../DIR (hf:NAME and st:NAME stay hub ids and bundled names).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from tcexport.core.errors import UsageError
from tcexport.recipes.fields import NAME, show, yaml_float
from tcexport.recipes.schema import SECTIONS, ModelSection, Recipe, Section

RECIPE_SUFFIXES = (".yaml", ".yml")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> Any:
    if not path.exists():
        raise UsageError(f"{path}: no such recipe file")
    if not path.is_file():
        raise UsageError(f"{path}: not a file; pass a recipe .yaml file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read it ({type(exc).__name__}: {exc})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = ": ".join(filter(None, [exc.context, exc.problem]))
        raise UsageError(f"{path}{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None


def _loc_text(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _problem(error: dict) -> str:
    kind, ctx, loc = error["type"], error.get("ctx") or {}, tuple(error["loc"])
    got = f"; got {show(error['input'])}" if "input" in error and kind not in ("missing", "extra_forbidden") else ""
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        section = SECTIONS.get(tuple(p for p in loc[:-1] if isinstance(p, str)))
        allowed = [f.alias or name for name, f in section.model_fields.items()] if section else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"unknown field ({hint}allowed: {', '.join(allowed)})"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", error["msg"]))
    limits = {"greater_than_equal": (">=", "ge"), "greater_than": (">", "gt"),
              "less_than_equal": ("<=", "le"), "less_than": ("<", "lt")}
    if kind in limits:
        op, key = limits[kind]
        return f"must be {op} {ctx.get(key)} (got {show(yaml_float(error.get('input')))})"
    if kind == "too_short":
        least = ctx.get("min_length", 1)
        return f"must list at least {least} item{'s' if least != 1 else ''}{got}"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}{got}"
    simple = {"int_type": "must be an integer", "int_from_float": "must be an integer",
              "float_type": "must be a number", "finite_number": "must be a finite number",
              "bool_type": "must be true or false", "string_type": "must be a string",
              "list_type": "must be a list", "dict_type": "must be a mapping (key: value)",
              "model_type": "must be a mapping (key: value)", "model_attributes_type": "must be a mapping (key: value)"}
    if kind in simple:
        return simple[kind] + got
    return error["msg"][:1].lower() + error["msg"][1:] + got


def _blamed(loc: tuple, error: dict) -> tuple[tuple, str]:
    """A section's own check may blame one of its fields by starting its message 'FIELD: ' (compress.params)."""
    problem = _problem(error)
    if error["type"] == "value_error":
        section = SECTIONS.get(tuple(p for p in loc if isinstance(p, str)))
        match = re.match(r"^([a-z_]+): (.+)$", problem, re.S)
        if section is not None and match and match.group(1) in section.model_fields:
            return loc + (match.group(1),), match.group(2)
    return loc, problem


def describe(error: ValidationError) -> str:
    """The first schema error as 'field.path: problem' (plus how many more there are)."""
    errors = error.errors(include_url=False)
    # A misspelt key is also a missing one: name the misspelling (it carries the "did you mean").
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc, problem = _blamed(tuple(first["loc"]), first)
    where = _loc_text(loc)
    text = f"{where}: {problem}" if where else problem
    if first["type"] == "model_type" and not where:
        text = "must be a mapping of sections (model, export, compress, validate, build, bench)"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text


class _ModelOnly(Section):
    """The model section alone, checked first (see parse)."""

    model: ModelSection


def parse(data: Any, origin: str = "recipe") -> Recipe:
    """Check a recipe given as plain data (what the YAML file holds); UsageError on any problem."""
    if data is None:
        raise UsageError(f"{origin}: the recipe is empty; it needs at least model.spec")
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        # The model section holds most mistakes and needs no torch; compress's checks import the method registry.
        try:
            _ModelOnly.model_validate({"model": data["model"]})
        except ValidationError as exc:
            raise UsageError(f"{origin}: {describe(exc)}") from None
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise UsageError(f"{origin}: {describe(exc)}") from None


def load(path: str | Path) -> Recipe:
    """Read and check a recipe file; resolve relative paths against its directory; fill in the name."""
    path = Path(path)
    if path.suffix.lower() not in RECIPE_SUFFIXES:
        raise UsageError(f"{path}: a recipe is a .yaml or .yml file")
    recipe = parse(read_yaml(path), str(path))
    recipe._path = path
    if recipe.name is None:
        stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem)
        recipe.name = stem if NAME.match(stem) else f"recipe_{stem}"
    base = path.resolve().parent
    if recipe.model.checkpoint:
        recipe.model.checkpoint = str(_resolve_file(recipe.model.checkpoint, base, path, "model.checkpoint"))
    spec = recipe.model.spec
    if spec.endswith(".onnx"):
        recipe.model.spec = str(_resolve_file(spec, base, path, "model.spec"))
    elif spec.startswith(("hf:./", "hf:../", "st:./", "st:../")):  # explicit relative directories, not hub ids
        prefix, _, rest = spec.partition(":")
        recipe.model.spec = f"{prefix}:{(base / rest).resolve()}"
    return recipe


def _resolve_file(text: str, base: Path, recipe_path: Path, field: str) -> Path:
    candidate = Path(text).expanduser()
    resolved = candidate if candidate.is_absolute() else (base / candidate).resolve()
    if not resolved.is_file():
        raise UsageError(f"{recipe_path}: {field}: no such file {resolved} (relative paths start at the recipe's "
                         "directory)")
    return resolved
