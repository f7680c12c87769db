"""Every model family loads and exports: the tiny zoo, seeded init that exercises every path, --model-arg."""

from __future__ import annotations

import pytest
import torch

from tcexport import init, sources, zoo
from tcexport.errors import UsageError
from tests.conftest import assert_usage_error, run_cli

LAYER_SCALED = ("beit_base_patch16_224", "deit3_small_patch16_224", "vit_small_patch14_reg4_dinov2",
                "vit_medium_patch16_gap_256")


@pytest.fixture(scope="module")
def zoo_root(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def _timm(name: str, seed: int | None = None) -> sources.Source:
    return sources.load(f"timm:{name}", seed=seed, model_args=zoo.timm_model_args(name))


def _layer_scales(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for m in model.modules() for n, p in m.named_parameters(recurse=False) if init.is_layer_scale(m, n, p)]


# ---------------------------------------------------------------------------------------------- seeded init


@pytest.mark.parametrize("name", LAYER_SCALED)
def test_seeded_timm_layer_scale_is_drawn_from_half_to_one(name):
    source = _timm(name)
    scales = _layer_scales(source.model)
    assert len(scales) == 2 * zoo.TIMM[name]["depth"]
    values = torch.cat([s.detach().flatten() for s in scales])
    assert values.min() >= 0.5 and values.max() <= 1.0
    assert values.std() > 0.05  # drawn, not a constant


def test_seeded_init_is_reproducible_and_depends_on_the_seed():
    first, again, other = _timm("beit_base_patch16_224", 3), _timm("beit_base_patch16_224", 3), _timm(
        "beit_base_patch16_224", 4)
    assert first.weights["sha256"] == again.weights["sha256"]
    assert first.weights["sha256"] != other.weights["sha256"]
    rebuilt = sources.load_from_record(first.record())
    assert rebuilt.weights["sha256"] == first.weights["sha256"]


def test_zero_position_bias_tables_get_random_values():
    source = _timm("beit_base_patch16_224")
    tables = [p for n, p in source.model.named_parameters() if "relative_position_bias_table" in n]
    assert len(tables) == zoo.TIMM["beit_base_patch16_224"]["depth"]
    assert all(t.abs().mean() > 0.1 for t in tables)


def test_checkpoint_weights_are_left_as_given(tmp_path):
    import timm

    model = timm.create_model("deit3_small_patch16_224", **zoo.TIMM["deit3_small_patch16_224"])
    path = tmp_path / "deit3.pth"
    torch.save(model.state_dict(), path)
    loaded = sources.load("timm:deit3_small_patch16_224", checkpoint=path,
                          model_args=zoo.timm_model_args("deit3_small_patch16_224"))
    for scale in _layer_scales(loaded.model):
        assert scale.abs().max() < 1e-3  # timm's own init (1e-5), not redrawn


def test_exercise_draws_shared_parameters_once():
    shared = torch.nn.Linear(4, 4)

    class LayerScale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gamma = torch.nn.Parameter(torch.full((4,), 1e-5))

    scale = LayerScale()
    model = torch.nn.Sequential(shared, scale, shared, scale)
    counts = init.exercise(model, 0)
    assert counts == {"layer_scale": 1, "position_bias": 0}
    assert 0.5 <= float(scale.gamma.detach().min()) and float(scale.gamma.detach().max()) <= 1.0


# ---------------------------------------------------------------------------------------------- --model-arg


def test_model_arg_values_parse_to_python_types():
    parsed = sources.parse_model_args(["depth=2", "mlp_ratio=2.5", "qkv_bias=false", "img_size=32,48",
                                       "global_pool=map", "init_values=none"])
    assert parsed == {"depth": 2, "mlp_ratio": 2.5, "qkv_bias": False, "img_size": (32, 48), "global_pool": "map",
                      "init_values": None}
    assert sources.parse_model_args({"img_size": [32, 48]}) == {"img_size": (32, 48)}  # as read back from JSON


def test_model_args_make_a_tiny_timm_model_and_are_recorded():
    source = _timm("vit_tiny_patch16_224")
    assert source.inputs[0].shape == ["batch", 3, zoo.IMAGE, zoo.IMAGE]
    assert len(source.model.blocks) == zoo.TIMM["vit_tiny_patch16_224"]["depth"]
    assert source.options["model_args"]["embed_dim"] == 64
    rebuilt = sources.load_from_record(source.record())
    assert rebuilt.weights["sha256"] == source.weights["sha256"]
    assert rebuilt.inputs[0].shape == source.inputs[0].shape


def test_bad_model_args_are_usage_errors():
    with pytest.raises(UsageError, match="key=value"):
        sources.load("timm:vit_tiny_patch16_224", model_args=["depth"])
    with pytest.raises(UsageError, match="not_a_kwarg"):
        sources.load("timm:vit_tiny_patch16_224", model_args=["not_a_kwarg=1"])
    with pytest.raises(UsageError, match="not both"):
        sources.load("timm:vit_tiny_patch16_224", model_args=["img_size=32"], input_shape="3x64x64")


def test_model_arg_on_the_cli(tmp_path):
    output = tmp_path / "vit.onnx"
    args = [a for item in zoo.timm_model_args("vit_tiny_patch16_224") for a in ("--model-arg", item)]
    result = run_cli("export", "timm:vit_tiny_patch16_224", *args, "-o", output)
    assert result.returncode == 0, result.stderr
    import onnx

    graph_input = onnx.load(output).graph.input[0]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim][1:] == [3, zoo.IMAGE, zoo.IMAGE]
    bad = run_cli("export", "timm:vit_tiny_patch16_224", "--model-arg", "embed_dim", "-o", tmp_path / "bad.onnx")
    assert_usage_error(bad)
    assert not (tmp_path / "bad.onnx").exists()
