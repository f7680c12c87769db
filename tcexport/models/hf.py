"""Hugging Face transformers models by modality: which input they take, how big, and what to export.

The modality comes from the model's `main_input_name`, not from its class, so any encoder of a known
modality works without a per-model table:
    input_ids        text     input_ids + attention_mask [batch, --seq-len]
    pixel_values     vision   [batch, num_channels, image_size, image_size] from the config (--input-shape CxHxW)
    input_features   speech   log-mel spectrogram [batch, num_mel_bins, 2 * max_source_positions] (Whisper)
    input_values     speech   raw audio [batch, samples] (Wav2Vec2, HuBERT; --input-shape N), or a spectrogram
                              [batch, max_length, num_mel_bins] when the config has both (AST; --input-shape TxF)
ViTMAE runs with its patches in their own order (fixed noise 0, 1, ..., N-1 instead of a random shuffle each
call); its config must keep every patch (mask_ratio 0).
Encoder-decoder models (Whisper, T5, BART) export their encoder alone: token compression applies to its tokens.
(Feeding a speech model the text inputs, as tcexport once did because their configs have a vocab_size, is what
made torch.export fail on Whisper and Wav2Vec2; with their own inputs the dynamo exporter handles both.)
"""

from __future__ import annotations

import torch

from tcexport.core.errors import UsageError
from tcexport.models.inputs import ATTENTION_MASK, FLOAT, TOKEN_IDS, InputSpec
from tcexport.models.spec_check import parse_shape

MODALITIES = {"input_ids": "text", "pixel_values": "vision", "input_features": "speech", "input_values": "speech"}
DEFAULT_SEQ_LEN = 128
DEFAULT_AUDIO_SAMPLES = 16000  # one second at the 16 kHz that Wav2Vec2/HuBERT feature extractors use


class LastHiddenState(torch.nn.Module):
    """A transformers text model called with (input_ids, attention_mask), returning last_hidden_state."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class SingleInputHiddenState(torch.nn.Module):
    """A vision or speech encoder called with its one main input, returning last_hidden_state.

    `identity_noise` (ViTMAE): the model shuffles its patches by argsort(noise) and draws the noise at random
    when none is given; noise 0, 1, ..., N-1 keeps them in order, the same on every call."""

    def __init__(self, model: torch.nn.Module, input_name: str, identity_noise: int = 0, **call_kwargs):
        super().__init__()
        self.model = model
        self.input_name = input_name
        self.identity_noise = identity_noise
        self.call_kwargs = call_kwargs

    def forward(self, features):
        call = dict(self.call_kwargs)
        if self.identity_noise:
            order = torch.arange(self.identity_noise, dtype=torch.float32, device=features.device)
            call["noise"] = order[None].expand(features.shape[0], -1)
        return self.model(**{self.input_name: features}, **call).last_hidden_state


def model_class(path_or_id: str):
    """AutoModel, or the encoder-only class the directory was saved from (`architectures`: T5EncoderModel and the
    like), which AutoModel would replace by the whole encoder-decoder (T5Model, with a decoder it has no weights
    for and a forward that wants decoder inputs)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path_or_id)
    named = (getattr(config, "architectures", None) or [""])[0]
    if named.endswith("EncoderModel") and isinstance(getattr(transformers, named, None), type):
        return getattr(transformers, named)
    return transformers.AutoModel


def modality(model: torch.nn.Module) -> str:
    name = getattr(model, "main_input_name", "input_ids")
    if name not in MODALITIES:
        raise UsageError(f"{type(model).__name__} takes '{name}'; tcexport exports models whose main input is "
                         f"one of {', '.join(MODALITIES)}")
    return MODALITIES[name]


def encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The part that holds the tokens: the encoder of an encoder-decoder model, else the model itself."""
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        return model.get_encoder()
    return model


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _shape_option(text: str, dims: int, example: str) -> tuple[int, ...]:
    shape = parse_shape(text)
    if len(shape) != dims:
        raise UsageError(f"--input-shape for this model is {example}, got '{text}'")
    return shape


def is_patch_spectrogram(model: torch.nn.Module) -> bool:
    """An input_values model that takes a spectrogram in patches (AST), not raw audio: its config sizes both axes."""
    config = getattr(model, "config", None)
    return (getattr(model, "main_input_name", None) == "input_values" and hasattr(config, "num_mel_bins")
            and hasattr(config, "max_length"))


def refuse_options(kind: str, seq_len: int | None, input_shape: str | None, hint: str | None = None) -> None:
    """An option that does not apply to the modality is an error, not silently ignored. `hint`: the
    --input-shape form of the model, where it is not its modality's usual one."""
    if kind != "text" and seq_len:
        hint = hint or ("--input-shape CxHxW" if kind == "vision" else "--input-shape N (raw audio samples)")
        raise UsageError(f"--seq-len applies to text models; this is a {kind} model (use {hint} for its input size)")
    if kind == "text" and input_shape:
        raise UsageError("--input-shape applies to vision and speech models; use --seq-len N for a text model")


def text_inputs(vocab_size: int, seq_len: int) -> list[InputSpec]:
    return [InputSpec("input_ids", ["batch", seq_len], "int64", TOKEN_IDS, high=vocab_size),
            InputSpec("attention_mask", ["batch", seq_len], "int64", ATTENTION_MASK)]


def wrap(model: torch.nn.Module, seq_len: int | None,
         input_shape: str | None) -> tuple[torch.nn.Module, list[InputSpec], dict]:
    """The module to export, its input specs and what info records about the modality."""
    kind = modality(model)
    encoder = encoder_of(model)
    spectrogram_patches = is_patch_spectrogram(encoder)
    refuse_options(kind, seq_len, input_shape,
                   "--input-shape TxF (frames x mel bins)" if spectrogram_patches else None)
    config = model.config
    if kind == "text":
        length = seq_len or DEFAULT_SEQ_LEN
        limit = getattr(config, "max_position_embeddings", None)
        if limit and length > limit:
            raise UsageError(f"--seq-len {length} is longer than the model's max_position_embeddings {limit}")
        info = {"modality": kind, **({"encoder_only": True} if encoder is not model else {})}
        return LastHiddenState(encoder), text_inputs(config.vocab_size, length), info
    if kind == "vision":
        return _vision(encoder, config, input_shape)
    if encoder.main_input_name == "input_features":
        return _spectrogram(encoder, config, input_shape)
    if spectrogram_patches:
        return _patch_spectrogram(encoder, config, input_shape)
    return _raw_audio(encoder, input_shape)


def _vision(model, config, input_shape):
    channels = int(getattr(config, "num_channels", 3))
    height, width = _pair(getattr(config, "image_size", 224))
    call = {}
    if input_shape:
        channels, height, width = _shape_option(input_shape, 3, "CxHxW")
        if (height, width) != _pair(getattr(config, "image_size", 224)) and _takes(model, "interpolate_pos_encoding"):
            call["interpolate_pos_encoding"] = True  # position embeddings were learned for the config's size
    patch = _pair(getattr(config, "patch_size", 16))
    if height % patch[0] or width % patch[1]:
        raise UsageError(f"image size {height}x{width} is not a multiple of the patch size {patch[0]}x{patch[1]}")
    spec = InputSpec("pixel_values", ["batch", channels, height, width], "float32", FLOAT)
    grid = [height // patch[0], width // patch[1]]
    info = {"modality": "vision", "patch_grid": grid}
    if "noise" in _parameters(model) and hasattr(config, "mask_ratio"):  # ViTMAE: patches shuffled by noise
        if float(config.mask_ratio) != 0:
            raise UsageError(f"{type(model).__name__} has mask_ratio {config.mask_ratio}: it keeps a random "
                             f"{1 - float(config.mask_ratio):.0%} of the patches on every call, so no export can "
                             "match it; save its config with mask_ratio 0.0 to export the encoder over every patch")
        call["identity_noise"] = grid[0] * grid[1]
    return SingleInputHiddenState(model, "pixel_values", **call), [spec], info


def _spectrogram(model, config, input_shape):
    mel_bins = int(config.num_mel_bins)
    frames = 2 * int(config.max_source_positions)  # the encoder's two convs halve it to max_source_positions
    if input_shape and _shape_option(input_shape, 2, "MELSxFRAMES") != (mel_bins, frames):
        raise UsageError(f"this Whisper encoder takes input_features of exactly {mel_bins}x{frames} "
                         f"(num_mel_bins x 2*max_source_positions), got --input-shape {input_shape}")
    spec = InputSpec("input_features", ["batch", mel_bins, frames], "float32", FLOAT)
    return SingleInputHiddenState(model, "input_features"), [spec], {"modality": "speech", "encoder_only": True}


def _patch_spectrogram(model, config, input_shape):
    """AST: input_values [batch, max_length frames, num_mel_bins], cut into patch_size squares at
    (frequency_stride, time_stride); its position embeddings fix both sizes. Tokens: CLS, distillation, then
    the patches frequency-major (patch_grid [frequency, time])."""
    frames, mel_bins = int(config.max_length), int(config.num_mel_bins)
    if input_shape and _shape_option(input_shape, 2, "TxF (frames x mel bins)") != (frames, mel_bins):
        raise UsageError(f"this {type(model).__name__} takes input_values of exactly {frames}x{mel_bins} "
                         f"(max_length x num_mel_bins: its position embeddings fix both), got --input-shape "
                         f"{input_shape}")
    patch = int(config.patch_size)
    grid = [(mel_bins - patch) // int(config.frequency_stride) + 1, (frames - patch) // int(config.time_stride) + 1]
    spec = InputSpec("input_values", ["batch", frames, mel_bins], "float32", FLOAT)
    return SingleInputHiddenState(model, "input_values"), [spec], {"modality": "speech", "patch_grid": grid}


def _raw_audio(model, input_shape):
    samples = _shape_option(input_shape, 1, "N (samples)")[0] if input_shape else DEFAULT_AUDIO_SAMPLES
    spec = InputSpec("input_values", ["batch", samples], "float32", FLOAT)
    return SingleInputHiddenState(model, "input_values"), [spec], {"modality": "speech"}


def _takes(model: torch.nn.Module, argument: str) -> bool:
    return argument in _parameters(model)


def _parameters(model: torch.nn.Module):
    import inspect

    return inspect.signature(model.forward).parameters


@torch.no_grad()
def token_count(wrapped: torch.nn.Module, inputs: list[InputSpec]) -> int:
    """Tokens in last_hidden_state at the exported input size (one run at batch 1)."""
    from tcexport.models.inputs import random_feeds

    feeds = random_feeds(inputs, 1)
    return int(wrapped(*(torch.from_numpy(feeds[s.name]) for s in inputs)).shape[1])


def prefix_tokens(tokens: int, info: dict) -> int:
    """Tokens before the patches (CLS, distillation, registers; 0 for SigLIP): tokens minus the patch count.

    1 for text (CLS or <s>), 0 for speech (every token is a frame) unless it is cut in patches (AST: CLS and
    distillation)."""
    if info["modality"] == "text":
        return 1
    if "patch_grid" not in info:
        return 0
    rows, cols = info["patch_grid"]
    return tokens - rows * cols
