"""Shared steps of the model-family tests: a tiny zoo model exported once, compressed, validated.

Each family test checks that compress + validate pass (fp32, batch 1 and 3, the default 1e-4 tolerances) and that
the mechanism the family needs really took part: the graph names the nodes that carry it (position terms
gathered, a size-weighted mean, proportional attention on a pooling head), so a pass cannot come from both sides
skipping it.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from tcexport.compress import rewrite as compress
from tcexport.validate import equality as validate
from tcexport.models import zoo
from tests.conftest import exported, made_once

ZOO_ROOT = "zoo"


def spec_of(tmp_path_factory, family: str, kind: str) -> tuple[str, dict]:
    """The tcexport spec and load options of a zoo model: timm names, hf:KIND, st:KIND."""
    if family == "timm":
        return f"timm:{kind}", {"model_args": zoo.timm_model_args(kind)}
    root = made_once(tmp_path_factory, f"{ZOO_ROOT}_{family}_{kind}",
                     lambda directory: (zoo.hf_dir if family == "hf" else zoo.st_dir)(kind, directory))
    directory = (zoo.hf_dir if family == "hf" else zoo.st_dir)(kind, root)
    options = {"seq_len": 16} if family == "st" or kind in zoo.TEXT_KINDS + zoo.STRUCTURE_TEXT_KINDS else {}
    if kind in zoo.RAW_AUDIO_KINDS:
        options = {"input_shape": str(zoo.AUDIO_SAMPLES)}  # raw audio: a few dozen frames
    return f"{family}:{directory}", options


def export_zoo(tmp_path_factory, family: str, kind: str) -> Path:
    spec, options = spec_of(tmp_path_factory, family, kind)
    name = f"{family}_{kind}".replace("-", "_")
    return exported(tmp_path_factory, f"onnx_{name}", spec, f"{name}.onnx", **options)


def compress_and_validate(model: Path, out: Path, method: str, **options) -> tuple[list[dict], onnx.ModelProto]:
    """Compress `model` into `out` and validate it; returns the token schedule and the compressed graph."""
    schedule = compress.compress_file(model, out, method=method, **options)
    assert schedule[-1]["out"] < schedule[0]["in"], schedule  # tokens were removed
    report = validate.validate(out, samples=2)
    assert report.passed, validate.format_report(report)
    return schedule, onnx.load(str(out), load_external_data=False)


def node_names(model: onnx.ModelProto) -> list[str]:
    return [node.name for node in model.graph.node]


def has_node(model: onnx.ModelProto, fragment: str) -> bool:
    return any(fragment in name for name in node_names(model))


METHODS = {"tome": {"r": "2"}, "topk": {"params": {"keep": 0.7}}, "adjacent": {"r": "2"}}
