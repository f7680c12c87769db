"""Outputs tcexport may replace: its own earlier outputs, anything else only with --force.

A mistyped -o must not eat a user's file or directory. What counts as tcexport's own:

    an .onnx file      its producer_name is tcexport (export and compress write it)
    a build directory  it holds tcexport-build.json
    a recipe output    it holds summary.json (same recipe: replaced and said so; another recipe's: --force)

The checks read a few bytes or one small JSON file, so they run before anything heavy is imported.
"""

from __future__ import annotations

import json
from pathlib import Path

from tcexport.core.artifacts import SIDECAR
from tcexport.core.atomic import check_writable
from tcexport.core.errors import UsageError

SUMMARY = "summary.json"  # what a recipe run writes last (tcexport.recipes.runner uses this name)
PRODUCER = b"tcexport"


def _refuse(path: Path, what: str) -> UsageError:
    return UsageError(f"{path}: exists and {what}; pass --force to replace it, or choose another -o")


def is_empty(path: Path) -> bool:
    if path.is_dir():
        return not any(path.iterdir())
    return path.stat().st_size == 0


def produced_by_tcexport(path: Path) -> bool:
    """True when the ONNX file's producer_name is tcexport (ModelProto fields 1 and 2 open every saved file)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except OSError:
        return False
    position = 0
    if head[:1] == b"\x08":  # ir_version, a varint
        position = 1
        while position < len(head) and head[position] & 0x80:
            position += 1
        position += 1
    if head[position:position + 1] != b"\x12":  # producer_name, length-delimited
        return False
    length = head[position + 1] if position + 1 < len(head) else 0
    return head[position + 2:position + 2 + length] == PRODUCER


def check_file(path: str | Path, force: bool) -> None:
    """An output .onnx file: refuse a path that cannot be written, and replacing a file tcexport did not write."""
    path = Path(path)
    if path.is_dir():  # with --force too: a directory is never replaced by a file
        raise UsageError(f"{path}: is a directory; give a file name ending in .onnx")
    check_writable(path, "-o")
    if not path.exists() or force:
        return
    if not is_empty(path) and not produced_by_tcexport(path):
        raise _refuse(path, "was not written by tcexport")


def check_build_dir(path: str | Path, force: bool) -> None:
    """A build's OUT_DIR: refuse a path that cannot be written; replace an earlier build, refuse anything else
    that holds files."""
    path = check_writable(path, "-o", directory=True)
    if not path.exists() or force:
        return
    if not path.is_dir():
        raise _refuse(path, "is a file, not a build directory")
    if not is_empty(path) and not (path / SIDECAR).is_file():
        raise _refuse(path, f"is not a tcexport build (no {SIDECAR})")


def check_recipe_dir(path: str | Path, recipe_source: Path | None, force: bool) -> str | None:
    """A recipe's OUT_DIR. Refuses a path that cannot be written. Returns a note to show when an earlier output is
    being replaced, None otherwise."""
    path = check_writable(path, "-o", directory=True)
    if not path.exists() or is_empty(path):
        return None
    if not path.is_dir():
        if force:
            return f"replacing the file {path} (--force)"
        raise _refuse(path, "is a file, not a recipe output directory")
    summary = _read_summary(path / SUMMARY)
    if summary is None:
        if force:
            return f"replacing {path}, which is not a recipe output (--force)"
        raise _refuse(path, f"is not the output of a recipe (no {SUMMARY})")
    earlier = summary.get("recipe_source")
    same = recipe_source is None or earlier is None or Path(earlier) == recipe_source.resolve()
    if same:
        return f"replacing the earlier output of this recipe in {path}"
    if force:
        return f"replacing the output of {earlier} in {path} (--force)"
    raise _refuse(path, f"holds the output of another recipe ({earlier})")


def _read_summary(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
