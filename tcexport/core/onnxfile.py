"""Loading and writing ONNX files, with errors a user can act on, whether the weights sit inside the .onnx file
or in an external data file beside it.

Layout rule for every ONNX file tcexport writes: the weights stay inside the one .onnx file, unless the model it
came from kept them in external data, or the model is over protobuf's 2 GB limit; then they go to a single
`OUT.onnx.data` beside `OUT.onnx`, referenced by that name, so the two files move together.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import uses_external_data

from tcexport.core.errors import UsageError

PROTOBUF_LIMIT = 1_800_000_000  # bytes; protobuf refuses messages over 2 GiB, so leave headroom
DATA_SUFFIX = ".data"


def load(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; pass an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise UsageError(f"{path}: not a readable ONNX model ({type(exc).__name__}); re-export it") from None
    if not model.graph.node:
        raise UsageError(f"{path}: not a readable ONNX model (empty graph); re-export it")
    if load_external_data:
        missing = [name for name in external_data_locations(model) if not (path.parent / name).is_file()]
        if missing:
            raise UsageError(f"{path}: its weights file {missing[0]} is missing (it must sit beside the .onnx "
                             "file); copy it there or re-export")
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError) as exc:
            raise UsageError(f"{path}: its external weights cannot be read ({type(exc).__name__}); re-export "
                             "it") from None
    return model


def _tensors(model: onnx.ModelProto):
    """Every tensor that can hold weights: initializers and tensor attributes, in the graph, its subgraphs and
    the model-local functions."""
    def in_graph(graph: onnx.GraphProto):
        yield from graph.initializer
        yield from in_nodes(graph.node)

    def in_nodes(nodes):
        for node in nodes:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    yield from in_graph(attribute.g)
                for graph in attribute.graphs:
                    yield from in_graph(graph)

    yield from in_graph(model.graph)
    for function in model.functions:
        yield from in_nodes(function.node)


def external_data_locations(model: onnx.ModelProto) -> list[str]:
    """The external data files the model names (relative to its own directory), in first-use order."""
    names: dict[str, None] = {}
    for tensor in _tensors(model):
        if uses_external_data(tensor):
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                names[location] = None
    return list(names)


def external_data_files(path: str | Path) -> list[Path]:
    """The weights files an .onnx file reads besides itself (empty when its weights are inside)."""
    path = Path(path)
    return [path.parent / name for name in external_data_locations(onnx.load(str(path), load_external_data=False))]


def has_external_data(path: str | Path) -> bool:
    return bool(external_data_files(path))


def needs_external_data(model: onnx.ModelProto) -> bool:
    return model.ByteSize() > PROTOBUF_LIMIT


def data_file_name(path: str | Path) -> str:
    return Path(path).name + DATA_SUFFIX


def save(model: onnx.ModelProto, path: str | Path) -> None:
    """Save in one file when it fits protobuf's 2 GB limit, with external data otherwise (`path` may be a
    temporary name; prefer `write`, which also names the data file after the final path)."""
    path = Path(path)
    large = needs_external_data(model)
    onnx.save_model(model, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)


def write(model: onnx.ModelProto, path: str | Path, external_data: bool = False) -> list[Path]:
    """Write `model` to `path` following the layout rule above; `external_data`: the source had external data.

    Nothing appears under the final names until everything is written (a staging directory beside `path`,
    then renames: the data file first, the .onnx last). Returns the files written."""
    from tcexport.core.atomic import check_writable

    path = check_writable(path)
    external = external_data or needs_external_data(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        staged = staging / path.name
        if external:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving with external data rewrites the tensors it moves out
            onnx.save_model(copy, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_file_name(path), size_threshold=1024)
            data = path.with_name(data_file_name(path))
            _readable(staging / data.name)
            os.replace(staging / data.name, data)
        else:
            onnx.save_model(model, str(staged))
        _readable(staged)
        os.replace(staged, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [path, path.with_name(data_file_name(path))] if external else [path]


def _readable(path: Path) -> None:
    """Give a written file the permissions any new file gets (the external data writer makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
