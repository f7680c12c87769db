"""A model that runs one method alone, for tests and micro-benchmarks (the method's ONNX builder, nothing else).

Inputs (dynamic batch "batch"; opset 18): x [B,N,C], size [B,N,1], then what the method needs: metric [B,N,Ck]
("keys"), cls_attention [B,N] ("cls_attention"), query [B,C] ("query"), and mask [B,N] when asked. Outputs
x_out, size_out (, mask_out). Feeding the same tensors to `method.reference` gives the PyTorch side of the comparison.
"""

from __future__ import annotations

from typing import Any

import onnx
import onnx_ir as ir
from onnx_ir import tape

from tcexport.methods.base import Method

OPSET = 18


def _input(name: str, *dims: Any) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", *dims]))


def build_standalone_model(method: Method, n: int, c: int, ck: int, protected: int, with_mask: bool,
                           name_prefix: str = "op") -> onnx.ModelProto:
    x, size = _input("x", n, c), _input("size", n, 1)
    inputs = [x, size]
    metric = _input("metric", n, ck) if "keys" in method.needs else None
    signals = {}
    if metric is not None:
        inputs.append(metric)
    if "cls_attention" in method.needs:
        signals["cls_attention"] = _input("cls_attention", n)
        inputs.append(signals["cls_attention"])
    if "query" in method.needs:
        signals["query"] = _input("query", c)
        inputs.append(signals["query"])
    mask = _input("mask", n) if with_mask else None
    if mask is not None:
        inputs.append(mask)
    op = tape.Tape()
    result = method.build_onnx(op, x, metric, size, mask, n, protected, name_prefix=name_prefix, signals=signals)
    outputs = []
    for label, value in zip(("x_out", "size_out", "mask_out"), result):
        if value is None:
            continue
        if value in inputs:  # nothing changed: a graph output must be produced by a node
            out = op.op("Identity", [value], name=f"{name_prefix}/{label}")
            out.dtype, out.shape = value.dtype, value.shape
            value = out
        value.name = label
        outputs.append(value)
    graph = ir.Graph(inputs, outputs, nodes=op.nodes, opset_imports={"": OPSET}, name=f"{method.name}_op")
    return ir.to_proto(ir.Model(graph, ir_version=10, producer_name="tcexport"))
