"""Engines the generation loop runs: an ONNX Runtime session over a decoder graph, or a TensorRT engine of it.

A runner has input_specs() (name -> (shape, numpy dtype), symbolic axes as strings or -1) and run(feeds) ->
outputs: `logits` as numpy, present* in the engine's own memory (OrtValues; torch tensors on the GPU for
TensorRT), which the loop feeds back as the next step's past without a copy through the host.
"""

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


_TRT_TO_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "BF16": np.float32, "INT64": np.int64, "INT32": np.int32,
                 "BOOL": np.bool_}


class TrtDecoderRunner:
    """A decoder graph's TensorRT engine (a 'tcexport build --backend trt' directory) under the generation loop.

    Each step binds the feeds (numpy arrays go to the GPU; present tensors of the last step are on it already and
    are bound as they are), sets the input shapes inside the engine's profile (sequence and past length: see
    backends/trt_profiles.decoder_profile_shapes), runs, and returns logits on the host and present* on the GPU.
    `engine`: a backends.trt_engine.TrtRunner, or anything with its run_on_device/cuda/engine surface (tests)."""

    def __init__(self, engine):
        self.engine = engine

    @classmethod
    def open(cls, artifact) -> "TrtDecoderRunner":
        from tcexport.backends import trt_engine

        return cls(trt_engine.open_engine_runner(artifact))

    def input_specs(self) -> dict[str, tuple[list, type]]:
        engine = self.engine.engine
        specs = {}
        for name in self.engine.input_names:
            dtype = getattr(engine.get_tensor_dtype(name), "name", "FLOAT")
            specs[name] = ([int(d) for d in engine.get_tensor_shape(name)], _TRT_TO_NUMPY.get(dtype, np.float32))
        return specs

    def run(self, feeds: dict) -> dict:
        outputs = self.engine.run_on_device(feeds)
        return {name: value if name.startswith("present") else self.engine.cuda.to_numpy(value)
                for name, value in outputs.items()}
