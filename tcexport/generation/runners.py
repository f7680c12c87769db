"""Engines the generation loop runs: an ONNX Runtime session over a decoder graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(bool)": np.bool_, "tensor(double)": np.float64}


class OrtRunner:
    """A decoder graph on ONNX Runtime (CPU by default)."""

    def __init__(self, model_path: str | Path, provider: str = "cpu", threads: int | None = None):
        from tcexport.backends import ort as ort_backend

        self.session = ort_backend.open_session(model_path, provider=provider, threads=threads)
        self._outputs = [o.name for o in self.session.get_outputs()]

    def input_specs(self) -> dict[str, tuple[list, type]]:
        return {i.name: (list(i.shape), _ORT_TYPES.get(i.type, np.float32)) for i in self.session.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self.session.run(self._outputs, feeds)))
