"""Export: PyTorch -> ONNX equals PyTorch, carries provenance and module scopes, and rejects bad input cleanly."""

from __future__ import annotations

import ast
import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from tcexport.core import metadata
from tests.conftest import assert_usage_error, run_cli

SCOPES = "pkg.torch.onnx.name_scopes"


def _vit_from_checkpoint(path):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


@pytest.mark.parametrize("batch", [1, 3])
def test_vit_checkpoint_export_matches_pytorch(vit_onnx, vit_checkpoint, batch):
    model = _vit_from_checkpoint(vit_checkpoint)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = model(x).numpy()
    session = ort.InferenceSession(str(vit_onnx), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"pixel_values": x.numpy()})
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() < 1e-4


def test_vit_export_has_dynamic_batch_scopes_and_provenance(vit_onnx, vit_checkpoint):
    model = onnx.load(str(vit_onnx))
    (graph_input,) = model.graph.input
    assert graph_input.type.tensor_type.shape.dim[0].dim_param  # one file serves every batch size
    scoped = [n for n in model.graph.node if any(p.key == SCOPES for p in n.metadata_props)]
    assert len(scoped) > 0.8 * len(model.graph.node)
    scopes = {s for n in scoped for p in n.metadata_props if p.key == SCOPES for s in ast.literal_eval(p.value)}
    assert {"blocks.0", "blocks.11", "blocks.5.attn"} <= scopes
    record = metadata.read(model, metadata.SOURCE)
    assert record["spec"] == "timm:vit_tiny_patch16_224"
    assert record["opset"] == 18 and record["batch"] == "dynamic"
    assert record["weights"]["kind"] == "checkpoint"
    assert record["weights"]["file_sha256"] == hashlib.sha256(vit_checkpoint.read_bytes()).hexdigest()
    assert record["inputs"][0]["shape"] == ["batch", 3, 224, 224]
    assert record["versions"]["torch"] == torch.__version__
    assert record["info"]["num_prefix_tokens"] == 1


def test_minilm_export_matches_sentence_transformers(minilm_onnx):
    from sentence_transformers import SentenceTransformer

    from tcexport import data
    from tcexport.models import sources

    model_dir = sources.resolve_st_path("all-MiniLM-L6-v2")
    st = SentenceTransformer(str(model_dir), device="cpu")
    sentences = data.sentences()
    encoded = st.tokenizer(sentences, padding="max_length", max_length=128, truncation=True, return_tensors="np")
    session = ort.InferenceSession(str(minilm_onnx), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"input_ids": encoded["input_ids"].astype(np.int64),
                                   "attention_mask": encoded["attention_mask"].astype(np.int64)})
    expected = st.encode(sentences, convert_to_numpy=True)
    cosine = np.sum(actual * expected, axis=1) / (np.linalg.norm(actual, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() > 0.9999
    model = onnx.load(str(minilm_onnx))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["sentence_embedding"]
    assert all(i.type.tensor_type.elem_type == onnx.TensorProto.INT64 for i in model.graph.input)


def test_hf_bert_directory_export(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(tmp_path / "bert")
    out = tmp_path / "bert.onnx"
    result = run_cli("export", f"hf:{tmp_path / 'bert'}", "--seq-len", "16", "-o", out)
    assert result.returncode == 0, result.stderr
    reference = BertModel.from_pretrained(tmp_path / "bert", attn_implementation="eager").eval()
    ids = torch.randint(0, 120, (3, 16), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 16, dtype=torch.int64)
    mask[1, 10:] = 0
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert np.abs(actual - expected).max() < 1e-4


def test_py_factory_image_and_text(tmp_path):
    image = tmp_path / "conv.onnx"
    result = run_cli("export", "py:tests.fixtures.factories:tiny_convnet", "--input-shape", "3x32x32", "-o", image)
    assert result.returncode == 0, result.stderr
    assert "max abs" in result.stdout
    text = tmp_path / "text.onnx"
    result = run_cli("export", "py:tests.fixtures.factories:tiny_textnet", "--seq-len", "12", "-o", text)
    assert result.returncode == 0, result.stderr
    record = metadata.read(onnx.load(str(text)), metadata.SOURCE)
    assert record["inputs"][0]["high"] == 50  # vocabulary read off the model's embedding


def test_fixed_batch_and_torchscript_exporter(tmp_path):
    out = tmp_path / "fixed.onnx"
    result = run_cli("export", "py:tests.fixtures.factories:tiny_convnet", "--input-shape", "3x16x16",
                     "--batch", "2", "--exporter", "torchscript", "-o", out)
    assert result.returncode == 0, result.stderr
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 2
    assert metadata.read(model, metadata.SOURCE)["exporter"] == "torchscript"


def test_export_mismatch_exits_1_and_writes_nothing(tmp_path):
    out = tmp_path / "noisy.onnx"
    result = run_cli("export", "py:tests.fixtures.factories:noisy_net", "--input-shape", "4", "-o", out)
    assert result.returncode == 1, result.stderr
    assert "max abs" in result.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from tests.fixtures.factories import TinyConvNet

    torch.manual_seed(7)
    model = TinyConvNet()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    out = tmp_path / "w.onnx"
    result = run_cli("export", "py:tests.fixtures.factories:tiny_convnet", "--checkpoint", tmp_path / "w.safetensors",
                     "--input-shape", "3x8x8", "-o", out)
    assert result.returncode == 0, result.stderr
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    (actual,) = ort.InferenceSession(str(out)).run(None, {"input": x})
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(actual - expected).max() < 1e-5


@pytest.mark.parametrize("args", [
    ["foo:bar"],
    ["timm:vit_tiny_patch16_22"],
    ["timm:"],
    ["timm:vit_tiny_patch16_224", "--checkpoint", "missing.pth"],
    ["timm:vit_tiny_patch16_224", "--batch", "zero"],
    ["timm:vit_tiny_patch16_224", "--batch", "0"],
    ["timm:vit_tiny_patch16_224", "--input-shape", "3xbig"],
    ["timm:vit_tiny_patch16_224", "--opset", "5"],
    ["st:/no/such/dir"],
    ["hf:/no/such/dir"],
    ["py:tests.fixtures.factories:missing", "--input-shape", "3x8x8"],
    ["py:tests.fixtures.factories:not_a_module", "--input-shape", "3x8x8"],
    ["py:no_such_module_anywhere:fn", "--input-shape", "3x8x8"],
    ["py:tests.fixtures.factories:tiny_convnet"],
    ["model.onnx"],
])
def test_bad_export_input_is_one_line_exit_2(tmp_path, args):
    out = tmp_path / "out.onnx"
    result = run_cli("export", *args, "-o", out, cwd=tmp_path)
    assert_usage_error(result)
    assert not out.exists()


def test_unreadable_and_mismatched_checkpoints(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, other)
    for checkpoint in (garbage, other):
        out = tmp_path / "out.onnx"
        result = run_cli("export", "timm:vit_tiny_patch16_224", "--checkpoint", checkpoint, "-o", out)
        assert_usage_error(result)
        assert not out.exists()
    assert "does not fit" in result.stderr


def test_wrong_output_suffix(tmp_path):
    result = run_cli("export", "py:tests.fixtures.factories:tiny_convnet", "--input-shape", "3x8x8",
                     "-o", tmp_path / "out.txt")
    assert_usage_error(result)
    assert not (tmp_path / "out.txt").exists()
