"""Compiling plugins/cpp without a GPU or nvcc: g++ for host code, NVRTC (ctypes) and ptxas for the kernels.

Where the pieces come from (the `plugins-dev` extra): CUDA headers from PyPI `nvidia-cuda-runtime-cu12` (plus
`crt/host_defines.h`, which ships in `nvidia-cuda-nvcc-cu12`), NVRTC from `nvidia-cuda-nvrtc-cu12`, ptxas from
`nvidia-cuda-nvcc-cu12`; TensorRT's headers from ../shared/tensorrt-include/{10.3,10.13,11}/include (test data
next to the checkout; a user's machine has TensorRT's own). Every helper returns None when its piece is missing,
so tests can skip with the reason.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins" / "cpp"
KERNELS = PLUGINS / "kernels"
SOURCES = PLUGINS / "src"
TRT_HEADERS = ROOT.parent / "shared" / "tensorrt-include"
TRT_SETS = ("10.3", "10.13", "11")
INSTALL_HINT = "pip install 'tcexport[plugins-dev]'"
# The kernels' arithmetic flags, as CMakeLists.txt passes them to nvcc: IEEE, no fused multiply-add, so device and
# host harness round alike. The host side gets -ffp-contract=off for the same reason (GCC contracts on aarch64).
NVRTC_IEEE = ("--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false")


def wheel_file(dist: str, suffix: str) -> Path | None:
    """The installed file of distribution `dist` whose path ends with `suffix`, or None."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in files:
        if str(entry).replace("\\", "/").endswith(suffix):
            path = Path(entry.locate())
            if path.exists():
                return path
    return None


def cuda_include_dirs() -> list[Path] | None:
    runtime = wheel_file("nvidia-cuda-runtime-cu12", "include/cuda_runtime_api.h")
    host_defines = wheel_file("nvidia-cuda-nvcc-cu12", "include/crt/host_defines.h")
    if runtime is None or host_defines is None:
        return None
    return [runtime.parent, host_defines.parent.parent]


def trt_include(version: str) -> Path | None:
    path = TRT_HEADERS / version / "include"
    return path if (path / "NvInfer.h").exists() else None


def gxx() -> str | None:
    return shutil.which("g++")


def nvcc() -> str | None:
    """A real nvcc (a CUDA toolkit install), for the optional CMake build test."""
    return shutil.which("nvcc") or next((str(p) for p in [Path("/usr/local/cuda/bin/nvcc")] if p.exists()), None)


def nvcc_major(path: str) -> int:
    output = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    match = re.search(r"release (\d+)\.", output)
    return int(match.group(1)) if match else 0


def ptxas() -> Path | None:
    return wheel_file("nvidia-cuda-nvcc-cu12", "bin/ptxas")


def host_compile(args: list[str], *includes: Path) -> subprocess.CompletedProcess:
    """g++ -std=c++17 with warnings as errors in our code; TensorRT and CUDA headers as system headers."""
    command = [gxx(), "-std=c++17", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off"]
    command += [f"-isystem{path}" for path in includes]
    command += [f"-I{SOURCES}", f"-I{KERNELS}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def build_harness(out_dir: Path) -> Path:
    """plugins/cpp/harness/host_harness.cpp as a shared library (the kernels' per-row code, on the CPU)."""
    library = out_dir / "libtc_harness.so"
    result = host_compile(["-O2", "-shared", "-fPIC", "-x", "c++", str(PLUGINS / "harness" / "host_harness.cpp"),
                           "-o", str(library)])
    if result.returncode != 0:
        raise AssertionError(f"the host harness does not compile:\n{result.stderr}")
    return library


def cudart_dir() -> Path | None:
    library = wheel_file("nvidia-cuda-runtime-cu12", "lib/libcudart.so.12")
    return None if library is None else library.parent


def build_probe(out_dir: Path, trt: Path, cuda: list[Path]) -> Path:
    """harness/plugin_probe.cpp + the plugin sources + the CPU launchers: the plugins behind TensorRT's interfaces,
    runnable without TensorRT or a GPU (the CUDA runtime is linked only for cudaGetErrorString)."""
    probe = out_dir / "plugin_probe"
    harness = PLUGINS / "harness"
    sources = [harness / "plugin_probe.cpp", harness / "cpu_launch.cpp", *sorted(SOURCES.glob("*.cpp"))]
    runtime = cudart_dir()
    result = host_compile([f"-I{harness}", *map(str, sources), f"-L{runtime}", "-l:libcudart.so.12",
                           f"-Wl,-rpath,{runtime}", "-o", str(probe)], trt, *cuda)
    if result.returncode != 0:
        raise AssertionError(f"the plugin probe does not build against {trt}:\n{result.stderr}")
    return probe


def build_gpu_harness(out_dir: Path, nvcc_path: str) -> Path:
    """harness/gpu_harness.cu + the kernels, with CMakeLists.txt's arithmetic flags. PTX for compute_75 only,
    so the driver JIT-compiles it for whatever GPU runs the test (and no GPU is needed to build it)."""
    library = out_dir / "libtc_gpu.so"
    command = [nvcc_path, "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-fmad=false", "-prec-div=true",
               "-prec-sqrt=true", "-ftz=false", "-gencode=arch=compute_75,code=compute_75", f"-I{KERNELS}",
               f"-I{SOURCES}", str(PLUGINS / "harness" / "gpu_harness.cu"), str(KERNELS / "tome_kernels.cu"),
               str(KERNELS / "prune_kernels.cu"), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise AssertionError(f"the GPU harness does not build:\n{result.stderr}")
    return library


class Nvrtc:
    """The NVRTC C API through ctypes: CUDA source -> PTX, without nvcc or a GPU."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    @classmethod
    def find(cls) -> Nvrtc | None:
        path = wheel_file("nvidia-cuda-nvrtc-cu12", "lib/libnvrtc.so.12")
        return None if path is None else cls(path)

    def version(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        return major.value, minor.value

    def _check(self, status: int) -> None:
        if status != 0:
            raise AssertionError(f"NVRTC: {self.lib.nvrtcGetErrorString(status).decode()}")

    def compile(self, source: Path, options: list[str]) -> tuple[bool, str, str]:
        """(compiled, ptx, log) for one .cu file read as it is."""
        program = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(program), source.read_bytes(), source.name.encode(),
                                                0, None, None))
        try:
            encoded = [option.encode() for option in options]
            array = (ctypes.c_char_p * len(encoded))(*encoded)
            status = self.lib.nvrtcCompileProgram(program, len(encoded), array)
            size = ctypes.c_size_t()
            self._check(self.lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)))
            log = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetProgramLog(program, log))
            if status != 0:
                return False, "", log.value.decode(errors="replace")
            self._check(self.lib.nvrtcGetPTXSize(program, ctypes.byref(size)))
            ptx = ctypes.create_string_buffer(size.value)
            self._check(self.lib.nvrtcGetPTX(program, ptx))
            return True, ptx.value.decode(), log.value.decode(errors="replace")
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(program))
