"""Ahead-of-time compilation of tcexport's Triton kernels to PTX (what an AOT Python plugin hands TensorRT).

PTX ISA 8.0 (CUDA 12.0): the CUDA driver JIT-compiles PTX of its own ISA version or older, so 8.0 loads on every
CUDA >= 12.0 driver: x86 drivers R525 and newer and JetPack 7 (CUDA 13, Thor). Triton would otherwise write the
newest ISA its bundled ptxas knows (8.8 here), which older drivers reject. sm_87 (Orin) and sm_90 (Hopper) are
the targets tests compile for; Triton writes sm_90a for 90, which loads on sm_90 GPUs only.

No GPU is needed: triton.compile runs for a GPUTarget on any machine (TRITON_INTERPRET must be unset).
"""

from __future__ import annotations

from dataclasses import dataclass

from tcexport.plugins import kernels

PTX_VERSION = 80  # PTX ISA 8.0, see above
TARGETS = (87, 90)  # compute capabilities checked in CI: Jetson Orin, Hopper
NUM_WARPS = 4
_POINTER = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}


@dataclass(frozen=True)
class CompiledKernel:
    name: str  # the kernel's symbol in the PTX
    ptx: str
    num_warps: int
    shared_bytes: int
    # Triton appends global/profile scratch pointers after the declared parameters; TensorRT passes only inputs,
    # extra arguments and outputs, so a kernel must not need that scratch (0 here, checked by the tests).
    global_scratch_bytes: int = 0

    @property
    def threads(self) -> int:
        return self.num_warps * 32


def _pointer(dtype: str) -> str:
    if dtype not in _POINTER:
        raise ValueError(f"no Triton pointer type for {dtype}; use one of {', '.join(_POINTER)}")
    return _POINTER[dtype]


def tome_signature(dtype: str, size_dtype: str, has_mask: bool) -> tuple[dict, dict]:
    """(signature, constexprs) of tome_merge_kernel for x/metric in `dtype`, size/mask in `size_dtype`."""
    io, side = _pointer(dtype), _pointer(size_dtype)
    signature = {"x_ptr": io, "metric_ptr": io, "size_ptr": side, "mask_ptr": side if has_mask else "constexpr",
                 "n": "i32", "c": "i32", "ck": "i32", "r": "i32", "protected": "i32",
                 "x_out_ptr": io, "size_out_ptr": side, "mask_out_ptr": side if has_mask else "constexpr"}
    constexprs = {} if has_mask else {"mask_ptr": None, "mask_out_ptr": None}
    return signature, constexprs


def prune_signature(dtype: str, score_dtype: str, size_dtype: str, has_mask: bool) -> tuple[dict, dict]:
    io, side = _pointer(dtype), _pointer(size_dtype)
    signature = {"x_ptr": io, "score_ptr": _pointer(score_dtype), "size_ptr": side,
                 "mask_ptr": side if has_mask else "constexpr", "n": "i32", "c": "i32", "k": "i32",
                 "protected": "i32", "x_out_ptr": io, "size_out_ptr": side,
                 "mask_out_ptr": side if has_mask else "constexpr"}
    constexprs = {} if has_mask else {"mask_ptr": None, "mask_out_ptr": None}
    return signature, constexprs


def _compile(fn, signature: dict, constexprs: dict, capability: int, ptx_version: int) -> CompiledKernel:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for name, value in constexprs.items():
        signature.setdefault(name, "constexpr")
        if signature[name] != "constexpr":
            raise ValueError(f"{name} is given as a constexpr but typed {signature[name]}")
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": NUM_WARPS, "ptx_version": ptx_version})
    return CompiledKernel(compiled.metadata.name, compiled.asm["ptx"], compiled.metadata.num_warps,
                          compiled.metadata.shared, int(getattr(compiled.metadata, "global_scratch_size", 0) or 0))


def compile_tome(n: int, c: int, ck: int, *, has_mask: bool = False, dtype: str = "float32",
                 size_dtype: str = "float32", capability: int = 90, ptx_version: int = PTX_VERSION) -> CompiledKernel:
    signature, constexprs = tome_signature(dtype, size_dtype, has_mask)
    constexprs = {**constexprs, "HAS_MASK": has_mask, **kernels.tome_blocks(n, c, ck)}
    return _compile(kernels.tome_merge_kernel, signature, constexprs, capability, ptx_version)


def compile_prune(n: int, c: int, protected: int, *, fuse: bool, keep_order: bool, has_mask: bool = False,
                  dtype: str = "float32", score_dtype: str = "float32", size_dtype: str = "float32",
                  capability: int = 90, ptx_version: int = PTX_VERSION) -> CompiledKernel:
    signature, constexprs = prune_signature(dtype, score_dtype, size_dtype, has_mask)
    constexprs = {**constexprs, "FUSE": bool(fuse), "KEEP_ORDER": bool(keep_order), "HAS_MASK": has_mask,
                  **kernels.prune_blocks(n, c, protected)}
    return _compile(kernels.token_prune_kernel, signature, constexprs, capability, ptx_version)


def ptx_header(ptx: str) -> dict[str, str]:
    """{'version': '8.0', 'target': 'sm_87'} from a PTX module's directives."""
    found = {}
    for line in ptx.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in (".version", ".target"):
            found[parts[0][1:]] = parts[1].rstrip(",")
    return found
