"""tcexport's records in an ONNX model's metadata_props: each stage stores a JSON document under its own key.

    tcexport.source       written by export (model spec, weights hash, input spec, opset, versions)
    tcexport.compression  written by compress (method, params, layers, impl)
    tcexport.tokens       written by compress (token count entering and leaving each block)
"""

from __future__ import annotations

import json
from typing import Any

import onnx

from tcexport.core.errors import UsageError

SOURCE = "tcexport.source"
COMPRESSION = "tcexport.compression"
TOKENS = "tcexport.tokens"


def read(model: onnx.ModelProto, key: str) -> Any | None:
    for prop in model.metadata_props:
        if prop.key == key:
            return _decode(prop.key, prop.value)
    return None


def write(model: onnx.ModelProto, key: str, value: Any) -> None:
    text = json.dumps(value, sort_keys=True)
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = text
            return
    entry = model.metadata_props.add()
    entry.key = key
    entry.value = text


def all_records(model: onnx.ModelProto) -> dict[str, Any]:
    """Every tcexport.* record in the model, decoded."""
    return {p.key: _decode(p.key, p.value) for p in model.metadata_props if p.key.startswith("tcexport.")}


def _decode(key: str, value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise UsageError(f"metadata '{key}' is not valid JSON; the file was edited by hand or by another tool, "
                         "re-run the tcexport stage that wrote it") from None
