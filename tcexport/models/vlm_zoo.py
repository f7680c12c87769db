"""Tiny seeded vision-language models, one per VLM class tcexport is to export (issue 20), for tests.

    vlm_dir(kind, root)   saves (once, atomically) a tiny random `*ForConditionalGeneration` directory of `kind`
                          under `root`, with SmolLM2's tokenizer and its image token added

Each is a vision tower of 2 layers, 32 wide, on 32x32 images in 4x4 patches (an 8x8 grid, 64 patches), the
model's own connector, and an LLM of decoder_zoo's shape (2 layers, 64 wide, grouped-query attention, SmolLM2's
49152-token vocabulary plus the image token at id IMAGE_TOKEN):

    llava         CLIP tower (CLS + 64 patches; the LLM gets the second-to-last layer's 64 patch features),
                  2-layer MLP projector, Llama
    llava_siglip  SigLIP tower (no CLS; 64 patch features), MLP projector, Qwen2 (as LLaVA-OneVision pairs them)
    idefics3      SigLIP-style tower, pixel-shuffle connector (scale factor 2: 64 patches -> 16 tokens), Llama
                  (the Idefics3 / SmolVLM layout)

`image_tokens(kind)` is the count one image gives the LLM through the model's own connector (before any
compression). Weights follow decoder_zoo's rule: the classes' seeded init at a larger standard deviation, so
greedy tokens vary with the prompt and with the image (tests/test_vlm_zoo.py checks both).
"""

from __future__ import annotations

from pathlib import Path

from tcexport.models import decoder_zoo
from tcexport.models.seeded_init import exercise
from tcexport.models.zoo import SEED, _save_once

IMAGE_TOKEN = decoder_zoo.VOCAB  # the first id after SmolLM2's vocabulary: the tokenizer gets "<image>" there
IMAGE_TOKEN_TEXT = "<image>"
IMAGE_SIZE, PATCH = 32, 4
GRID = IMAGE_SIZE // PATCH  # 8x8 patches
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=IMAGE_SIZE, patch_size=PATCH)


def _text(kind: str) -> dict:
    """decoder_zoo's tiny LLM of `kind`, its vocabulary one larger for the image token."""
    config = decoder_zoo.decoder_config(kind).to_dict()
    config["vocab_size"] = decoder_zoo.VOCAB + 1
    return config


# kind -> (model class, how many image tokens one image gives the LLM)
VLMS: dict[str, tuple[str, int]] = {
    "llava": ("LlavaForConditionalGeneration", GRID * GRID),
    "llava_siglip": ("LlavaForConditionalGeneration", GRID * GRID),
    "idefics3": ("Idefics3ForConditionalGeneration", (GRID // 2) ** 2),
}
KINDS = tuple(VLMS)


def vlm_config(kind: str):
    import transformers

    if kind not in VLMS:
        raise KeyError(f"unknown VLM kind '{kind}'; choose one of {', '.join(KINDS)}")
    model_class = VLMS[kind][0]
    if kind == "llava":
        return transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(**VISION, projection_dim=32), text_config=_text("llama"),
            image_token_index=IMAGE_TOKEN, vision_feature_layer=-2, vision_feature_select_strategy="default",
            architectures=[model_class])
    if kind == "llava_siglip":
        return transformers.LlavaConfig(
            vision_config=transformers.SiglipVisionConfig(**VISION), text_config=_text("qwen2"),
            image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, vision_feature_select_strategy="full",
            architectures=[model_class])
    return transformers.Idefics3Config(vision_config=dict(VISION), text_config=_text("llama"), scale_factor=2,
                                       image_token_id=IMAGE_TOKEN, architectures=[model_class])


def image_tokens(kind: str) -> int:
    """Image tokens one image gives the LLM through the model's own connector."""
    return VLMS[kind][1]


def random_vlm(kind: str, seed: int = SEED):
    """The tiny VLM of `kind` with seeded weights (eager attention, eval mode)."""
    import torch
    import transformers

    config = vlm_config(kind)
    for part in (config.text_config, config.vision_config):
        part.initializer_range = decoder_zoo.INIT_STD
    if hasattr(config, "initializer_range"):
        config.initializer_range = decoder_zoo.INIT_STD
    torch.manual_seed(seed)
    model = getattr(transformers, VLMS[kind][0])._from_config(config, attn_implementation="eager").eval()
    exercise(model, seed)
    return model


def tokenizer_dir(root: Path) -> Path:
    """SmolLM2's tokenizer with "<image>" added as a special token at IMAGE_TOKEN."""

    def write(tmp: Path) -> None:
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(str(decoder_zoo.tokenizer_dir(root)))
        tokenizer.add_tokens([IMAGE_TOKEN_TEXT], special_tokens=True)
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN_TEXT) != IMAGE_TOKEN:
            raise RuntimeError(f"{IMAGE_TOKEN_TEXT} got id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN_TEXT)}, "
                               f"not {IMAGE_TOKEN}")
        tokenizer.save_pretrained(str(tmp))

    return _save_once(Path(root) / "smollm2-tokenizer-image", write)


def vlm_dir(kind: str, root: Path, seed: int = SEED) -> Path:
    """Save (once) the tiny VLM of `kind` with the image tokenizer under `root`; its path."""
    vlm_config(kind)  # an unknown kind fails before anything is written
    return decoder_zoo.save_with_tokenizer(Path(root) / f"vlm-{kind}-seed{seed}", lambda: random_vlm(kind, seed),
                                           lambda: tokenizer_dir(root))


def prompt_with_image(kind: str, before: list[int], after: list[int]) -> list[int]:
    """Token ids of a prompt with one image between `before` and `after`, the image token repeated for each of
    the image's tokens (the expanded form transformers' forward takes)."""
    return [*before, *[IMAGE_TOKEN] * image_tokens(kind), *after]
