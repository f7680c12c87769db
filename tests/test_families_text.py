"""Text encoders beyond BertModel compress with tome and topk and validate, bare (hf:) and as sentence-transformers
pipelines (st:): RoBERTa, XLM-RoBERTa, DistilBERT, ALBERT (one layer's weights shared by all layers), ELECTRA,
MPNet (relative attention bias: a position term), T5's encoder from a T5Model and a T5EncoderModel directory (its
bucketed relative bias is computed by layer 0 and reused by layer 1: a position term there), and T5's encoder as a
sentence-transformers pipeline, whose SDPA attention folds that bias into the mask."""

from __future__ import annotations

import pytest

from tcexport.models import zoo
from tests.families import METHODS, compress_and_validate, export_zoo, has_node

POSITION_TERMS = {"mpnet", "t5", "t5_encoder"}


@pytest.mark.parametrize("method", ["tome", "topk"])
@pytest.mark.parametrize("kind", [k for k in zoo.TEXT_KINDS if k != "bert"])
def test_hf_text_encoder(tmp_path_factory, tmp_path, kind, method):
    model = export_zoo(tmp_path_factory, "hf", kind)
    _, compressed = compress_and_validate(model, tmp_path / "c.onnx", method, **METHODS[method])
    assert has_node(compressed, "position_term") == (kind in POSITION_TERMS)


@pytest.mark.parametrize("method", ["tome", "topk"])
@pytest.mark.parametrize("kind", list(zoo.ST_KINDS))
def test_sentence_transformers_pipeline(tmp_path_factory, tmp_path, kind, method):
    model = export_zoo(tmp_path_factory, "st", kind)
    _, compressed = compress_and_validate(model, tmp_path / "c.onnx", method, **METHODS[method])
    assert has_node(compressed, "/tokens")  # the pooling's mask chain is fed round(mask * size)
    # sentence-T5 runs transformers' SDPA attention, which folds T5's position bias into the mask (Where(mask,
    # bias, min)): the bias is gathered and added back onto the rebuilt mask
    assert has_node(compressed, "mask_with_position_term") == (kind == "t5_encoder")
