"""Cheap checks of a model spec and its options, made before torch, timm or transformers are imported.

A typo in a spec, a missing checkpoint or an option that cannot apply should cost milliseconds, not the
seconds a torch import takes. What can be decided from the spec's prefix alone is decided here; what needs the
model itself (an hf: directory holding an image model, a timm model without img_size) stays in its loader in
tcexport.models.sources.

    timm:  an image model: --input-shape CxHxW applies, --seq-len does not
    st:    a sentence-transformers text pipeline: --seq-len applies, --input-shape does not
    hf:    text or image, known once the config is read (the loader checks)
    py:    says what it takes: exactly one of --input-shape or --seq-len
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from tcexport.core.errors import UsageError

# prefix -> the input kind that prefix alone implies (None: decided by the loader). Must match
# tcexport.models.sources.LOADERS; a test holds the two together.
PREFIXES = {"timm": "image", "hf": None, "st": "text", "py": None}
# Options that only some prefixes take (the rest ignore nothing: they refuse).
WEIGHT_OPTIONS = {"--pretrained": ("timm",), "--checkpoint": ("timm", "py")}


def parse_shape(text: str) -> tuple[int, ...]:
    """'3x224x224' -> (3, 224, 224); a UsageError for anything else."""
    try:
        dims = tuple(int(d) for d in str(text).lower().split("x"))
    except ValueError:
        raise UsageError(f"--input-shape must look like 3x224x224, got '{text}'") from None
    if not dims or any(d <= 0 for d in dims):
        raise UsageError(f"--input-shape must look like 3x224x224, got '{text}'")
    return dims


def parse_batch(text: str | int | None) -> int | None:
    """An export's --batch: 'dynamic' -> None, otherwise a positive int."""
    if text is None or str(text).lower() == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"--batch must be 'dynamic' or a positive integer, got '{text}'") from None
    if value <= 0:
        raise UsageError(f"--batch must be 'dynamic' or a positive integer, got '{text}'")
    return value


def split(spec: str) -> tuple[str, str]:
    """'timm:vit_tiny' -> ('timm', 'vit_tiny'); a UsageError naming the known prefixes otherwise."""
    if spec.endswith(".onnx"):
        raise UsageError(f"'{spec}' is already an ONNX file; pass it to build, bench, compress or inspect instead")
    prefix, sep, rest = spec.partition(":")
    if not sep or prefix not in PREFIXES or not rest:
        known = ", ".join(f"{p}:..." for p in PREFIXES)
        raise UsageError(f"unknown model spec '{spec}'; use one of {known} or an .onnx file")
    return prefix, rest


def import_from_cwd() -> None:
    """py: specs import from the current directory, as `python -m` does (a console script's sys.path lacks it)."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def check(spec: str, pretrained: bool = False, checkpoint: str | Path | None = None, seed: int | None = None,
          input_shape: str | None = None, seq_len: int | None = None, check_paths: bool = True, **_other) -> str:
    """Refuse what is wrong before anything heavy loads; return the prefix. Other options pass through.

    check_paths=False skips what depends on the current directory (hf:/st: directories, py: modules), for a
    recipe, whose paths resolve against its own directory later."""
    prefix, rest = split(spec)
    given = {"--pretrained": bool(pretrained), "--checkpoint": checkpoint is not None}
    for option, prefixes in WEIGHT_OPTIONS.items():
        if given[option] and prefix not in prefixes:
            raise UsageError(f"{option} does not apply to {prefix}: specs (only to "
                             f"{', '.join(p + ':' for p in prefixes)}); drop it")
    if pretrained and checkpoint:
        raise UsageError("give --pretrained or --checkpoint, not both")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UsageError(f"checkpoint {checkpoint}: no such file; check the path")
    if input_shape is not None:
        parse_shape(input_shape)
    kind = PREFIXES[prefix]
    if kind == "image" and seq_len is not None:
        raise UsageError(f"--seq-len does not apply to {spec}: it is an image model (set its input with "
                         "--input-shape CxHxW)")
    if kind == "text" and input_shape is not None:
        raise UsageError(f"--input-shape does not apply to {spec}: it is a text model (set its length with "
                         "--seq-len N)")
    if prefix in ("hf", "st") and check_paths:
        _check_local_dir(prefix, rest)
    if prefix == "py":
        _check_py(rest, input_shape, seq_len, check_paths)
    return prefix


def _check_local_dir(prefix: str, rest: str) -> None:
    # A hub id or bundled name is "name" or "org/name"; anything written as a path must be a directory.
    if rest.startswith((".", "/", "~")) or rest.count("/") > 1:
        if not Path(rest).expanduser().is_dir():
            raise UsageError(f"{prefix}:{rest}: no such directory; pass a model directory"
                             f"{' or a hub id' if prefix == 'hf' else ''}")


def _check_py(target: str, input_shape: str | None, seq_len: int | None, check_paths: bool) -> None:
    module_name, sep, factory_name = target.partition(":")
    if not sep or not module_name or not factory_name:
        raise UsageError(f"py:{target}: expected py:package.module:factory")
    if input_shape is not None and seq_len is not None:
        raise UsageError("give --input-shape or --seq-len, not both")
    if input_shape is None and seq_len is None:
        raise UsageError(f"py:{target}: say what the model takes with --input-shape (e.g. 3x224x224) or --seq-len N")
    if not check_paths:
        return
    import_from_cwd()
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):  # a parent package that is missing, or a malformed name
        found = None
    if found is None:
        raise UsageError(f"py:{target}: no module '{module_name}' in the current directory or on PYTHONPATH")
