"""Prompts as token ids: the model's own tokenizer (found from the graph's provenance), or ids given directly."""

from __future__ import annotations

from pathlib import Path

from tcexport.core.errors import UsageError


def tokenizer_for(record: dict):
    """The tokenizer of the model a decoder graph was exported from; None when it has none."""
    from tcexport.models import causal

    info = record.get("info", {})
    directory = info.get("tokenizer")
    if not directory or not Path(directory).is_dir():
        return None
    from tcexport.models.sources import _quiet_transformers

    _quiet_transformers()
    return causal.load_tokenizer(causal.Location(Path(directory), info.get("gguf_file")))


def parse_ids(text: str, vocab_size: int) -> list[int]:
    """'1,2,3' -> [1, 2, 3], each a token id of the vocabulary."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--prompt-ids must be comma-separated token ids, got '{text}'") from None
    if not ids:
        raise UsageError("--prompt-ids is empty; give at least one token id")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise UsageError(f"--prompt-ids holds {bad[0]}, outside the vocabulary (0..{vocab_size - 1})")
    return ids


def encode(tokenizer, text: str, chat: bool) -> list[int]:
    """The ids the model's tokenizer gives `text` (its default special tokens), or its chat template's with `chat`."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("--chat: this model's tokenizer has no chat template; drop --chat")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return [int(i) for i in ids]
    return [int(i) for i in tokenizer(text)["input_ids"]]


def prompt_ids(record: dict, vocab_size: int, texts: tuple[str, ...], ids_texts: tuple[str, ...], chat: bool,
               tokenizer=None) -> list[list[int]]:
    """Every prompt of a generate call as ids (texts through the tokenizer, --prompt-ids as given)."""
    if not texts and not ids_texts:
        raise UsageError("give a prompt: --prompt TEXT or --prompt-ids 1,2,3")
    if texts and ids_texts:
        raise UsageError("give --prompt or --prompt-ids, not both")
    if chat and not texts:
        raise UsageError("--chat applies to --prompt TEXT")
    if ids_texts:
        return [parse_ids(text, vocab_size) for text in ids_texts]
    if tokenizer is None:
        raise UsageError("this model was exported without a tokenizer; give the prompt as --prompt-ids 1,2,3")
    prompts = [encode(tokenizer, text, chat) for text in texts]
    if any(not p for p in prompts):
        raise UsageError("a --prompt is empty after tokenizing; give some text")
    return prompts
