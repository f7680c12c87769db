"""The recipe schema: one pydantic section per pipeline stage, and the Recipe that holds them.

    name: minilm_tome          # optional; default: the file's stem
    model:    {spec: st:all-MiniLM-L6-v2, seq_len: 128}
    export:   {opset: 18, batch: dynamic}
    compress: {method: tome, r: 8, layers: 0-5}
    validate: {samples: 4, atol: 1e-4}     # false skips it
    build:    {provider: cpu}
    bench:    {batch: [1, 8]}               # false skips it

Unknown fields are refused and nothing is coerced (true is not 1). compress runs one registered method (method,
r for tome/adjacent, params for the rest, layers) or several in layer order (stages: 'tome:r=8@0-5' text or
{method, layers, params} mappings); each method checks its params. A section's own check may blame one of its
fields by starting its ValueError 'FIELD: '. Reading a file and wording the errors: tcexport.recipes.loading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_serializer, field_validator, \
    model_serializer, model_validator

from tcexport.core.errors import UsageError
from tcexport.recipes.fields import NAME, Batches, ExportBatch, InputShape, Layers, NonNegativeInt, Params, \
    PositiveInt, RValue, Seconds, Tolerance, accepts, known_method, layers_list, layers_text, method_problem, \
    recipe_terms, show, skip_or_section, stage_from_text, stage_value_text

DEFAULT_DYNAMIC_VALIDATE_BATCHES = [1, 3]
DEFAULT_DYNAMIC_BENCH_BATCHES = [1, 8]


class Section(BaseModel):
    # strict: no silent coercion (true is not 1, "8" is not 8); floats accept PyYAML's 1e-4 strings (fields.yaml_float).
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class ModelSection(Section):
    """What to load: a model spec and how to materialise it (the options `tcexport export` takes)."""

    spec: str
    seq_len: PositiveInt | None = None
    input_shape: InputShape = None
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
                text = recipe_terms(str(exc))
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
    batch: ExportBatch = "dynamic"
    exporter: Literal["dynamo", "torchscript"] = "dynamo"
    check: bool = True
    atol: Tolerance = 1e-4


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
        return known_method(name)

    @model_validator(mode="after")
    def _method_takes_params(self) -> "StageSection":
        for key, value in self.params.items():
            if isinstance(value, bool) or isinstance(value, (int, float)):
                continue
            if not isinstance(value, str) or not value or any(c in value for c in ",@=:"):
                raise ValueError(f"params: {key} must be a single number, true/false or a word without ',@=:' in a "
                                 f"stage; got {show(value)}")
        problem = method_problem(self.method, self.params)
        if problem:
            raise ValueError(f"params: {problem}")
        return self

    def text(self) -> str:
        """'METHOD[:key=value,...]@LAYERS', the form compress_file(stages=...) takes."""
        args = ",".join(f"{key}={stage_value_text(value)}" for key, value in self.params.items())
        return f"{self.method}{':' + args if args else ''}@{layers_text(self.layers)}"


Stage = Annotated[StageSection, BeforeValidator(stage_from_text)]
SINGLE_METHOD_FIELDS = ("method", "r", "params", "layers", "schedule")


class CompressSection(Section):
    """One method (method, r or params, layers, schedule) or several in layer order (stages)."""

    method: str = "tome"
    r: RValue = None  # tome / adjacent
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
        return known_method(name)

    @model_validator(mode="after")
    def _plan_is_consistent(self) -> "CompressSection":
        if self.stages is not None:
            return self._check_stages()
        method, params = self.method, self.params
        if self.r is not None:
            if "r" in params:
                raise ValueError("params: r is given twice (compress.r and compress.params.r); keep one")
            if not accepts(method, {"r": 1}):
                raise ValueError(f"r: {method} takes no r; give its parameters under compress.params")
            if isinstance(self.r, list) and len(self.r) > 1 and method != "tome":
                raise ValueError(f"r: one r per layer is for tome only; {method} takes one r")
        if self.schedule != "constant" and method != "tome":
            raise ValueError(f"schedule: applies to tome only, not to {method}")
        merged = dict(params)
        if self.r is not None:
            merged["r"] = self.r[0] if isinstance(self.r, list) else self.r
        problem = method_problem(method, merged)
        if problem:
            # r missing (ToMe needs parameter r) is the r field's problem, whatever else is wrong is params'.
            missing_r = self.r is None and "r" not in params and accepts(method, {**params, "r": 1})
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
            [f"{key}={stage_value_text(value)}" for key, value in self.params.items()]
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
    validation: Annotated[ValidateSection | None, BeforeValidator(skip_or_section)] = Field(
        default_factory=ValidateSection, alias="validate")
    build: BuildSection = Field(default_factory=BuildSection)
    bench: Annotated[BenchSection | None, BeforeValidator(skip_or_section)] = Field(default_factory=BenchSection)

    @field_validator("name")
    @classmethod
    def _file_safe_name(cls, name: str | None) -> str | None:
        if name is not None and not NAME.match(name):
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


SECTIONS: dict[tuple[str, ...], type[BaseModel]] = {
    (): Recipe, ("model",): ModelSection, ("export",): ExportSection, ("compress",): CompressSection,
    ("compress", "stages"): StageSection,
    ("validate",): ValidateSection, ("build",): BuildSection, ("bench",): BenchSection,
}

