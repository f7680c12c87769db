"""Hugging Face vision towers (ViT, DeiT, CLIP, SigLIP, DINOv2 with and without registers, ViTMAE with its patches
in order) and speech encoders (Whisper's encoder with tome and adjacent; Wav2Vec2 and HuBERT on raw audio; AST on
its spectrogram patches) compress and validate."""

from __future__ import annotations

import pytest

from tcexport.models import zoo
from tests.families import METHODS, compress_and_validate, export_zoo


@pytest.mark.parametrize("method", ["tome", "topk"])
@pytest.mark.parametrize("kind", list(zoo.VISION_KINDS))
def test_hf_vision_tower(tmp_path_factory, tmp_path, kind, method):
    compress_and_validate(export_zoo(tmp_path_factory, "hf", kind), tmp_path / "c.onnx", method, **METHODS[method])


@pytest.mark.parametrize("method", ["tome", "adjacent"])
def test_whisper_encoder(tmp_path_factory, tmp_path, method):
    compress_and_validate(export_zoo(tmp_path_factory, "hf", "whisper"), tmp_path / "c.onnx", method,
                          **METHODS[method])


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert"])
def test_raw_audio_encoder(tmp_path_factory, tmp_path, kind):
    compress_and_validate(export_zoo(tmp_path_factory, "hf", kind), tmp_path / "c.onnx", "adjacent",
                          **METHODS["adjacent"])


@pytest.mark.parametrize("method", ["tome", "topk"])
def test_ast_spectrogram_encoder(tmp_path_factory, tmp_path, method):
    """AST: CLS and distillation token protected (num_prefix_tokens 2, from the patch grid), the rest merged or
    pruned; validate passes at the default tolerances."""
    from tcexport.core import metadata

    schedule, compressed = compress_and_validate(export_zoo(tmp_path_factory, "hf", "ast"), tmp_path / "c.onnx",
                                                 method, **METHODS[method])
    assert schedule[0]["in"] == 2 + 3 * 7
    assert metadata.read(compressed, metadata.COMPRESSION)["protected"] == 2
