"""Option groups and value parsers shared by several commands (Polygraphy-style argument groups)."""

from __future__ import annotations

from pathlib import Path

import click

from tcexport.core.errors import UsageError


def positive_int_list(value: str | None, what: str) -> list[int] | None:
    if value is None:
        return None
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be a comma-separated list of positive integers, got '{value}'") from None
    if not items or any(v <= 0 for v in items):
        raise UsageError(f"{what} must be a comma-separated list of positive integers, got '{value}'")
    return items


def model_spec_options(fn):
    """Options that say how to materialise a model spec (timm:, hf:, st:, py:)."""
    options = [
        click.option("--pretrained", is_flag=True, help="timm: download pretrained weights (needs hub access)."),
        click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path),
                     help="timm/py: load weights from a state dict (.pth/.pt/.bin or .safetensors)."),
        click.option("--seed", type=int, default=None,
                     help="Seed for random initialisation (the default when no weights are given: seed 0)."),
        click.option("--input-shape", metavar="CxHxW",
                     help="Image input shape without batch, e.g. 3x224x224 (default: the model's own)."),
        click.option("--seq-len", type=click.IntRange(min=1), default=None,
                     help="Sequence length for text models (default 128)."),
        click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
                     help="timm/py: keyword argument for create_model or the factory, repeatable; values are "
                          "int, float, true/false or tuples like 32,32 (e.g. --model-arg depth=2)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn
