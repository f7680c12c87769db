"""What a model takes as input, and random feeds that fit it.

An InputSpec is recorded by export (in tcexport.source) and can also be read back from any ONNX graph.
Dynamic dimensions are named strings (e.g. "batch"); a feed fills "batch" with the requested batch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from tcexport import metadata
from tcexport.errors import UsageError

# Input kinds decide how random values are drawn.
FLOAT = "float"
TOKEN_IDS = "token_ids"
ATTENTION_MASK = "attention_mask"
TOKEN_TYPE_IDS = "token_type_ids"

_NP_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


@dataclass
class InputSpec:
    name: str
    shape: list  # ints, or strings for dynamic dims ("batch")
    dtype: str = "float32"
    kind: str = FLOAT
    high: int | None = None  # exclusive upper bound for token ids (vocabulary size)
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, {})}

    @classmethod
    def from_json(cls, data: dict) -> "InputSpec":
        return cls(**data)

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        dims = []
        for i, d in enumerate(self.shape):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif i == 0:
                dims.append(batch)
            else:
                raise UsageError(
                    f"input '{self.name}' has a dynamic dimension {d!r} at axis {i}; "
                    "re-export with a static size for that axis (only the batch axis may be dynamic)"
                )
        return tuple(dims)


def guess_kind(name: str, dtype: str) -> str:
    lowered = name.lower()
    if dtype.startswith("float"):
        return FLOAT
    if "mask" in lowered:
        return ATTENTION_MASK
    if "type" in lowered:
        return TOKEN_TYPE_IDS
    return TOKEN_IDS


def specs_from_graph(model: onnx.ModelProto) -> list[InputSpec]:
    """Input specs of a graph: from tcexport.source when present, else read off the graph inputs. Inputs the
    source record lacks (added by compression, e.g. the query method's "query") are read off the graph too."""
    source = metadata.read(model, metadata.SOURCE)
    specs = []
    if source and source.get("inputs"):
        specs = [InputSpec.from_json(s) for s in source["inputs"]]
    known = {t.name for t in model.graph.initializer} | {s.name for s in specs}
    for value in model.graph.input:
        if value.name in known:
            continue
        tensor_type = value.type.tensor_type
        dtype = _NP_DTYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise UsageError(f"input '{value.name}' has an element type tcexport cannot feed ({tensor_type.elem_type})")
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "dynamic") for d in tensor_type.shape.dim]
        kind = guess_kind(value.name, dtype)
        specs.append(InputSpec(value.name, shape, dtype, kind, high=1000 if kind == TOKEN_IDS else None))
    return specs


def random_feeds(specs: list[InputSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One random feed per input. Token ids are drawn below the vocabulary size; masks are all ones."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        shape = spec.concrete_shape(batch)
        if spec.kind == FLOAT:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.kind == TOKEN_IDS:
            feeds[spec.name] = rng.integers(0, spec.high or 1000, size=shape).astype(spec.dtype)
        elif spec.kind == ATTENTION_MASK:
            feeds[spec.name] = np.ones(shape, dtype=spec.dtype)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds
