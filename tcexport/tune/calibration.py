"""Calibration data as model feeds: an .npz of model inputs, a text file, or a folder of images.

A text file is tokenized with the model's own tokenizer (the path the export recorded in tcexport.source for st:
and hf: text models), padded/truncated to the exported sequence length. Paragraphs separated by blank lines are
one sample each; a file without blank lines has one sample per line. Images are resized to the model's input
size and normalized with the ImageNet mean/std (what timm and the transformers vision towers default to).

The samples are split once, with a fixed seed, into a search part and a held-out part that the search never sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tcexport.models import inputs as inputs_mod
from tcexport.core.errors import UsageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_SEED = 0


def kind_of(path: Path) -> str:
    """npz, text or images; checked before anything heavy loads."""
    path = Path(path)
    if path.is_dir():
        if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            raise UsageError(f"--data {path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return "images"
    if not path.is_file():
        raise UsageError(f"--data {path}: no such file or folder")
    if path.suffix.lower() == ".npz":
        return "npz"
    return "text"


def read_texts(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--data {path}: not a readable UTF-8 text file ({type(exc).__name__})") from None
    if "\n\n" in text.replace("\r\n", "\n"):
        samples = [" ".join(p.split()) for p in text.replace("\r\n", "\n").split("\n\n")]
    else:
        samples = [line.strip() for line in text.splitlines()]
    return [s for s in samples if s]


def load(path: Path, specs: list[inputs_mod.InputSpec], source: dict | None) -> dict[str, np.ndarray]:
    """Feeds for every model input, batch axis = samples."""
    path = Path(path)
    kind = kind_of(path)
    if kind == "npz":
        arrays = inputs_mod.read_npz(path, "--data")
        if not arrays or any(a.ndim == 0 or a.shape[0] == 0 for a in arrays.values()):
            raise UsageError(f"--data {path}: the .npz holds no samples")
        return inputs_mod.feeds_from_arrays(arrays, specs, f"--data {path}")
    if kind == "text":
        texts = read_texts(path)
        if not texts:
            raise UsageError(f"--data {path}: the file holds no text")
        return _tokenize(texts, specs, source, path)
    return _images(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), specs, path)


def _tokenize(texts: list[str], specs, source: dict | None, path: Path) -> dict[str, np.ndarray]:
    info = (source or {}).get("info", {})
    ids = [s for s in specs if s.kind == inputs_mod.TOKEN_IDS]
    if info.get("modality") != "text" or not info.get("tokenizer") or len(ids) != 1:
        raise UsageError(f"--data {path}: a text file needs a text model exported by tcexport from st: or hf: (its "
                         "tokenizer is recorded there); give an .npz of model inputs instead")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(info["tokenizer"])
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise UsageError(f"--data {path}: cannot load the model's tokenizer from {info['tokenizer']} "
                         f"({type(exc).__name__})") from None
    length = ids[0].concrete_shape(1)[1]
    encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="np")
    aliases = {inputs_mod.TOKEN_IDS: "input_ids", inputs_mod.ATTENTION_MASK: "attention_mask",
               inputs_mod.TOKEN_TYPE_IDS: "token_type_ids"}
    arrays = {}
    for spec in specs:
        key = spec.name if spec.name in encoded else aliases.get(spec.kind)
        if key in encoded:
            arrays[spec.name] = np.asarray(encoded[key])
        elif spec.kind == inputs_mod.TOKEN_TYPE_IDS:
            arrays[spec.name] = np.zeros_like(np.asarray(encoded["input_ids"]))
    return inputs_mod.feeds_from_arrays(arrays, specs, f"--data {path}")


def _images(files: list[Path], specs, path: Path) -> dict[str, np.ndarray]:
    floats = [s for s in specs if s.kind == inputs_mod.FLOAT]
    if len(specs) != 1 or len(floats) != 1 or len(floats[0].shape) != 4:
        raise UsageError(f"--data {path}: a folder of images fits a model with one image input [batch, C, H, W]; "
                         f"this one takes {', '.join(s.name for s in specs)}")
    from PIL import Image

    channels, height, width = floats[0].concrete_shape(1)[1:]
    if channels not in (1, 3):
        raise UsageError(f"--data {path}: the model takes {channels} channels; images give 1 or 3")
    mean = np.asarray(IMAGENET_MEAN if channels == 3 else IMAGENET_MEAN[:1], np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD if channels == 3 else IMAGENET_STD[:1], np.float32)[:, None, None]
    batch = []
    for file in files:
        try:
            with Image.open(file) as image:
                pixels = image.convert("RGB" if channels == 3 else "L").resize((width, height), Image.BILINEAR)
        except OSError as exc:
            raise UsageError(f"--data {file}: not a readable image ({type(exc).__name__})") from None
        array = np.asarray(pixels, np.float32).reshape(height, width, channels).transpose(2, 0, 1) / 255.0
        batch.append((array - mean) / std)
    return {floats[0].name: np.stack(batch).astype(floats[0].dtype)}


@dataclass
class Split:
    search: dict[str, np.ndarray]
    holdout: dict[str, np.ndarray]
    search_index: list[int]
    holdout_index: list[int]


def count(feeds: dict[str, np.ndarray]) -> int:
    return int(next(iter(feeds.values())).shape[0])


def split(feeds: dict[str, np.ndarray], holdout: float, origin: str) -> Split:
    """A seeded permutation cut in two: the held-out part is never shown to the search."""
    n = count(feeds)
    n_holdout = max(1, int(round(holdout * n)))
    if n - n_holdout < 1:
        raise UsageError(f"--data {origin}: {n} sample(s) cannot be split into a search part and a held-out part "
                         f"(--holdout {holdout:g}); give more samples")
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    held, searched = sorted(order[:n_holdout].tolist()), sorted(order[n_holdout:].tolist())
    return Split({k: v[searched] for k, v in feeds.items()}, {k: v[held] for k, v in feeds.items()}, searched, held)
