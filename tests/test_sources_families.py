"""Every model family loads and exports: the tiny zoo, seeded init that exercises every path, --model-arg."""

from __future__ import annotations

import pytest
import torch

from tcexport.models import seeded_init as init
from tcexport.models import sources
from tcexport.models import zoo
from tcexport.core.errors import UsageError
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


def test_zero_position_bias_tables_get_random_values():  # BEiT starts them at exactly zero
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


# ---------------------------------------------------------------------------------------------- export by family

# Tokens before the patches, as each architecture defines them (CLS, DeiT's distillation token, registers).
VISION_PREFIX = {"vit": 1, "deit": 2, "clip_vision": 1, "siglip_vision": 0, "dinov2": 1, "dinov2_registers": 5,
                 "vit_mae": 1}
# Options that keep every family tiny: short text, short raw audio (the default is one second).
TINY_OPTIONS = {**{k: {"seq_len": 16} for k in zoo.TEXT_KINDS}, "wav2vec2": {"input_shape": str(zoo.AUDIO_SAMPLES)},
                "hubert": {"input_shape": str(zoo.AUDIO_SAMPLES)}}


def _export_and_count_blocks(source: sources.Source, path) -> int:
    """Export (which checks ONNX Runtime against PyTorch at batch 1 and 3) and find the attention blocks."""
    import onnx
    import onnx_ir as ir

    from tcexport.export import exporter as export
    from tcexport.graph.blocks import find_blocks

    report = export.export_to_file(source, path)
    assert report.passed and len(report.rows) == 2 * len(source.outputs)
    for row in report.rows:  # outputs of random models can be tiny: hold them to a relative standard too
        assert row["cosine"] > 0.99999, row
    from tcexport.graph.probe import concrete_shapes

    # with the run-time shapes, as compress finds them: pooling attentions (SigLIP's MAP head) are not blocks
    return len(find_blocks(ir.load(path).graph, concrete_shapes(onnx.load(str(path)))))


# ALBERT: one shared layer, a block per Softmax all the same. The structures compress refuses are
# tests/test_families_structures.py's (Longformer and block-sparse BigBird do not export with dynamo at all).
@pytest.mark.parametrize("kind", [k for k in zoo.HF_KINDS if k not in zoo.HF_REFUSED])
def test_hf_kind_exports_and_has_one_block_per_layer(kind, zoo_root, tmp_path):
    source = sources.load(f"hf:{zoo.hf_dir(kind, zoo_root)}", **TINY_OPTIONS.get(kind, {}))
    assert source.outputs == ["last_hidden_state"]
    assert source.info["depth"] == zoo.LAYERS
    assert _export_and_count_blocks(source, tmp_path / f"{kind}.onnx") == zoo.LAYERS


@pytest.mark.parametrize("kind", zoo.VISION_KINDS)
def test_hf_vision_inputs_and_prefix_tokens_come_from_the_config(kind, zoo_root):
    source = sources.load(f"hf:{zoo.hf_dir(kind, zoo_root)}")
    assert [s.name for s in source.inputs] == ["pixel_values"]
    assert source.inputs[0].shape == ["batch", 3, zoo.IMAGE, zoo.IMAGE]
    patches = (zoo.IMAGE // zoo.PATCH) ** 2
    assert source.info["modality"] == "vision"
    assert source.info["num_prefix_tokens"] == VISION_PREFIX[kind]
    assert source.info["tokens"] == patches + VISION_PREFIX[kind]
    with torch.no_grad():
        assert source.model(*source.example_inputs(2)).shape == (2, patches + VISION_PREFIX[kind], zoo.WIDTH)


def test_hf_vision_input_shape_overrides_the_config(zoo_root):
    source = sources.load(f"hf:{zoo.hf_dir('vit', zoo_root)}", input_shape="3x48x48")
    assert source.inputs[0].shape == ["batch", 3, 48, 48]
    assert source.info["tokens"] == (48 // zoo.PATCH) ** 2 + 1  # position embeddings interpolated
    assert sources.load_from_record(source.record()).inputs[0].shape == ["batch", 3, 48, 48]


def test_hf_whisper_exports_its_encoder_alone(zoo_root):
    source = sources.load(f"hf:{zoo.hf_dir('whisper', zoo_root)}")
    assert type(source.model.model).__name__ == "WhisperEncoder"
    assert source.inputs[0].name == "input_features"
    assert source.inputs[0].shape == ["batch", 8, 2 * zoo.WHISPER_POSITIONS]
    assert source.info | {"modality": "speech", "num_prefix_tokens": 0, "tokens": zoo.WHISPER_POSITIONS} == source.info


def test_hf_raw_audio_length_is_the_input_shape(zoo_root):
    source = sources.load(f"hf:{zoo.hf_dir('wav2vec2', zoo_root)}", input_shape="1600")
    assert source.inputs[0].name == "input_values" and source.inputs[0].shape == ["batch", 1600]
    shorter = sources.load(f"hf:{zoo.hf_dir('wav2vec2', zoo_root)}", input_shape="800")
    assert shorter.info["tokens"] < source.info["tokens"]
    assert source.info["num_prefix_tokens"] == 0


@pytest.mark.parametrize("kind, options, message", [
    ("vit", {"seq_len": 16}, "--seq-len applies to text models"),
    ("wav2vec2", {"seq_len": 16}, "--seq-len applies to text models"),
    ("bert", {"input_shape": "3x32x32"}, "--input-shape applies to vision and speech"),
    ("bert", {"seq_len": 1000}, "max_position_embeddings"),
    ("vit", {"input_shape": "3x30x30"}, "multiple of the patch size"),
    ("whisper", {"input_shape": "8x40"}, "exactly 8x32"),
    ("wav2vec2", {"input_shape": "3"}, "does not run on inputs"),
    ("ast", {"seq_len": 16}, r"use --input-shape TxF \(frames x mel bins\)"),
    ("ast", {"input_shape": "16000"}, "TxF"),
    ("ast", {"input_shape": "64x16"}, f"exactly {zoo.AST_FRAMES}x{zoo.AST_MEL_BINS}"),
])
def test_hf_options_that_do_not_apply_are_usage_errors(kind, options, message, zoo_root):
    with pytest.raises(UsageError, match=message):
        sources.load(f"hf:{zoo.hf_dir(kind, zoo_root)}", **options)


def test_no_traceback_from_broken_hf_directories(tmp_path, zoo_root):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "no_such_architecture"}')
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((zoo.hf_dir("vit", zoo_root) / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    for directory in (unknown, corrupt, tmp_path):
        result = run_cli("export", f"hf:{directory}", "-o", tmp_path / "out.onnx")
        assert_usage_error(result)
        assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("name", [n for n in zoo.TIMM if n not in zoo.TIMM_REFUSED])  # SigLIP: its MAP head is no block
def test_timm_tiny_variant_exports_and_has_one_block_per_layer(name, tmp_path):
    source = _timm(name)
    assert _export_and_count_blocks(source, tmp_path / f"{name}.onnx") == zoo.TIMM[name]["depth"]


@pytest.mark.parametrize("name", zoo.TIMM_REFUSED)
def test_timm_models_without_global_attention_still_export(name, tmp_path):
    from tcexport.export import exporter as export

    assert export.export_to_file(_timm(name), tmp_path / f"{name}.onnx").passed  # compress is what refuses them


@pytest.mark.parametrize("kind", zoo.ST_KINDS)
def test_st_kind_exports_the_pipeline_and_has_one_block_per_layer(kind, zoo_root, tmp_path):
    source = sources.load(f"st:{zoo.st_dir(kind, zoo_root)}", seq_len=16)
    assert source.outputs == ["sentence_embedding"]
    with torch.no_grad():
        embedding = source.model(*source.example_inputs(2))
    assert torch.allclose(embedding.norm(dim=-1), torch.ones(2), atol=1e-5)  # the Normalize module is in
    assert _export_and_count_blocks(source, tmp_path / f"{kind}.onnx") == zoo.LAYERS


def test_recipe_model_args_reach_the_loader(tmp_path):
    from tcexport.recipes import loading

    path = tmp_path / "tiny.yaml"
    path.write_text("model:\n  spec: timm:vit_tiny_patch16_224\n  model_args: {img_size: [32, 32], depth: 2}\n")
    assert loading.load(path).model.model_args == {"img_size": [32, 32], "depth": 2}
    onnx_spec = tmp_path / "onnx.yaml"
    onnx_spec.write_text("model:\n  spec: model.onnx\n  model_args: {depth: 2}\n")
    with pytest.raises(UsageError, match="model_args"):
        loading.load(onnx_spec)


def test_zoo_directories_are_reproducible_and_exercise_layer_scale(tmp_path):
    first = sources.load(f"hf:{zoo.hf_dir('dinov2', tmp_path / 'a')}")
    again = sources.load(f"hf:{zoo.hf_dir('dinov2', tmp_path / 'b')}")
    assert first.weights["sha256"] == again.weights["sha256"]
    scales = _layer_scales(first.model)
    assert len(scales) == 2 * zoo.LAYERS  # Dinov2LayerScale.lambda1 after attention and after the MLP
    values = torch.cat([s.detach().flatten() for s in scales])
    assert values.min() >= 0.5 and values.max() <= 1.0


def test_hf_text_encoder_decoder_exports_its_encoder(tmp_path):
    from transformers import T5Config, T5Model

    torch.manual_seed(0)
    T5Model(T5Config(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)).save_pretrained(
        tmp_path / "t5")
    source = sources.load(f"hf:{tmp_path / 't5'}", seq_len=8)
    assert source.info["encoder_only"] and source.info["tokens"] == 8
    with torch.no_grad():
        assert source.model(*source.example_inputs(2)).shape == (2, 8, 32)


def test_hf_t5_encoder_model_directory_exports_as_itself(zoo_root):
    """A T5EncoderModel directory loads as T5EncoderModel with its saved weights (AutoModel would build a T5Model
    around them, with a random decoder and a forward that wants decoder inputs); a T5Model's encoder is its stack."""
    import transformers

    directory = zoo.hf_dir('t5_encoder', zoo_root)
    encoder_only = sources.load(f"hf:{directory}", seq_len=16)
    assert type(encoder_only.model.model).__name__ == "T5EncoderModel"
    assert "encoder_only" not in encoder_only.info and encoder_only.info["tokens"] == 16
    saved = transformers.T5EncoderModel.from_pretrained(directory).eval()
    inputs = encoder_only.example_inputs(2)
    with torch.no_grad():
        assert torch.allclose(encoder_only.model(*inputs), saved(*inputs).last_hidden_state, atol=1e-6)
    whole = sources.load(f"hf:{zoo.hf_dir('t5', zoo_root)}", seq_len=16)
    assert type(whole.model.model).__name__ == "T5Stack" and whole.info["encoder_only"]


def test_hf_ast_takes_its_spectrogram_in_its_own_terms(zoo_root):
    """AST's input_values is [batch, frames, mel bins] (not raw audio); CLS + distillation token before the
    frequency-major patch grid."""
    source = sources.load(f"hf:{zoo.hf_dir('ast', zoo_root)}")
    assert [(s.name, s.shape) for s in source.inputs] == [("input_values", ["batch", zoo.AST_FRAMES,
                                                                            zoo.AST_MEL_BINS])]
    stride, patch = zoo.PATCH // 2, zoo.PATCH
    grid = [(zoo.AST_MEL_BINS - patch) // stride + 1, (zoo.AST_FRAMES - patch) // stride + 1]
    assert source.info["patch_grid"] == grid
    assert source.info["num_prefix_tokens"] == 2 and source.info["tokens"] == grid[0] * grid[1] + 2
    same = sources.load(f"hf:{zoo.hf_dir('ast', zoo_root)}", input_shape=f"{zoo.AST_FRAMES}x{zoo.AST_MEL_BINS}")
    assert same.inputs[0].shape == source.inputs[0].shape


def test_hf_vit_mae_keeps_every_patch_in_order(zoo_root, tmp_path):
    """ViTMAE shuffles its patches by argsort(noise), drawn at random when not given: the export passes noise
    0..N-1, so two calls agree and the tokens are the unshuffled patches; a config that masks patches is refused."""
    import transformers

    source = sources.load(f"hf:{zoo.hf_dir('vit_mae', zoo_root)}")
    inputs = source.example_inputs(2)
    model = source.model.model
    patches = (zoo.IMAGE // zoo.PATCH) ** 2
    with torch.no_grad():
        first, second = source.model(*inputs), source.model(*inputs)
        in_order = model(pixel_values=inputs[0], noise=torch.arange(patches, dtype=torch.float32).expand(2, -1))
        shuffled = model(pixel_values=inputs[0])  # its own random noise
    assert torch.equal(first, second) and torch.allclose(first, in_order.last_hidden_state, atol=1e-6)
    assert not torch.allclose(first, shuffled.last_hidden_state, atol=1e-3)
    config = zoo.hf_config("vit_mae")
    config.mask_ratio = 0.75
    transformers.ViTMAEModel(config).save_pretrained(tmp_path / "masking")
    with pytest.raises(UsageError, match="mask_ratio 0.75: it keeps a random 25% of the patches"):
        sources.load(f"hf:{tmp_path / 'masking'}")


def test_unknown_main_input_is_a_usage_error():
    from tcexport.models import hf as hf_models

    class TimeSeriesModel(torch.nn.Module):
        main_input_name = "past_values"

    with pytest.raises(UsageError, match="past_values"):
        hf_models.modality(TimeSeriesModel())


def test_faint_position_bias_embeddings_are_redrawn_too():
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(zoo.hf_config("mpnet"))
    bias = model.encoder.relative_attention_bias.weight
    assert bias.abs().max() <= init.FAINT  # transformers' init: N(0, 0.02^2), too faint to matter
    assert init.exercise(model, 0)["position_bias"] == 1
    assert bias.detach().std() > 0.3
