"""Shared pieces of the methods' two implementations: readable ONNX node emission and output typing (ONNX),
and batched row gathering (PyTorch). One place, so every method's graph is named and typed the same way."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir import tape

from tcexport.methods.base import TokenState
from tcexport.core.lazy import lazy_import

torch = lazy_import("torch")  # the references need it; the declarations do not


class Emitter:
    """Records nodes on a tape with readable names: node '<prefix>/<label>', value '<prefix>_<label>'."""

    def __init__(self, op: tape.Tape, prefix: str, float_dtype: np.dtype):
        self.tape, self.prefix, self.float_dtype = op, prefix, float_dtype

    def op(self, label: str, op_type: str, *inputs: ir.Value, **attributes: Any) -> ir.Value:
        value = self.tape.op(op_type, list(inputs), attributes or None, name=f"{self.prefix}/{label}")
        value.name = f"{self.prefix}_{label}"
        return value

    def op_multi(self, label: str, op_type: str, count: int, *inputs: ir.Value, **attributes: Any):
        values = self.tape.op_multi_out(op_type, list(inputs), attributes or None, num_outputs=count,
                                        name=f"{self.prefix}/{label}")
        for k, value in enumerate(values):
            value.name = f"{self.prefix}_{label}_{k}"
        return values

    def const(self, label: str, array: Any, dtype: Any = None) -> ir.Value:
        """A Constant node; floats default to the dtype of x."""
        tensor = ir.tensor(np.asarray(array, dtype=dtype or self.float_dtype), name=f"{self.prefix}_{label}")
        return self.op(label, "Constant", value=tensor)

    def i64(self, label: str, array: Any) -> ir.Value:
        return self.const(label, array, np.int64)

    def every_other(self, label: str, value: ir.Value, start: int, n: int) -> ir.Value:
        """value[:, start::2] along the token axis."""
        return self.op(label, "Slice", value, self.i64(f"{label}_start", [start]), self.i64(f"{label}_end", [n]),
                       self.i64(f"{label}_axis", [1]), self.i64(f"{label}_step", [2]))


def ir_dtype(value: ir.Value) -> ir.DataType:
    return value.dtype if value.dtype is not None else ir.DataType.FLOAT


def numpy_dtype(value: ir.Value) -> np.dtype:
    return np.dtype(ir_dtype(value).numpy())


def set_type(out: ir.Value, like: ir.Value, n_out: int) -> None:
    """Give an output the dtype of `like` and its shape with the token axis set to n_out (when known)."""
    out.dtype = like.dtype
    if like.shape is not None:
        dims = list(like.shape.dims)
        dims[1] = n_out
        out.shape = ir.Shape(dims)


def typed_state(x: ir.Value, size: ir.Value, mask: ir.Value | None, like: TokenState, n_out: int) -> TokenState:
    """The outputs as a TokenState, each typed like its input with n_out tokens."""
    set_type(x, like.x, n_out)
    set_type(size, like.size, n_out)
    if mask is not None:
        set_type(mask, like.mask, n_out)
    return TokenState(x, size, mask)


def rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[b, idx[b, i], :] for every batch row b."""
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))
