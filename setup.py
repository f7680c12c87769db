"""Build hook: tcexport's ONNX Runtime custom-op library (plugins/ort), compiled during `pip install`.

Everything else about the package is in pyproject.toml. The library (tcexport/plugins/_ort_ops*.so: the
--impl plugin ops ToMeMerge, TokenPrune, TokenPruneMerge for ONNX Runtime's CPU provider) needs ONNX Runtime's
C API header onnxruntime_c_api.h, which no Python package ships. It is looked for in

    $ORT_INCLUDE_DIR                       (the include/ folder of an ONNX Runtime release archive, or above it)
    ../shared/onnxruntime-include          (next to the checkout: development machines and CI)

each either holding the header, or include/ with it, or version folders with include/ (the newest is taken).
TCEXPORT_BUILD_ORT_OPS=0 skips it (a py3-none-any wheel to carry to another machine, such as a Jetson).
Found: the library is built (g++ or the compiler Python was built with, C++17, -O3) against it and nothing
else, no ONNX Runtime library is linked. Not found, or the compiler fails: the package installs without it, and
`--impl plugin` on ONNX Runtime says so in one line (tcexport/plugins/ort_library.py).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
HEADER = "onnxruntime_c_api.h"
SOURCE = "plugins/ort/tcexport_ort_ops.cpp"
KERNELS = "plugins/cpp/kernels"
ENV = "ORT_INCLUDE_DIR"
SKIP_ENV = "TCEXPORT_BUILD_ORT_OPS"
LIBRARY = "tcexport.plugins._ort_ops"


def _say(message: str) -> None:
    print(f"tcexport build: {message}", file=sys.stderr)


def _version_key(path: Path) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", path.name)) or (0,)


def header_dir(candidate: Path) -> Path | None:
    """The folder holding onnxruntime_c_api.h at `candidate`, candidate/include or candidate/*/include."""
    if not candidate.is_dir():
        return None
    for folder in (candidate, candidate / "include"):
        if (folder / HEADER).is_file():
            return folder
    versions = sorted((p for p in candidate.iterdir() if (p / "include" / HEADER).is_file()), key=_version_key)
    return versions[-1] / "include" if versions else None


def find_headers() -> tuple[Path | None, str]:
    """(folder with the header, where it came from) or (None, why not)."""
    tried = []
    configured = os.environ.get(ENV)
    if configured:
        found = header_dir(Path(configured).expanduser())
        if found:
            return found, f"${ENV}"
        tried.append(f"${ENV}={configured}")
    shared = ROOT.parent / "shared" / "onnxruntime-include"
    found = header_dir(shared)
    if found:
        return found, "../shared/onnxruntime-include"
    tried.append(str(shared))
    return None, f"no {HEADER} in {' or '.join(tried)}"


class BuildOrtOps(build_ext):
    """build_ext that never fails the install: a library it cannot build is left out, with the reason."""

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001 - compiler errors come as several types; the install goes on
            _say(f"the ONNX Runtime op library was not built ({type(exc).__name__}: {exc}); "
                 "the package installs without it")


def extensions() -> list[Extension]:
    if not (ROOT / SOURCE).is_file():
        return []
    if os.environ.get(SKIP_ENV) == "0":  # a pure-Python wheel for another machine (Jetson: pip wheel on a PC)
        _say(f"{SKIP_ENV}=0: the ONNX Runtime op library is not built")
        return []
    include, origin = find_headers()
    if include is None:
        _say(f"{origin}: the ONNX Runtime op library (--impl plugin on ONNX Runtime) is not built; set {ENV} to "
             "the include/ folder of an ONNX Runtime release archive and reinstall to build it")
        return []
    _say(f"building the ONNX Runtime op library against {include} ({origin})")
    return [Extension(
        LIBRARY,
        sources=[SOURCE],
        include_dirs=[str(include), KERNELS],
        depends=[str(p.relative_to(ROOT)) for p in sorted((ROOT / KERNELS).glob("*.h"))],
        language="c++",
        # IEEE arithmetic (no contraction into FMA), as the host harness and the kernels are compiled; only
        # RegisterCustomOps and the name list are exported.
        extra_compile_args=["-std=c++17", "-O3", "-ffp-contract=off", "-fvisibility=hidden",
                            "-fvisibility-inlines-hidden", "-Wall", "-Wextra"],
        extra_link_args=["-fvisibility=hidden"],
        optional=True,
    )]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildOrtOps})
