"""timm families compress with tome and topk and validate: relative position bias (BEiT, relpos), rotary (EVA),
average pooling and register tokens, layer scale, attention-pool heads; windowed attention and CNNs are refused."""

from __future__ import annotations

import pytest

from tcexport.compress import rewrite as compress
from tcexport.core.errors import UsageError
from tests.families import METHODS, compress_and_validate, export_zoo, has_node

# family -> the graph node that shows its mechanism took part (None: nothing beyond plain blocks)
TIMM = {
    "vit_tiny_patch16_224": None,
    # relative position bias [1, H, N, N]: gathered at the tokens' position pairs in one Gather
    "beit_base_patch16_224": "position_term/gather_pairs",
    "vit_relpos_small_patch16_224": "position_term/gather_pairs",
    "eva02_tiny_patch14_224": "position_term",  # rotary cos/sin tables gathered
    "vit_medium_patch16_gap_256": "size_weighted",  # average pooling weighted by size
    "vit_base_patch16_reg4_gap_256": "size_weighted",  # register tokens protected, avg pooling
    "vit_small_patch14_reg4_dinov2": None,  # CLS + 4 registers protected, layer scale
    "deit3_small_patch16_224": None,  # layer scale
    "vit_base_patch16_siglip_224": "tc_pool0/prop_attn",  # attention-pool head gets proportional attention
    "vit_base_patch16_dinov3": "position_term",  # rotary tables over the tokens after CLS + registers
}


@pytest.mark.parametrize("method", ["tome", "topk"])
@pytest.mark.parametrize("name", list(TIMM))
def test_timm_family(tmp_path_factory, tmp_path, name, method):
    model = export_zoo(tmp_path_factory, "timm", name)
    _, compressed = compress_and_validate(model, tmp_path / "c.onnx", method, **METHODS[method])
    if TIMM[name]:
        assert has_node(compressed, TIMM[name]), TIMM[name]


def test_register_tokens_are_protected(tmp_path_factory, tmp_path):
    model = export_zoo(tmp_path_factory, "timm", "vit_small_patch14_reg4_dinov2")
    # 16 patches + CLS + 4 registers: ToMe may merge at most half of the 16 unprotected tokens
    with pytest.raises(UsageError, match="5 protected"):
        compress.compress_file(model, tmp_path / "c.onnx", method="tome", r="9")
    schedule = compress.compress_file(model, tmp_path / "c.onnx", method="tome", r="8")
    assert schedule[0]["in"] == 21 and schedule[0]["out"] == 21 - 8


@pytest.mark.parametrize("name, message", [
    ("swin_tiny_patch4_window7_224", "global self-attention"),
    ("convnext_atto", "global self-attention"),
])
def test_models_without_global_attention_are_refused(tmp_path_factory, tmp_path, name, message):
    from tests.conftest import assert_usage_error, run_cli

    model = export_zoo(tmp_path_factory, "timm", name)
    result = run_cli("compress", model, "-o", tmp_path / "c.onnx", "--method", "tome", "--r", "2")
    assert_usage_error(result)
    assert message in result.stderr
    assert not (tmp_path / "c.onnx").exists()
    with pytest.raises(UsageError, match=message):
        compress.compress_file(model, tmp_path / "c2.onnx", method="tome", r="2")
