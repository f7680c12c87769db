"""`genai_config.json` beside an exported decoder, so onnxruntime-genai (PyPI) runs the same file.

onnxruntime-genai finds a model by a directory holding `genai_config.json`: the decoder's file name, its I/O
names (per-layer names as `%d` templates), the attention shape it allocates the cache from, the special token
ids, and the search defaults; and the tokenizer files its tokenizer reads (tokenizer.json, tokenizer_config.json).
The fields are those its model builder writes (onnxruntime_genai/models/builders/base.py, make_genai_config).

Written only where genai's cache model fits the graph: one cache per layer that grows by the new tokens each step
(`past_present_share_buffer` false: present = past + new, fed back as the next past). A graph with sliding-window
layers (Mistral or Phi-3 with a window, Gemma-2/3's local layers) returns those layers' caches cut to the window,
so its layers' caches differ in length; genai would feed them back as if they had grown; it gets no config.

GPT-2 is written as genai's generic type "decoder": genai's "gpt2" type expects GPT-2's old combined past
(`past_%d`, key and value stacked), not the separate key/value inputs tcexport's graph has.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tcexport.core.atomic import atomic_file

FILENAME = "genai_config.json"
# model_type -> genai's model type, where they differ
GENAI_TYPES = {"gpt2": "decoder"}


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def windowed_layers(config) -> list[int]:
    """The layers whose cache transformers keeps to a sliding window (DynamicCache's own reading of the config)."""
    from transformers import DynamicCache

    return [i for i, sliding in enumerate(DynamicCache(config=text_config(config)).is_sliding) if sliding]


def genai_config(config, shape, filename: str) -> dict:
    """The genai_config.json of a decoder graph file `filename` (tcexport's I/O names) for a transformers
    `config` and its DecoderShape."""
    text = text_config(config)
    eos = list(shape.eos_token_ids)
    pad = shape.pad_token_id if shape.pad_token_id is not None else (eos[0] if eos else 0)
    model = {
        "bos_token_id": shape.bos_token_id if shape.bos_token_id is not None else (eos[0] if eos else 0),
        "context_length": shape.context,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": filename,
            "head_size": shape.head_dim,
            "hidden_size": int(text.hidden_size),
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
            "num_attention_heads": int(text.num_attention_heads),
            "num_hidden_layers": shape.layers,
            "num_key_value_heads": shape.kv_heads,
        },
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": pad,
        "type": GENAI_TYPES.get(shape.model_type, shape.model_type),
        "vocab_size": shape.vocab_size,
    }
    search = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
              "max_length": shape.context, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    return {"model": model, "search": search}


def write(model_path: Path, config, shape, tokenizer) -> tuple[list[Path], str | None]:
    """Write genai_config.json (and `tokenizer`'s files, when there is one) beside `model_path`.

    Returns (paths written, why nothing was written or None). Each file is written under a temporary name and
    renamed into place."""
    model_path = Path(model_path)
    windowed = windowed_layers(config)
    if windowed:
        why = (f"no {FILENAME}: layers {', '.join(map(str, windowed))} keep a sliding-window cache "
               "(onnxruntime-genai grows every layer's cache alike)")
        if _describes(model_path.parent / FILENAME, model_path.name):  # an earlier export's, for the file replaced
            (model_path.parent / FILENAME).unlink()
            why += f"; removed the earlier {FILENAME} that named {model_path.name}"
        return [], why
    directory = model_path.parent
    written = []
    if tokenizer is not None:
        with tempfile.TemporaryDirectory(prefix=".tokenizer.", dir=directory) as tmp:
            for name in tokenizer.save_pretrained(tmp):
                source = Path(name)
                if source.is_file():
                    with atomic_file(directory / source.name) as target:
                        shutil.copyfile(source, target)
                    written.append(directory / source.name)
    with atomic_file(directory / FILENAME) as target:
        target.write_text(json.dumps(genai_config(config, shape, model_path.name), indent=4) + os.linesep)
    written.append(directory / FILENAME)
    return written, None


def _describes(config_file: Path, filename: str) -> bool:
    try:
        return json.loads(config_file.read_text())["model"]["decoder"]["filename"] == filename
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_for(source, model_path: Path) -> list[Path]:
    """After a decoder export: genai_config.json and the model's tokenizer files beside `model_path`, or nothing
    (with the reason on the progress line) when the graph's layers keep caches of different kinds."""
    from tcexport.core import progress
    from tcexport.models import causal

    shape = causal.DecoderShape.from_json(source.info["decoder"])
    config = source.model.model.config
    with progress.step(f"write {FILENAME} for onnxruntime-genai") as step:
        tokenizer = None
        if not windowed_layers(config):
            location = causal.Location(Path(source.info["tokenizer"]), source.info.get("gguf_file"))
            tokenizer = causal.load_tokenizer(location)
        written, skipped = write(model_path, config, shape, tokenizer)
        step.note(skipped or ", ".join(path.name for path in written))
    return written
