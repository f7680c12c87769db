"""What a model takes as input, and random feeds that fit it.

An InputSpec is recorded by export (in tcexport.source) and can also be read back from any ONNX graph.
Dynamic dimensions are named strings (e.g. "batch"); a feed fills "batch" with the requested batch size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from tcexport.core import metadata
from tcexport.core.errors import UsageError

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
        high = (vocabulary_size(model, value.name) or 1000) if kind == TOKEN_IDS else None
        specs.append(InputSpec(value.name, shape, dtype, kind, high=high))
    return specs


DECODER_SMOKE_TOKENS = 4


def is_decoder_graph(specs: list[InputSpec]) -> bool:
    """A decoder graph with a KV cache (tcexport/export/decoder.py's I/O): some input is past state."""
    return any(s.name.startswith("past") for s in specs)


TOKEN_INPUTS = ("input_ids", "inputs_embeds")  # what a decoder graph takes its new tokens as


def token_input_of(names) -> str:
    """The token input among a graph's input names: input_ids, or inputs_embeds [batch, seq, hidden] (a graph fed
    by an embedding graph, as a VLM's decoder is)."""
    return "inputs_embeds" if "inputs_embeds" in set(names) else "input_ids"


def decoder_smoke_feeds(specs: list[InputSpec], batch: int) -> dict[str, np.ndarray]:
    """Feeds that run a decoder graph once: a prefill of a few real tokens, every past state empty."""
    feeds = {}
    for spec in specs:
        if spec.name.startswith("past"):
            dims = [batch if i == 0 else (d if isinstance(d, int) and d > 0 else 0) for i, d in enumerate(spec.shape)]
            feeds[spec.name] = np.zeros(dims, dtype=spec.dtype)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.tile(np.arange(DECODER_SMOKE_TOKENS, dtype=spec.dtype), (batch, 1))
        elif spec.kind == ATTENTION_MASK or spec.name == "attention_mask":
            feeds[spec.name] = np.ones((batch, DECODER_SMOKE_TOKENS), dtype=spec.dtype)
        elif spec.name == "inputs_embeds":
            feeds[spec.name] = np.random.default_rng(0).standard_normal(
                (batch, DECODER_SMOKE_TOKENS, int(spec.shape[2]))).astype(spec.dtype)
        else:
            high = spec.high or 2
            feeds[spec.name] = np.random.default_rng(0).integers(0, high, (batch, DECODER_SMOKE_TOKENS)).astype(spec.dtype)
    return feeds


def vocabulary_size(model: onnx.ModelProto, input_name: str) -> int | None:
    """Rows of the smallest embedding table the input indexes (a Gather on an initializer, through Casts), so
    random token ids stay in range for a graph without a tcexport.source record."""
    tables = {t.name: t for t in model.graph.initializer}
    names, sizes = {input_name}, []
    for node in model.graph.node:  # graph order: a Cast of the ids comes before the Gather that reads it
        if node.op_type == "Cast" and node.input and node.input[0] in names:
            names.add(node.output[0])
        elif node.op_type == "Gather" and len(node.input) > 1 and node.input[1] in names:
            table = tables.get(node.input[0])
            if table is not None and table.dims:
                sizes.append(int(table.dims[0]))
    return min(sizes) if sizes else None


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


# ---------------------------------------------------------------------------------------------- user-given inputs


def read_npz(path, flag: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file, by name; `flag` names the option in errors (--inputs, --load-inputs)."""
    from pathlib import Path

    path = Path(path)
    try:
        with np.load(path) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as exc:
        raise UsageError(f"{flag} {path}: not a readable .npz file ({type(exc).__name__}); save one with "
                         "numpy.savez(path, input_name=array, ...)") from None


def feeds_from_arrays(arrays: dict[str, np.ndarray], specs: list[InputSpec], origin: str) -> dict[str, np.ndarray]:
    """One feed per spec from arrays named as the inputs (any batch size, the same for all)."""
    missing = [spec.name for spec in specs if spec.name not in arrays]
    if missing:
        raise UsageError(f"{origin}: no array for input(s) {', '.join(missing)} (it has "
                         f"{', '.join(arrays) or 'none'})")
    feeds, batches = {}, set()
    for spec in specs:
        array = arrays[spec.name]
        expected = spec.concrete_shape(array.shape[0] if array.ndim else 0)
        if array.shape != expected:
            raise UsageError(f"{origin}: '{spec.name}' has shape {list(array.shape)}, the model takes "
                             f"{list(spec.shape)}")
        feeds[spec.name] = array.astype(spec.dtype)
        batches.add(array.shape[0])
    if len(batches) != 1:
        raise UsageError(f"{origin}: the arrays disagree on the batch size ({sorted(batches)})")
    return feeds


def load_npz_feeds(path, specs: list[InputSpec], flag: str) -> dict[str, np.ndarray]:
    """Feeds from an .npz file with one array per model input, named as the inputs."""
    return feeds_from_arrays(read_npz(path, flag), specs, f"{flag} {path}")


def parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """trtexec's --shapes: 'input:1x3x224x224[,other:1x128]' -> {name: dims}."""
    shapes: dict[str, tuple[int, ...]] = {}
    hint = "--shapes takes NAME:DIMS[,NAME:DIMS...], e.g. pixel_values:1x3x224x224"
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, dims_text = item.rpartition(":")
        try:
            dims = tuple(int(d) for d in dims_text.lower().split("x"))
        except ValueError:
            dims = ()
        if not sep or not name or not dims or any(d <= 0 for d in dims):
            raise UsageError(f"{hint}; got '{item}'")
        if name in shapes:
            raise UsageError(f"--shapes names '{name}' twice")
        shapes[name] = dims
    if not shapes:
        raise UsageError(f"{hint}; got '{text}'")
    return shapes


def shapes_batch(shapes: dict[str, tuple[int, ...]]) -> int:
    """The batch size --shapes implies: the first dimension, the same for every input."""
    batches = {dims[0] for dims in shapes.values()}
    if len(batches) != 1:
        raise UsageError(f"--shapes: the inputs disagree on the batch size (first dimension: {sorted(batches)})")
    return batches.pop()


def with_shapes(specs: list[InputSpec], shapes: dict[str, tuple[int, ...]], origin: str) -> list[InputSpec]:
    """Specs with the --shapes dims filled in; a static dimension that differs is refused."""
    from dataclasses import replace

    out = []
    for spec in specs:
        dims = shapes.get(spec.name)
        if dims is None:
            out.append(spec)
            continue
        if len(dims) != len(spec.shape):
            raise UsageError(f"{origin}: --shapes gives '{spec.name}' {len(dims)} dimensions, the model takes "
                             f"{len(spec.shape)} ({list(spec.shape)})")
        fixed = [(axis, want, got) for axis, (want, got) in enumerate(zip(spec.shape, dims))
                 if isinstance(want, int) and want > 0 and want != got and axis > 0]
        if fixed:
            axis, want, got = fixed[0]
            raise UsageError(f"{origin}: --shapes gives '{spec.name}' {got} at axis {axis}, where the model is fixed "
                             f"at {want} ({list(spec.shape)})")
        out.append(replace(spec, shape=list(dims)))
    return out
