"""Loading ONNX files with errors a user can act on."""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from tcexport.errors import UsageError


def load(path: str | Path, load_external_data: bool = True) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise UsageError(f"{path} is a directory; pass an .onnx file")
    try:
        model = onnx.load(str(path), load_external_data=load_external_data)
    except (DecodeError, RuntimeError, ValueError, OSError) as exc:
        raise UsageError(f"{path}: not a readable ONNX model ({type(exc).__name__}); re-export it") from None
    if not model.graph.node:
        raise UsageError(f"{path}: not a readable ONNX model (empty graph); re-export it")
    return model


def save(model: onnx.ModelProto, path: str | Path) -> None:
    """Save in one file when it fits protobuf's 2 GB limit, with external data otherwise."""
    path = Path(path)
    large = model.ByteSize() > 1_800_000_000
    onnx.save_model(model, str(path), save_as_external_data=large, location=path.name + ".data" if large else None)
