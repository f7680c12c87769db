"""validate --reference-onnx: fidelity of a compressed model against its uncompressed ONNX, for files that
tcexport did not export (no tcexport.source record): a user's own torch.onnx.export output."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tcexport.core import metadata
from tcexport.models.inputs import specs_from_graph
from tcexport.validate.equality import sample_feeds
from tests.conftest import assert_usage_error, run_cli
from tests.fixtures.plain_onnx import export_tiny_bert, export_tiny_vit


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory):
    """(uncompressed, compressed) tiny ViT from a plain torch.onnx.export, compressed with ToMe r=4."""
    root = tmp_path_factory.mktemp("plain_vit")
    plain = export_tiny_vit(root / "vit.onnx")
    assert metadata.read(onnx.load(str(plain)), metadata.SOURCE) is None
    compressed = root / "vit_tome.onnx"
    result = run_cli("compress", plain, "--r", "4", "-o", compressed)
    assert result.returncode == 0, result.stderr
    return plain, compressed


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_without_source_record_validate_names_the_option(vit_pair):
    _, compressed = vit_pair
    result = run_cli("validate", compressed)
    assert_usage_error(result)
    assert "no tcexport.source record" in result.stderr and "--reference-onnx" in result.stderr


def test_fidelity_report_matches_both_models_run_independently(vit_pair, tmp_path):
    plain, compressed = vit_pair
    report_path = tmp_path / "fidelity.json"
    result = run_cli("validate", compressed, "--reference-onnx", plain, "--samples", "2", "--json", report_path)
    assert result.returncode == 0, result.stderr
    assert "FIDELITY vs the uncompressed model" in result.stdout and "not an equality check" in result.stdout
    assert "top-1 agreement" in result.stdout
    report = json.loads(report_path.read_text())
    assert report["kind"] == "fidelity" and report["passed"] and report["min_cosine"] is None
    assert [s["batch"] for s in report["samples"]] == [1, 3]
    # Recompute sample 1 (batch 3, seed 1) with plain ONNX Runtime sessions.
    feeds = sample_feeds(specs_from_graph(onnx.load(str(plain))), 3, 1)
    want = ort.InferenceSession(str(plain)).run(None, feeds)[0]
    got = ort.InferenceSession(str(compressed)).run(None, feeds)[0]
    logits = report["samples"][1]["outputs"]["logits"]
    cosine = _cosines(want, got)
    assert logits["cosine_min"] == pytest.approx(cosine.min(), abs=1e-9)
    assert logits["cosine_mean"] == pytest.approx(cosine.mean(), abs=1e-9)
    assert logits["max_abs"] == pytest.approx(float(np.abs(want - got).max()), rel=1e-6)
    assert logits["top1_agreement"] == pytest.approx(np.mean(want.argmax(1) == got.argmax(1)))
    assert 0 < logits["max_abs"]  # compression changed the outputs: this is fidelity, not equality
    assert report["outputs"]["logits"]["cosine_min"] == min(s["outputs"]["logits"]["cosine_min"]
                                                             for s in report["samples"])


def test_min_cosine_not_met_exits_1_with_the_report(vit_pair, tmp_path):
    plain, compressed = vit_pair
    report_path = tmp_path / "fidelity.json"
    result = run_cli("validate", compressed, "--reference-onnx", plain, "--samples", "2", "--min-cosine", "1.0",
                     "--json", report_path)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "FAILED: cosine below --min-cosine 1 for logits" in result.stderr
    report = json.loads(report_path.read_text())
    assert not report["passed"] and report["below_min_cosine"] == ["logits"]
    floor = report["outputs"]["logits"]["cosine_min"] - 1e-6  # just under what the model reaches: passes
    assert run_cli("validate", compressed, "--reference-onnx", plain, "--samples", "2", "--min-cosine",
                   f"{floor:.9f}").returncode == 0


@pytest.mark.parametrize("extra,message", [(["--atol", "1e-3"], "only --min-cosine applies"),
                                           (["--reference-onnx", "missing.onnx"], "no such file")])
def test_bad_reference_options_are_usage_errors(vit_pair, tmp_path, extra, message):
    plain, compressed = vit_pair
    args = ["validate", compressed, *(extra if "--reference-onnx" in extra else ["--reference-onnx", plain, *extra])]
    result = run_cli(*args, cwd=tmp_path)
    assert_usage_error(result)
    assert message in result.stderr


def test_text_model_bounds_ids_and_skips_outputs_whose_tokens_changed(vit_pair, tmp_path):
    """A 120-token vocabulary (ids must stay below it), padding from attention_mask, and last_hidden_state
    with fewer tokens than the reference: reported as not comparable; pooler_output is compared."""
    plain = export_tiny_bert(tmp_path / "bert.onnx")
    compressed = tmp_path / "bert_tome.onnx"
    assert run_cli("compress", plain, "--r", "2", "-o", compressed).returncode == 0
    report_path = tmp_path / "fidelity.json"
    result = run_cli("validate", compressed, "--reference-onnx", plain, "--samples", "2", "--min-cosine", "0.9",
                     "--json", report_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    report = json.loads(report_path.read_text())
    hidden, pooled = report["outputs"]["last_hidden_state"], report["outputs"]["pooler_output"]
    assert hidden["cosine_min"] is None and "not comparable" in hidden["note"]
    assert pooled["cosine_min"] >= 0.9 and "top1_agreement" not in pooled  # an embedding, not class scores
    # The ViT's inputs differ from BERT's: not a model and its own uncompressed export.
    _, vit_compressed = vit_pair
    mismatch = run_cli("validate", vit_compressed, "--reference-onnx", plain)
    assert_usage_error(mismatch)
    assert "no input 'input_ids'" in mismatch.stderr


def _engine_skip_reason() -> str | None:
    from tcexport.backends import trt_device
    from tcexport.core.errors import UsageError

    try:
        trt_device.require_tensorrt()
        trt_device.require_gpu()
    except UsageError as exc:
        return f"needs TensorRT and an NVIDIA GPU ({exc})"
    return None


_ENGINE_SKIP = _engine_skip_reason()


@pytest.mark.trt
@pytest.mark.gpu
@pytest.mark.skipif(_ENGINE_SKIP is not None, reason=_ENGINE_SKIP or "")
def test_engine_directory_fidelity(vit_pair, tmp_path):
    """A TensorRT engine of the compressed model against the uncompressed ONNX, run in ONNX Runtime."""
    plain, compressed = vit_pair
    engine = tmp_path / "engine"
    assert run_cli("build", compressed, "--backend", "trt", "--batch", "1,1,4", "-o", engine).returncode == 0
    report_path = tmp_path / "fidelity.json"
    result = run_cli("validate", engine, "--reference-onnx", plain, "--samples", "2", "--min-cosine", "0.99",
                     "--json", report_path)
    assert result.returncode == 0, (result.stdout, result.stderr)
    engine_report = json.loads(report_path.read_text())
    onnx_report_path = tmp_path / "fidelity_onnx.json"
    assert run_cli("validate", compressed, "--reference-onnx", plain, "--samples", "2",
                   "--json", onnx_report_path).returncode == 0
    onnx_report = json.loads(onnx_report_path.read_text())
    # fp32 engine and ONNX Runtime run the same compressed graph: the same fidelity, to rounding.
    assert engine_report["outputs"]["logits"]["cosine_mean"] == pytest.approx(
        onnx_report["outputs"]["logits"]["cosine_mean"], abs=1e-4)
