"""tcexport's Python TensorRT plugins ("quickly deployable plugins", tensorrt.plugin): ToMeMerge and TokenPrune.

Importing this module registers both under namespace "tcexport", version "1" (tcexport build/validate/bench do
it with --plugins python, before parsing or deserializing). Each has
  register   the shape/type descriptor: N_out from the fields (N - r; protected + k + fuse), I/O dtypes kept;
  impl       JIT (TensorRT >= 10.6): the Triton kernel launched through torch on TensorRT's stream;
  aot_impl   AOT (TensorRT >= 10.9): the same kernel compiled to PTX (tcexport.plugins.aot) for this GPU, so the
             engine runs without Python.
Both exist, so graph nodes carry `aot=1` (graph/functions.py) to pick AOT.

Limits: a Python plugin has a fixed input list, so these take the vision form (x, metric or cls_attention,
size) without the optional mask; graphs with a mask (text models) need the C++ plugin library
(plugins/cpp, --plugins PATH.so). Fields arrive as INT32 (ONNX INT attributes).
"""

from __future__ import annotations

from typing import Tuple

import tensorrt.plugin as trtp

from tcexport.plugins import aot, kernels

NAMESPACE = "tcexport"
_TORCH_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16"}


def _aot_impl(plugin_id: str):
    """trtp.aot_impl where TensorRT has it (10.9+); on 10.6-10.8 the plugins are JIT only."""
    if hasattr(trtp, "aot_impl"):
        return trtp.aot_impl(plugin_id)
    return lambda function: function


def _dtype_name(desc) -> str:
    name = getattr(desc.dtype, "name", str(desc.dtype).split(".")[-1])
    if name not in _TORCH_NAMES:
        raise ValueError(f"tcexport plugins take float32, float16 or bfloat16 tensors, not {name}")
    return _TORCH_NAMES[name]


def _static(expr) -> int:
    """A static dimension (tokens, channels): tcexport graphs keep every axis but the batch static."""
    if not expr.is_constant:
        raise ValueError("tcexport plugins need static token and channel counts (only the batch may vary)")
    return int(expr.constant_value)


def _capability() -> int:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


def _launch(compiled: aot.CompiledKernel, batch) -> "trtp.KernelLaunchParams":
    launch = trtp.KernelLaunchParams()
    launch.grid_x = batch  # one program per batch row
    launch.block_x = compiled.threads
    launch.shared_mem = compiled.shared_bytes
    return launch


def _extras(*values: int) -> "trtp.SymIntExprs":
    extra = trtp.SymIntExprs(len(values))
    for index, value in enumerate(values):
        extra[index] = trtp.SymInt32(int(value))
    return extra


def _torch(tensors):
    import torch

    return [torch.as_tensor(t, device="cuda") for t in tensors]


# ---------------------------------------------------------------- ToMeMerge


@trtp.register(f"{NAMESPACE}::ToMeMerge")
def tome_desc(x: trtp.TensorDesc, metric: trtp.TensorDesc, size: trtp.TensorDesc, r: int,
              protected: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    x_out = trtp.from_shape_expr((x.shape_expr[0], x.shape_expr[1] - r, x.shape_expr[2]), dtype=x.dtype)
    size_out = trtp.from_shape_expr((size.shape_expr[0], size.shape_expr[1] - r, size.shape_expr[2]),
                                    dtype=size.dtype)
    return x_out, size_out


@trtp.impl(f"{NAMESPACE}::ToMeMerge")
def tome_impl(x: trtp.Tensor, metric: trtp.Tensor, size: trtp.Tensor, r: int, protected: int,
              outputs: Tuple[trtp.Tensor], stream: int) -> None:
    import torch

    x_t, metric_t, size_t = _torch((x, metric, size))
    x_out, size_out = _torch(outputs)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        kernels.tome_merge(x_t, metric_t, size_t, None, int(r), int(protected), out=(x_out, size_out, None))


@_aot_impl(f"{NAMESPACE}::ToMeMerge")
def tome_aot(x: trtp.TensorDesc, metric: trtp.TensorDesc, size: trtp.TensorDesc, r: int, protected: int,
             outputs: Tuple[trtp.TensorDesc], tactic: int):
    n, c, ck = _static(x.shape_expr[1]), _static(x.shape_expr[2]), _static(metric.shape_expr[2])
    compiled = aot.compile_tome(n, c, ck, dtype=_dtype_name(x), size_dtype=_dtype_name(size),
                                capability=_capability())
    return compiled.name, compiled.ptx, _launch(compiled, x.shape_expr[0]), _extras(n, c, ck, r, protected)


# ---------------------------------------------------------------- TokenPrune


@trtp.register(f"{NAMESPACE}::TokenPrune")
def prune_desc(x: trtp.TensorDesc, cls_attention: trtp.TensorDesc, size: trtp.TensorDesc, k: int, protected: int,
               fuse: int, keep_order: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    n_out = protected + k + (1 if fuse else 0)
    dropped = _static(x.shape_expr[1]) - n_out  # tokens out as an expression of the input's (a ShapeExpr)
    x_out = trtp.from_shape_expr((x.shape_expr[0], x.shape_expr[1] - dropped, x.shape_expr[2]), dtype=x.dtype)
    size_out = trtp.from_shape_expr((size.shape_expr[0], size.shape_expr[1] - dropped, size.shape_expr[2]),
                                    dtype=size.dtype)
    return x_out, size_out


@trtp.impl(f"{NAMESPACE}::TokenPrune")
def prune_impl(x: trtp.Tensor, cls_attention: trtp.Tensor, size: trtp.Tensor, k: int, protected: int, fuse: int,
               keep_order: int, outputs: Tuple[trtp.Tensor], stream: int) -> None:
    import torch

    x_t, score_t, size_t = _torch((x, cls_attention, size))
    x_out, size_out = _torch(outputs)
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
        kernels.token_prune(x_t, score_t, size_t, None, int(k), int(protected), bool(fuse), bool(keep_order),
                            out=(x_out, size_out, None))


@_aot_impl(f"{NAMESPACE}::TokenPrune")
def prune_aot(x: trtp.TensorDesc, cls_attention: trtp.TensorDesc, size: trtp.TensorDesc, k: int, protected: int,
              fuse: int, keep_order: int, outputs: Tuple[trtp.TensorDesc], tactic: int):
    n, c = _static(x.shape_expr[1]), _static(x.shape_expr[2])
    compiled = aot.compile_prune(n, c, int(protected), fuse=bool(fuse), keep_order=bool(keep_order),
                                 dtype=_dtype_name(x), score_dtype=_dtype_name(cls_attention),
                                 size_dtype=_dtype_name(size), capability=_capability())
    return compiled.name, compiled.ptx, _launch(compiled, x.shape_expr[0]), _extras(n, c, k, protected)
