"""YAML recipes: one file drives the whole pipeline, export -> compress -> validate -> build -> bench.

    tcexport build recipes/minilm_tome.yaml -o out/minilm

A recipe names a model spec and the options of every stage (schema below: pydantic, unknown fields refused).
compress runs one registered method (method, r for tome/adjacent, params for the rest, layers) or several in
layer order (stages: 'tome:r=8@0-5' text or {method, layers, params} mappings); each method checks its params.
`load(path)` reads and checks it; any problem (missing file, YAML syntax, schema) is a UsageError of one line
naming the file, the field path and the problem, e.g. "recipes/x.yaml: compress.r: must be >= 0 (got -1)".
`run(recipe, out_dir)` executes it into a temporary directory beside OUT_DIR and renames it into place at the
end, so a failed stage (or a failed validation: exit 1) leaves no OUT_DIR. The directory holds:

    model.onnx        the export (tcexport.source provenance)
    model.tc.onnx     the compressed model (absent when the recipe has no compress section)
    validate.json     the validation report (absent with validate: false)
    baseline/         ONNX Runtime build of model.onnx      (each with tcexport-build.json)
    compressed/       ONNX Runtime build of model.tc.onnx
    bench.json        baseline vs compressed, interleaved runs (absent with bench: false)
    bench.png
    recipe.yaml       the resolved recipe (defaults filled in, paths absolute): runs again as is
    summary.json      token schedule, validation verdict, speedup per batch size, stage timings

Relative paths in a recipe resolve against the recipe file's directory: model.checkpoint, an .onnx model.spec,
and hf:/st: directories written ./DIR or ../DIR (hf:NAME and st:NAME stay hub ids and bundled names).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_serializer, \
    field_validator, model_serializer, model_validator

from tcexport.core import progress
from tcexport.core.errors import UsageError, ValidationFailed
from tcexport.core.overwrite import SUMMARY

RECIPE_SUFFIXES = (".yaml", ".yml")
DEFAULT_DYNAMIC_VALIDATE_BATCHES = [1, 3]
DEFAULT_DYNAMIC_BENCH_BATCHES = [1, 8]
_LAYERS_TEXT = re.compile(r"^\s*\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*\s*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHAPE = re.compile(r"^\d+(x\d+)*$")
_FLOAT_TEXT = re.compile(r"^\s*[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+\s*$")


# ---------------------------------------------------------------------------------------------- value checks


def _yaml_float(value: Any) -> Any:
    """PyYAML reads 1e-4 (no dot) as a string; accept it as the number it is meant to be."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _whole(value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer; got {_show(value)}")
    if value < minimum:
        raise ValueError(f"must be >= {minimum} (got {value})")
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
                raise ValueError(f"must be an integer or a list of integers; item {position} is {_show(item)}")
            if item < 0:
                raise ValueError(f"must be >= 0 (got {item} at position {position})")
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer or a list of integers (one per chosen layer); got {_show(value)}")
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
            raise ValueError(f"{hint}; got {_show(value)}")
        layers_list(value)  # low <= high
        return value
    if isinstance(value, list):
        if not value:
            raise ValueError(f"{hint}; got an empty list")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or item < 0:
                raise ValueError(f"{hint}; the list holds {_show(item)}")
        if len(set(value)) != len(value):
            raise ValueError(f"lists a block twice: {_show(value)}")
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must be >= 0 (got {value})")
        return value
    raise ValueError(f"{hint}; got {_show(value)}")


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
            raise ValueError(f"must be a positive batch size or a list of them; got {_show(value)}")
    return list(dict.fromkeys(items))


def _check_export_batch(value: Any) -> str | int:
    if isinstance(value, str) and value.strip().lower() == "dynamic":
        return "dynamic"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(f"must be 'dynamic' or a positive integer; got {_show(value)}")


def _check_input_shape(value: Any) -> str | None:
    """'3x224x224' or [3, 224, 224] -> '3x224x224' (channels, height, width; no batch)."""
    if value is None:
        return None
    if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        value = "x".join(str(v) for v in value)
    if not isinstance(value, str) or not _SHAPE.match(value.strip().lower()) or \
            any(int(d) <= 0 for d in value.strip().lower().split("x")):
        raise ValueError(f"must look like 3x224x224 or [3, 224, 224] (no batch); got {_show(value)}")
    return value.strip().lower()


def _skip_or_section(value: Any) -> Any:
    """`false` skips an optional stage, `true` runs it with defaults; a bare key (null) is ambiguous."""
    if value is False:
        return None
    if value is True:
        return {}
    if value is None:
        raise ValueError("is empty; give a mapping of options, true for the defaults, or false to skip the stage")
    return value


def _show(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


Tolerance = Annotated[float, BeforeValidator(_yaml_float), Field(ge=0, allow_inf_nan=False)]
Seconds = Annotated[float, BeforeValidator(_yaml_float), Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Batches = Annotated[list[int] | None, BeforeValidator(_check_batches)]


# ---------------------------------------------------------------------------------------------- schema


class Section(BaseModel):
    # strict: no silent coercion (true is not 1, "8" is not 8); floats accept PyYAML's 1e-4 strings above.
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ModelSection(Section):
    """What to load: a model spec and how to materialise it (the options `tcexport export` takes)."""

    spec: str
    seq_len: PositiveInt | None = None
    input_shape: Annotated[str | None, BeforeValidator(_check_input_shape)] = None
    checkpoint: str | None = None
    seed: int | None = None
    pretrained: bool = False
    # timm create_model / py factory keyword arguments (`--model-arg`), e.g. {depth: 2, img_size: 32}
    model_args: dict[str, int | float | bool | str | list[int | float | bool | str] | None] | None = None

    @field_validator("spec")
    @classmethod
    def _known_spec(cls, spec: str) -> str:
        spec = spec.strip()
        if spec.endswith(".onnx"):
            return spec
        prefix, sep, rest = spec.partition(":")
        known = ("timm", "hf", "st", "py")
        if not sep or prefix not in known or not rest:
            raise ValueError(f"unknown model spec {spec!r}; use {', '.join(p + ':...' for p in known)} or an .onnx file")
        return spec

    @field_validator("checkpoint")
    @classmethod
    def _nonempty_checkpoint(cls, path: str | None) -> str | None:
        if path is not None and not path.strip():
            raise ValueError("is empty; give a path to a state dict (.pth/.pt/.bin/.safetensors)")
        return path

    @model_validator(mode="after")
    def _consistent(self) -> "ModelSection":
        if self.pretrained and self.checkpoint:
            raise ValueError("give pretrained or checkpoint, not both")
        if not self.spec.endswith(".onnx"):
            from tcexport.models import spec_check

            try:  # the options the spec's kind cannot take (seq_len for timm:, input_shape for st:, ...)
                spec_check.check(self.spec, pretrained=self.pretrained, checkpoint=None, input_shape=self.input_shape,
                                 seq_len=self.seq_len, check_paths=False)
            except UsageError as exc:
                text = _recipe_terms(str(exc))
                blamed = next((f for f in ("seq_len", "input_shape", "pretrained") if text.startswith(f)), None)
                raise ValueError(f"{blamed}: {text}" if blamed else text) from None
        if self.spec.endswith(".onnx"):
            extra = [name for name in ("seq_len", "input_shape", "checkpoint", "seed", "pretrained", "model_args")
                     if name in self.model_fields_set]
            if extra:
                raise ValueError(f"{', '.join(extra)} do not apply to an .onnx spec (fixed when it was exported)")
        return self


class ExportSection(Section):
    opset: Annotated[int, Field(ge=17, le=23)] = 18
    batch: Annotated[str | int, BeforeValidator(_check_export_batch)] = "dynamic"
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    check: bool = True
    atol: Tolerance = 1e-4


def _known_method(name: str) -> str:
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
            raise ValueError(f"parameter names must be words; got {_show(key)}")
        if isinstance(item, str) and _FLOAT_TEXT.match(item):
            item = _yaml_float(item)
        checked[key.strip().replace("-", "_")] = item
    return checked


def _recipe_terms(text: str) -> str:
    """A method's message says --keep-count (the CLI flag); a recipe says keep_count."""
    return re.sub(r"(?<![\w-])--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), text)


def _accepts(method: str, params: dict) -> bool:
    from tcexport import methods

    try:
        methods.get(method).check_params(dict(params))
    except UsageError:
        return False
    return True


def _method_problem(method: str, params: dict) -> str | None:
    """The method's own complaint about these parameters (its check_params), in recipe terms; None when fine."""
    from tcexport import methods

    try:
        methods.get(method).check_params(dict(params))
    except UsageError as exc:
        return _recipe_terms(str(exc))
    return None


Params = Annotated[dict[str, Any], BeforeValidator(_check_params)]
Layers = Annotated[str | int | list[int], BeforeValidator(_check_layers)]


def _stage_from_text(value: Any) -> Any:
    """'tome:r=8@0-5' (what `tcexport compress --stage` takes) -> {method: tome, params: {r: 8}, layers: '0-5'}."""
    if not isinstance(value, str):
        return value
    from tcexport.compress import plan as compress_plan

    try:
        method, params, layers = compress_plan.parse_stage(value.strip())
    except UsageError as exc:
        raise ValueError(_recipe_terms(str(exc)).replace("stage '", "stage text '", 1)) from None
    return {"method": method, "params": params, "layers": layers}


def _stage_value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


class StageSection(Section):
    """One stage of a multi-stage plan: a method, its parameters and the blocks it runs at.

    Written as a mapping ({method: topk, layers: "6,9", params: {keep: 0.7}}) or as the text `tcexport compress
    --stage` takes ('topk:keep=0.7@6,9'); the runner passes the text form to compress.
    """

    method: str
    params: Params = Field(default_factory=dict)
    layers: Layers

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        return _known_method(name)

    @model_validator(mode="after")
    def _method_takes_params(self) -> "StageSection":
        for key, value in self.params.items():
            if isinstance(value, bool) or isinstance(value, (int, float)):
                continue
            if not isinstance(value, str) or not value or any(c in value for c in ",@=:"):
                raise ValueError(f"params: {key} must be a single number, true/false or a word without ',@=:' in a "
                                 f"stage; got {_show(value)}")
        problem = _method_problem(self.method, self.params)
        if problem:
            raise ValueError(f"params: {problem}")
        return self

    def text(self) -> str:
        """'METHOD[:key=value,...]@LAYERS', the form compress_file(stages=...) takes."""
        args = ",".join(f"{key}={_stage_value_text(value)}" for key, value in self.params.items())
        return f"{self.method}{':' + args if args else ''}@{layers_text(self.layers)}"


Stage = Annotated[StageSection, BeforeValidator(_stage_from_text)]
SINGLE_METHOD_FIELDS = ("method", "r", "params", "layers", "schedule")


class CompressSection(Section):
    """One method (method, r or params, layers, schedule) or several in layer order (stages)."""

    method: str = "tome"
    r: Annotated[int | list[int] | None, BeforeValidator(_check_r)] = None  # tome / adjacent
    params: Params = Field(default_factory=dict)  # the method's parameters, e.g. {keep: 0.7, fuse: true}
    layers: Layers = "all"
    schedule: Literal["constant", "decreasing"] = "constant"
    stages: Annotated[list[Stage] | None, Field(min_length=1)] = None
    prop_attn: bool = True
    impl: Literal["subgraph", "function"] = "subgraph"
    protected: NonNegativeInt | None = None

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        return _known_method(name)

    @model_validator(mode="after")
    def _plan_is_consistent(self) -> "CompressSection":
        if self.stages is not None:
            return self._check_stages()
        method, params = self.method, self.params
        if self.r is not None:
            if "r" in params:
                raise ValueError("params: r is given twice (compress.r and compress.params.r); keep one")
            if not _accepts(method, {"r": 1}):
                raise ValueError(f"r: {method} takes no r; give its parameters under compress.params")
            if isinstance(self.r, list) and len(self.r) > 1 and method != "tome":
                raise ValueError(f"r: one r per layer is for tome only; {method} takes one r")
        if self.schedule != "constant" and method != "tome":
            raise ValueError(f"schedule: applies to tome only, not to {method}")
        merged = dict(params)
        if self.r is not None:
            merged["r"] = self.r[0] if isinstance(self.r, list) else self.r
        problem = _method_problem(method, merged)
        if problem:
            # r missing (ToMe needs parameter r) is the r field's problem, whatever else is wrong is params'.
            missing_r = self.r is None and "r" not in params and _accepts(method, {**params, "r": 1})
            raise ValueError(f"{'r' if missing_r else 'params'}: {problem}")
        if isinstance(self.r, list):
            if self.schedule == "decreasing" and len(self.r) > 1:
                raise ValueError("schedule 'decreasing' takes one r (the schedule spreads it over the layers)")
            chosen = layers_list(self.layers)
            if chosen is not None and len(self.r) not in (1, len(chosen)):
                raise ValueError(f"r lists {len(self.r)} values for {len(chosen)} chosen layers; give one or one per layer")
        return self

    def _check_stages(self) -> "CompressSection":
        given = [name for name in SINGLE_METHOD_FIELDS if name in self.model_fields_set]
        if given:
            raise ValueError(f"give stages or {'/'.join(given)}, not both (each stage names its own method, params "
                             "and layers)")
        owner: dict[int, int] = {}
        for index, stage in enumerate(self.stages):
            chosen = layers_list(stage.layers)
            if chosen is None and len(self.stages) > 1:
                raise ValueError(f"stages: stage {index} runs at all layers, so no other stage can run anywhere; "
                                 "give each stage its own layers")
            for block in chosen or []:
                if block in owner:
                    raise ValueError(f"stages: block {block} is in stage {owner[block]} and stage {index}; give each "
                                     "block one method")
                owner[block] = index
        return self

    def plan(self) -> dict:
        """The compress_file keyword arguments for this section's plan."""
        common = dict(prop_attn=self.prop_attn, impl=self.impl, protected=self.protected)
        if self.stages is not None:
            return dict(stages=[stage.text() for stage in self.stages], **common)
        r_text = None if self.r is None else ",".join(map(str, self.r)) if isinstance(self.r, list) else str(self.r)
        return dict(method=self.method, r=r_text, layers=layers_text(self.layers), schedule=self.schedule,
                    params=dict(self.params) or None, **common)

    def describe(self) -> str:
        """One line for the progress output: 'tome:r=8@0-5 + topk:keep=0.7@6,9' or 'topk keep=0.7 layers=1,3'."""
        if self.stages is not None:
            return " + ".join(stage.text() for stage in self.stages)
        plan = self.plan()
        args = ([f"r={plan['r']}"] if plan["r"] is not None else []) + \
            [f"{key}={_stage_value_text(value)}" for key, value in self.params.items()]
        schedule = f" schedule={self.schedule}" if self.method == "tome" else ""
        return f"{self.method} {' '.join(args)} layers={plan['layers']}{schedule}".replace("  ", " ")

    @model_serializer(mode="wrap")
    def _written_plan(self, handler):
        """Write one plan: stages alone, or the single method's fields (r and params only when given)."""
        data = handler(self)
        if self.stages is not None:
            for name in SINGLE_METHOD_FIELDS:
                data.pop(name, None)
        else:
            data.pop("stages", None)
            if self.r is None:
                data.pop("r", None)
            if not self.params:
                data.pop("params", None)
        return data


class ValidateSection(Section):
    samples: PositiveInt = 4
    seed: int = 0
    atol: Tolerance = 1e-4
    rtol: Tolerance = 1e-4
    batch: Batches = None  # default: 1 and 3 (dynamic batch) or the export's fixed batch
    threads: PositiveInt | None = None


class BuildSection(Section):
    backend: str = "ort"
    provider: Literal["cpu", "cuda", "tensorrt"] = "cpu"
    opt_level: Literal["disable", "basic", "extended", "all"] = "all"
    threads: PositiveInt | None = None

    @field_validator("backend")
    @classmethod
    def _ort_only(cls, backend: str) -> str:
        if backend == "trt":
            raise ValueError("recipes build with 'ort' (validation and bench run here); build a TensorRT engine from "
                             "the recipe's model.tc.onnx with 'tcexport build --backend trt'")
        if backend != "ort":
            raise ValueError(f"must be 'ort'; got {backend!r}")
        return backend


class BenchSection(Section):
    batch: Batches = None  # default: 1 and 8 (dynamic batch) or the export's fixed batch
    iters: PositiveInt | None = None
    duration: Seconds | None = None
    warmup: NonNegativeInt = 10
    threads: PositiveInt | None = None

    @model_validator(mode="after")
    def _iters_or_duration(self) -> "BenchSection":
        if self.iters is not None and self.duration is not None:
            raise ValueError("give iters or duration, not both")
        return self


class Recipe(Section):
    """A whole pipeline run. Stages left out run with defaults, except compress (omit: no compression)."""

    name: str | None = None  # default: the file's stem
    model: ModelSection
    export: ExportSection = Field(default_factory=ExportSection)
    compress: Annotated[CompressSection | None, BeforeValidator(lambda v: None if v is False else v)] = None
    validation: Annotated[ValidateSection | None, BeforeValidator(_skip_or_section)] = Field(
        default_factory=ValidateSection, alias="validate")
    build: BuildSection = Field(default_factory=BuildSection)
    bench: Annotated[BenchSection | None, BeforeValidator(_skip_or_section)] = Field(default_factory=BenchSection)

    @field_validator("name")
    @classmethod
    def _file_safe_name(cls, name: str | None) -> str | None:
        if name is not None and not _NAME.match(name):
            raise ValueError(f"must be letters, digits, '.', '_' or '-' (it names files); got {name!r}")
        return name

    @model_validator(mode="after")
    def _batches(self) -> "Recipe":
        fixed = self.export.batch if isinstance(self.export.batch, int) else None
        if self.model.spec.endswith(".onnx") and "export" in self.model_fields_set:
            raise ValueError("export: does not apply when model.spec is an .onnx file (it is already exported)")
        for section, label, default in ((self.validation, "validate", DEFAULT_DYNAMIC_VALIDATE_BATCHES),
                                        (self.bench, "bench", DEFAULT_DYNAMIC_BENCH_BATCHES)):
            if section is None:
                continue
            if section.batch is None:
                section.batch = [fixed] if fixed else list(default)
            elif fixed and section.batch != [fixed]:
                raise ValueError(f"{label}.batch: the export has a fixed batch of {fixed}; use batch: {fixed} or "
                                 "export.batch: dynamic")
        return self

    @field_serializer("validation", "bench")
    def _skipped_as_false(self, section: BaseModel | None):
        """A skipped stage is written back as `false` (its default would run it)."""
        return False if section is None else section.model_dump(mode="json")

    # The file this recipe came from (set by load); not part of the schema.
    _path: Path | None = None

    @property
    def path(self) -> Path | None:
        return self._path

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", by_alias=True)
        if data.get("compress") is None:
            data.pop("compress", None)
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


class _ModelOnly(Section):
    """The model section alone, checked first (see parse)."""

    model: ModelSection


SECTIONS: dict[tuple[str, ...], type[BaseModel]] = {
    (): Recipe, ("model",): ModelSection, ("export",): ExportSection, ("compress",): CompressSection,
    ("compress", "stages"): StageSection,
    ("validate",): ValidateSection, ("build",): BuildSection, ("bench",): BenchSection,
}


# ---------------------------------------------------------------------------------------------- loading


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
    got = f"; got {_show(error['input'])}" if "input" in error and kind not in ("missing", "extra_forbidden") else ""
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
        return f"must be {op} {ctx.get(key)} (got {_show(_yaml_float(error.get('input')))})"
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
        recipe.name = stem if _NAME.match(stem) else f"recipe_{stem}"
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


# ---------------------------------------------------------------------------------------------- running

Echo = Callable[[str], None]

_FLAG_FIELDS = {
    "export": {"--opset": "export.opset", "--exporter": "export.exporter", "--batch": "export.batch",
               "--checkpoint": "model.checkpoint", "--pretrained": "model.pretrained", "--seed": "model.seed",
               "--input-shape": "model.input_shape", "--seq-len": "model.seq_len", "--model-arg": "model.model_args"},
    "compress": {"--r": "compress.r", "--layers": "compress.layers", "--schedule": "compress.schedule",
                 "--impl": "compress.impl", "--protected": "compress.protected"},
}


_STAGES_FLAG_FIELDS = {"--stage": "compress.stages", "--layers": "layers", "--r": "r"}


def _in_stage(recipe: Recipe, stage: str, exc: UsageError) -> UsageError:
    """A stage's error, said in the recipe's terms (its field names instead of CLI flags)."""
    text = str(exc)
    flags = _FLAG_FIELDS.get(stage, {})
    if stage == "compress" and recipe.compress and recipe.compress.stages is not None:
        flags = {**flags, **_STAGES_FLAG_FIELDS}
    for flag, field in flags.items():
        text = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", field, text)
    if stage == "compress":
        text = _recipe_terms(text)  # a method's --keep-count is its parameter keep_count
    return UsageError(f"{recipe.path or 'recipe'}: {stage}: {text}")


def check_output(recipe: Recipe, out_dir: Path, force: bool = False) -> str | None:
    """Refuse an OUT_DIR whose replacement would destroy something this recipe did not write (see
    tcexport.core.overwrite; --force replaces it anyway). Returns the note to show when an earlier output goes."""
    from tcexport.core import overwrite

    out = out_dir.resolve()
    if recipe.path is not None and out in recipe.path.resolve().parents:
        raise UsageError(f"{out_dir}: holds the recipe itself and would be replaced; choose another -o")
    return overwrite.check_recipe_dir(out_dir, recipe.path, force)


def run(recipe: Recipe, out_dir: str | Path, echo: Echo | None = None, force: bool = False) -> dict:
    """Run every stage into OUT_DIR (atomically); return the summary (also written as summary.json)."""
    from tcexport.core.atomic import atomic_dir

    echo = echo or _echo
    out_dir = Path(out_dir)
    replacing = check_output(recipe, out_dir, force)
    if replacing:
        echo(replacing)
    stages = ["export", "compress" if recipe.compress else None, "validate" if recipe.validation else None,
              "build", "bench" if recipe.bench else None]
    runner = _Runner(recipe, echo, [s for s in stages if s], out_dir)
    echo(f"recipe {recipe.name} ({recipe.path or 'in memory'}) -> {out_dir}")
    with atomic_dir(out_dir) as tmp:
        summary = runner.run(tmp.resolve(), out_dir.resolve())
    echo(f"summary: {out_dir / SUMMARY}")
    return summary


def _echo(text: str) -> None:
    import click

    click.echo(text)


class _Runner:
    def __init__(self, recipe: Recipe, echo: Echo, stages: list[str], out_dir: Path):
        self.recipe = recipe
        self.out_dir = out_dir
        self.echo = echo
        self.stages = stages
        self.timings: dict[str, float] = {}
        self.extra_inputs: list[str] = []

    @contextlib.contextmanager
    def stage(self, stage: str, text: str) -> Iterator[progress.Step]:
        """One stage under a progress line on stderr ('[2/5] compress  ...: what it found (12.3 s)')."""
        with progress.step(f"[{self.stages.index(stage) + 1}/{len(self.stages)}] {stage:<9} {text}") as item:
            yield item
            self.timings[stage] = round(item.elapsed, 3)

    def run(self, work: Path, final: Path) -> dict:
        recipe = self.recipe
        exported = work / "model.onnx"
        export_check = self.export(exported)
        model = exported
        tokens = None
        if recipe.compress:
            model = work / "model.tc.onnx"
            tokens = self.compress(exported, model)
        report = self.validate(model, work / "validate.json") if recipe.validation else None
        builds = self.build(exported, model if recipe.compress else None, work)
        bench = self.bench(work, list(builds)) if recipe.bench else None
        (work / "recipe.yaml").write_text(
            f"# resolved from {recipe.path or 'an in-memory recipe'} by tcexport (defaults filled in)\n"
            + recipe.to_yaml())
        summary = self.summary(final, export_check, tokens, report, builds, bench)
        (work / SUMMARY).write_text(json.dumps(_finite(summary), indent=2) + "\n")
        _repoint(work, final)
        if bench:
            from tcexport.bench import run as bench_mod

            bench_mod.print_table(bench)
        if report is not None:
            from tcexport.validate import equality as validate_mod

            self.echo(validate_mod.format_report(report).replace(str(work), str(final)))
        for entry in summary["speedup"]:
            self.echo(f"speedup at batch {entry['batch']}: {entry['speedup']:.2f}x, {self.out_dir / 'compressed'} "
                      f"vs {self.out_dir / 'baseline'} (median {entry['compressed_median_ms']:.3f} ms vs "
                      f"{entry['baseline_median_ms']:.3f} ms)")
        return summary

    # ------------------------------------------------------------------ stages

    def export(self, output: Path) -> dict | None:
        recipe, model = self.recipe, self.recipe.model
        if model.spec.endswith(".onnx"):
            with self.stage("export", f"{model.spec} (already exported) -> model.onnx") as item:
                shutil.copyfile(model.spec, output)
                item.note("copied")
            return None
        from tcexport.export import exporter as export_mod
        from tcexport.models import sources

        options = dict(pretrained=model.pretrained, checkpoint=model.checkpoint, seed=model.seed,
                       input_shape=model.input_shape, seq_len=model.seq_len, model_args=model.model_args)
        described = ", ".join(f"{k} {v}" for k, v in options.items() if v not in (None, False))
        with self.stage("export", f"{model.spec}{f' ({described})' if described else ''}, opset "
                                  f"{recipe.export.opset}, batch {recipe.export.batch} -> model.onnx") as item:
            try:
                source = sources.load(model.spec, **options)
                check = export_mod.export_to_file(source, output, opset=recipe.export.opset,
                                                  batch=export_mod.parse_batch(recipe.export.batch),
                                                  check=recipe.export.check, atol=recipe.export.atol,
                                                  exporter=recipe.export.exporter)
            except UsageError as exc:
                raise _in_stage(recipe, "export", exc) from None
            if check:
                item.note(check.summary())
        return {"passed": check.passed, "max_abs": check.max_abs, "atol": check.atol} if check else None

    def compress(self, exported: Path, output: Path) -> list[dict]:
        from tcexport.compress import rewrite as compress_mod
        from tcexport.core import metadata
        from tcexport.core import onnxfile

        c = self.recipe.compress
        with self.stage("compress", f"{c.describe()} -> model.tc.onnx") as item:
            try:
                schedule = compress_mod.compress_file(exported, output, **c.plan())
            except UsageError as exc:
                raise _in_stage(self.recipe, "compress", exc) from None
            item.note("tokens per block: " + _token_path(schedule))
        # Which method ran at which block (the token schedule alone does not say), and inputs a method added.
        record = metadata.read(onnxfile.load(output, load_external_data=False), metadata.COMPRESSION) or {}
        by_block = dict(zip(record.get("layers", []), record.get("methods", [])))
        schedule = [{**entry, "method": by_block.get(entry["block"])} for entry in schedule]
        self.extra_inputs = [spec["name"] for spec in record.get("extra_inputs", [])]
        if self.extra_inputs:
            self.echo(f"compress: the compressed model takes the extra input(s) {', '.join(self.extra_inputs)}")
        return schedule

    def validate(self, model: Path, json_path: Path):
        from tcexport.validate import equality as validate_mod

        v = self.recipe.validation
        samples = f"{v.samples} sample{'s' if v.samples > 1 else ''}"
        with self.stage("validate", f"{model.name} vs PyTorch: {samples}, batch {','.join(map(str, v.batch))}, "
                                    f"atol {v.atol:g}, rtol {v.rtol:g}") as item:
            try:
                report = validate_mod.run(model, json_path=json_path, samples=v.samples, seed=v.seed, atol=v.atol,
                                          rtol=v.rtol, batches=tuple(v.batch), threads=v.threads)
            except UsageError as exc:
                raise _in_stage(self.recipe, "validate", exc) from None
            except ValidationFailed as exc:
                # The report names the temporary directory, which is about to vanish: name the file alone.
                text = str(exc).replace(f"{model.parent}{os.sep}", "")
                raise ValidationFailed(f"{text}\n{self.recipe.path or 'recipe'}: nothing written to {self.out_dir}; "
                                       "loosen validate.atol/rtol or compress less", exc.report) from None
            item.note(f"passed: max abs {report.worst('max_abs'):.2e}, {len(report.diverged)} discrete divergence(s)")
        return report

    def build(self, exported: Path, compressed: Path | None, work: Path) -> dict[str, dict]:
        from tcexport.backends import ort as ort_backend

        b = self.recipe.build
        targets = {"baseline": exported, **({"compressed": compressed} if compressed else {})}
        builds = {}
        with self.stage("build", f"{b.backend} {b.provider}, opt level {b.opt_level}: "
                                 + ", ".join(f"{src.name} -> {name}/" for name, src in targets.items())) as item:
            try:
                for name, source in targets.items():
                    builds[name] = ort_backend.build(source, work / name, provider=b.provider, threads=b.threads,
                                                     opt_level=b.opt_level)
            except UsageError as exc:
                raise _in_stage(self.recipe, "build", exc) from None
            item.note(", ".join(f"{name}: {s['nodes_before']} -> {s['nodes_after']} nodes" for name, s in builds.items()))
        return builds

    def bench(self, work: Path, names: list[str]) -> dict:
        from tcexport.bench import run as bench_mod

        b = self.recipe.bench
        amount = f"{b.duration:g} s" if b.duration else f"{b.iters or bench_mod.DEFAULT_ITERS} iters"
        with self.stage("bench", f"{' vs '.join(names)}: batch {','.join(map(str, b.batch))}, {amount} "
                                 f"after {b.warmup} warm-up (interleaved)") as item:
            try:
                results = bench_mod.run([work / name for name in names], batches=b.batch, threads=b.threads,
                                        warmup=b.warmup, iters=b.iters, duration=b.duration)
                bench_mod.write_json(results, work / "bench.json")
                bench_mod.write_plot(results, work / "bench.png")
            except UsageError as exc:
                raise _in_stage(self.recipe, "bench", exc) from None
            item.note("bench.json, bench.png")
        return results

    # ------------------------------------------------------------------ summary

    def summary(self, final: Path, export_check, tokens, report, builds: dict, bench: dict | None) -> dict:
        from tcexport import __version__

        recipe = self.recipe
        validation = None
        if report is not None:
            data = report.to_json()
            validation = {key: data[key] for key in ("passed", "atol", "rtol", "max_abs", "max_rel",
                                                     "numeric_failures", "discrete_divergences")}
            validation["samples"] = len(report.samples)
            validation["fidelity"] = _mean_fidelity(report.samples)
        speedup = []
        if bench:
            by_key = {(e["artifact"], e["batch"]): e for e in bench["results"]}
            for batch in bench["settings"]["batches"]:
                base = by_key.get(("baseline", batch))
                comp = by_key.get(("compressed", batch))
                if base and comp:
                    speedup.append({"batch": batch, "baseline_median_ms": base["latency_ms"]["median"],
                                    "compressed_median_ms": comp["latency_ms"]["median"],
                                    "speedup": comp["speedup"]})
        token_summary = None
        if tokens:
            by_method: dict[str, dict] = {}
            for entry in tokens:
                if entry["method"]:
                    found = by_method.setdefault(entry["method"], {"blocks": [], "removed": 0})
                    found["blocks"].append(entry["block"])
                    found["removed"] += entry["in"] - entry["out"]
            token_summary = {"in": tokens[0]["in"], "out": tokens[-1]["out"], "path": _token_path(tokens),
                             "by_method": by_method,
                             "per_block": [{k: s[k] for k in ("block", "method", "in", "out")} for s in tokens]}
        return {
            "tool": f"tcexport {__version__}",
            "name": recipe.name,
            "recipe": "recipe.yaml",
            "recipe_source": str(recipe.path.resolve()) if recipe.path else None,
            "recipe_sha256": hashlib.sha256(recipe.path.read_bytes()).hexdigest() if recipe.path else None,
            "model": recipe.model.spec,
            "output_dir": str(final),
            "export_check": export_check,
            "compression": None if not recipe.compress else {
                **recipe.compress.model_dump(mode="json"),
                "plan": recipe.compress.describe(),
                **({"extra_inputs": self.extra_inputs} if self.extra_inputs else {})},
            "tokens": token_summary,
            "validation": validation,
            "builds": {name: {"dir": f"{name}/", "provider": s["provider"], "nodes_before": s["nodes_before"],
                              "nodes_after": s["nodes_after"]} for name, s in builds.items()},
            "bench": None if not bench else {"file": "bench.json", "plot": "bench.png", **bench["settings"]},
            "speedup": speedup,
            "timings_s": self.timings,
        }


def _token_path(schedule: list[dict]) -> str:
    return " -> ".join([str(schedule[0]["in"])] + [str(s["out"]) for s in schedule]) if schedule else ""


def _mean_fidelity(samples: list[dict]) -> dict:
    values: dict[str, list[float]] = {}
    for sample in samples:
        for output, fidelity in sample["fidelity"].items():
            for key, value in fidelity.items():
                if isinstance(value, float):
                    values.setdefault(f"{output}.{key}", []).append(value)
    return {key: sum(v) / len(v) for key, v in values.items()}


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _repoint(work: Path, final: Path) -> None:
    """Paths recorded while building point into the temporary directory; point them at OUT_DIR instead."""
    old, new = str(work), str(final)

    def fix(value: Any) -> Any:
        if isinstance(value, str) and old in value:
            return value.replace(old, new)
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    for path in work.rglob("*.json"):
        text = path.read_text()
        if old in text:
            path.write_text(json.dumps(fix(json.loads(text)), indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- CLI entry


def build_from_file(path: str | Path, output: str | Path, echo: Echo | None = None, force: bool = False) -> dict:
    """`tcexport build RECIPE.yaml -o DIR`: load, run, and return the main build's sidecar (for the CLI's line)."""
    from tcexport.core import overwrite

    overwrite.check_recipe_dir(output, Path(path), force)  # before load: the schema's checks import torch
    recipe = load(path)
    summary = run(recipe, output, echo=echo, force=force)
    main = "compressed" if recipe.compress else "baseline"
    from tcexport.core.artifacts import SIDECAR

    sidecar = json.loads((Path(output) / main / SIDECAR).read_text())
    sidecar["summary"] = summary
    return sidecar
