"""The generation loop on a TensorRT engine (generation/runners.TrtDecoderRunner), checked without TensorRT: an
engine stand-in with TrtRunner's surface runs the same decoder graph in ONNX Runtime and hands its outputs back as
torch tensors (the GPU buffers TensorRT would give). The loop must give the ORT runner's tokens, feed each present
back as the tensor the engine returned (no trip through numpy), and read shapes and bytes off torch tensors; a
TensorRT build directory on a machine without TensorRT is one line from `tcexport generate`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tcexport.generation import loop, policies
from tcexport.generation.runners import OrtRunner, TrtDecoderRunner
from tests.conftest import assert_usage_error, cli_here
from tests.test_decoder_methods import CASES, _compress, llama_onnx  # noqa: F401 (a fixture)


class _Dtype:
    def __init__(self, name: str):
        self.name = name


class _FakeEngine:
    """TrtRunner's surface (input_names, engine.get_tensor_shape/dtype, run_on_device, cuda.to_numpy) over an ORT
    session; records what each step was fed."""

    def __init__(self, model_path: Path):
        self.session = OrtRunner(model_path).session
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.fed: list[dict] = []
        self.returned: list[dict] = []
        inputs = {i.name: i for i in self.session.get_inputs()}
        session = self.session

        class Engine:
            @staticmethod
            def get_tensor_shape(name):
                return [d if isinstance(d, int) else -1 for d in inputs[name].shape]

            @staticmethod
            def get_tensor_dtype(name):
                return _Dtype("INT64" if inputs[name].type == "tensor(int64)" else "FLOAT")

        class Cuda:
            @staticmethod
            def to_numpy(tensor):
                return tensor.cpu().numpy()

        self.engine, self.cuda, self._session = Engine(), Cuda(), session

    def run_on_device(self, feeds: dict) -> dict:
        self.fed.append(dict(feeds))
        arrays = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in feeds.items()}
        names = [o.name for o in self._session.get_outputs()]
        outputs = {n: torch.from_numpy(v) for n, v in zip(names, self._session.run(names, arrays))}
        self.returned.append(outputs)
        return outputs


PROMPTS = [[5, 9, 17, 33, 2, 8, 41, 7, 3, 12, 60, 4, 19, 22, 6, 30, 11, 9, 50, 13, 27, 1, 14, 40, 8, 2, 66, 5, 3, 21],
           [7, 7, 3, 90, 12, 5, 8, 44, 1, 2, 3, 71, 15, 16, 9, 25, 33, 2]]


@pytest.mark.parametrize("case", ["none", "fastv", "snapkv", "streaming"])
def test_loop_on_an_engine_gives_the_ort_runners_tokens_and_feeds_presents_back_as_returned(llama_onnx, tmp_path,
                                                                                           case):
    path = llama_onnx if case == "none" else _compress(llama_onnx, tmp_path / f"{case}.onnx", *CASES[case])
    from tcexport.generation.run import decoder_records

    policy = policies.from_record(decoder_records(path)[2])
    expected = loop.generate(OrtRunner(path), PROMPTS, 8, policy=policy)
    fake = _FakeEngine(path)
    got = loop.generate(TrtDecoderRunner(fake), PROMPTS, 8, policy=policy)
    assert got.tokens == expected.tokens
    assert np.abs(got.first_logits - expected.first_logits).max() < 1e-5
    assert got.cache_lengths == expected.cache_lengths and got.kv_bytes == expected.kv_bytes
    past = [name for name in fake.fed[1] if name.startswith("past_key_values")]
    for step in range(1, len(fake.fed)):
        for name in past:
            fed, returned = fake.fed[step][name], fake.returned[step - 1][loop.present_name(name)]
            if case == "streaming" and fed is not returned:  # the policy trimmed it: a new array, on the host
                assert isinstance(fed, np.ndarray)
                continue
            assert fed is returned, (step, name)


def test_shapes_bytes_and_arrays_of_torch_state():
    value = torch.zeros(2, 3, 5, 4, dtype=torch.float16)
    assert loop.shape_of(value) == (2, 3, 5, 4)
    assert loop.nbytes_of(value) == 2 * 3 * 5 * 4 * 2
    array = loop.as_array(torch.ones(1, 2, dtype=torch.bfloat16))
    assert array.dtype == np.float32 and array.tolist() == [[1.0, 1.0]]


def test_generate_on_a_tensorrt_build_without_tensorrt_is_one_line(llama_onnx, tmp_path):
    from tcexport.backends import trt_device
    from tcexport.core import artifacts, metadata, onnxfile

    try:
        trt_device.require_tensorrt()
        pytest.skip("TensorRT is installed here: the refusal is for machines without it")
    except Exception:  # noqa: BLE001 - UsageError: not installed, the case under test
        pass
    build = tmp_path / "engine"
    build.mkdir()
    (build / "model.plan").write_bytes(b"not an engine")
    records = metadata.all_records(onnxfile.load(llama_onnx, load_external_data=False))
    (build / artifacts.SIDECAR).write_text(json.dumps({"backend": "trt", "model_file": "model.plan",
                                                     "records": records}))
    result = cli_here("generate", build, "--prompt-ids", "1,2,3", "--json", tmp_path / "g.json")
    assert_usage_error(result)
    assert "TensorRT engine needs the tensorrt package" in result.stderr, result.stderr
    assert not (tmp_path / "g.json").exists()
