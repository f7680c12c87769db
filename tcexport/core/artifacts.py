"""Artifacts that bench and validate accept: an .onnx file, or a build directory holding a sidecar JSON."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tcexport.core.errors import UsageError

SIDECAR = "tcexport-build.json"


@dataclass
class Artifact:
    path: Path  # what the user named
    model_path: Path  # the file a backend loads (.onnx, or an engine file)
    backend: str  # "ort" or "trt"
    sidecar: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.path.name if self.path.is_dir() else self.path.stem


def resolve(path: str | Path) -> Artifact:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory; pass an .onnx file or a directory made by 'tcexport build'")
    if path.is_dir():
        sidecar_path = path / SIDECAR
        if not sidecar_path.exists():
            raise UsageError(f"{path}: no {SIDECAR} inside; pass a directory made by 'tcexport build'")
        try:
            sidecar = json.loads(sidecar_path.read_text())
        except json.JSONDecodeError:
            raise UsageError(f"{sidecar_path}: not valid JSON; rebuild with 'tcexport build'") from None
        if not isinstance(sidecar, dict):
            raise UsageError(f"{sidecar_path}: not a tcexport sidecar (expected a JSON object); rebuild with 'tcexport build'")
        model_path = path / sidecar.get("model_file", "model.onnx")
        # model_files: the model and its weights file, when the build keeps them apart (backends/ort.py).
        for name in [model_path.name, *sidecar.get("model_files", [])]:
            if not (path / name).exists():
                raise UsageError(f"{path}: the sidecar names {name}, which is missing; rebuild with 'tcexport build'")
        return Artifact(path, model_path, sidecar.get("backend", "ort"), sidecar)
    if path.suffix != ".onnx":
        raise UsageError(f"{path}: expected an .onnx file or a build directory")
    return Artifact(path, path, "ort", {})
