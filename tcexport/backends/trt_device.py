"""What building or running TensorRT engines needs on this machine: the tensorrt package and an NVIDIA GPU.

require_tensorrt is the only place tcexport imports tensorrt (lazily, inside the function; tcexport.plugins.python,
which only --plugins python imports, aside): the other trt_* modules get the module from it, so tests replace it
here. require_gpu reads the CUDA device TensorRT will build for (or run on) through the CUDA driver API, no torch
needed. Without the tensorrt package, or without an NVIDIA GPU, they raise UsageError with one line saying what is
missing, before anything is written. DeviceInfo is the GPU as a sidecar records it; check_device_precision refuses
bf16 where the GPU has none.
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass

from tcexport.core.errors import UsageError

INSTALL_HINT = ("pip install 'tcexport[trt10]' (TensorRT 10.x, CUDA 12) or 'tcexport[trt11]' (= tcexport[trt], "
                "TensorRT 11.x, CUDA 13) on a machine with an NVIDIA GPU (on Jetson: JetPack's python3-libnvinfer)")


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: tuple[int, int]
    total_memory_bytes: int | None = None
    index: int = 0

    def to_json(self) -> dict:
        data = asdict(self)
        data["compute_capability"] = f"{self.compute_capability[0]}.{self.compute_capability[1]}"
        return data


def check_device_precision(device: DeviceInfo, precision: str) -> None:
    """bf16 needs compute capability 8.0 (Ampere, Orin) or newer."""
    if precision == "bf16" and device.compute_capability < (8, 0):
        major, minor = device.compute_capability
        raise UsageError(f"{device.name} (compute capability {major}.{minor}) has no bf16 support; "
                         "use --precision fp16")


def require_tensorrt():
    """Import tensorrt, or raise UsageError naming what is missing and how to install it."""
    try:
        import tensorrt  # noqa: PLC0415

        return tensorrt
    except (ImportError, OSError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
    try:  # the bindings wheel alone (tensorrt-cuXX-bindings) names its module tensorrt_bindings
        import tensorrt_bindings  # noqa: PLC0415

        return tensorrt_bindings
    except ModuleNotFoundError:
        pass
    except (ImportError, OSError) as exc:  # bindings present, libraries (libnvinfer, libnvonnxparser) missing
        reason = " ".join(str(exc).split()) or type(exc).__name__
    raise UsageError(f"TensorRT is not available ({reason}); install it with {INSTALL_HINT}")


_GPU_ADVICE = {
    "build": "TensorRT builds engines on the GPU that will run them: run 'tcexport build --backend trt' on that "
             "machine",
    "run": "TensorRT engines run only on a GPU like the one that built them: run this there, with tcexport[trt] "
           "installed",
}


def require_gpu(index: int = 0, purpose: str = "build") -> DeviceInfo:
    """The CUDA device TensorRT will build for (or run on), read through the CUDA driver API (no torch needed).

    purpose ("build" or "run") only picks the advice at the end of the error message.
    """
    advice = _GPU_ADVICE[purpose]
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        raise UsageError(f"no NVIDIA GPU driver found (libcuda.so.1 is missing); {advice}")
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= index:
        raise UsageError(f"no usable NVIDIA GPU (the CUDA driver reports {count.value} device(s)); {advice}")
    device = ctypes.c_int(0)
    cuda.cuDeviceGet(ctypes.byref(device), index)
    name = ctypes.create_string_buffer(256)
    cuda.cuDeviceGetName(name, 256, device)
    major, minor, memory = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_size_t(0)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    total = getattr(cuda, "cuDeviceTotalMem_v2", None)
    if total is not None:
        total(ctypes.byref(memory), device)
    return DeviceInfo(name.value.decode(errors="replace"), (major.value, minor.value), memory.value or None, index)


__all__ = ["check_device_precision", "require_gpu", "require_tensorrt", "DeviceInfo", "INSTALL_HINT"]
