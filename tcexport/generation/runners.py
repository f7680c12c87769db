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

    def run(self, feeds: dict) -> dict:
        """One step. Feeds are numpy arrays or OrtValues; outputs named present* stay OrtValues in ORT's memory
        (the loop feeds them back as they are: no copy into numpy and back per step), the rest are numpy."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, value in feeds.items():
            if isinstance(value, ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return {name: value if name.startswith("present") else value.numpy()
                for name, value in zip(self._outputs, binding.get_outputs())}
