"""tcexport's ONNX Runtime custom-op library: where it is, registering it, and the one line when it is missing.

`pip install` builds `tcexport/plugins/_ort_ops*.so` from `plugins/ort/tcexport_ort_ops.cpp` (setup.py) when it
finds ONNX Runtime's C API headers ($ORT_INCLUDE_DIR, else ../shared/onnxruntime-include). The library holds
CPU kernels for the --impl plugin nodes (domain tcexport: ToMeMerge, TokenPrune, TokenPruneMerge), computed by
the per-row code the TensorRT plugins run (plugins/cpp/kernels/*_rows.h), so plugin graphs run, validate and
bench on ONNX Runtime too. $TCEXPORT_ORT_OPS_LIBRARY names another build of it (`none`: use none).

Every session tcexport opens for a graph with plugin-only nodes registers it (backends/ort.py session_options and
open_session); graphs without such nodes never load it, so an --impl function graph still runs its own bodies.
No onnxruntime import here: the caller passes its SessionOptions.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
import weakref
from pathlib import Path

from tcexport.core.errors import UsageError

DOMAIN = "tcexport"
OPS = ("ToMeMerge", "TokenPrune", "TokenPruneMerge")  # what plugins/ort/tcexport_ort_ops.cpp registers
LIBRARY_ENV = "TCEXPORT_ORT_OPS_LIBRARY"
HEADERS_ENV = "ORT_INCLUDE_DIR"
STEM = "_ort_ops"
HOW_TO_GET = (f"it is built by pip install from ONNX Runtime's C API headers (onnxruntime_c_api.h): get the include/ "
              "folder of the ONNX Runtime release archive (github.com/microsoft/onnxruntime/releases, "
              f"onnxruntime-linux-x64-VERSION.tgz), set {HEADERS_ENV} to it and reinstall tcexport "
              "(pip install -e .)")


def library_path() -> Path | None:
    """The library file: $TCEXPORT_ORT_OPS_LIBRARY, else the one pip install built into this package, else None.

    TCEXPORT_ORT_OPS_LIBRARY=none: as if no library were built (what an install without headers sees)."""
    configured = os.environ.get(LIBRARY_ENV)
    if configured and configured.lower() == "none":
        return None
    if configured:
        return Path(configured)
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = here / f"{STEM}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def plugin_only_ops(model) -> list[str]:
    """op_types of tcexport-domain nodes with no model-local function behind them (--impl plugin), sorted."""
    local = {(f.domain, f.name) for f in model.functions}
    return sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN and (n.domain, n.op_type) not in local})


def missing_reason() -> str | None:
    """Why the library cannot be used (one clause), or None when it can."""
    path = library_path()
    if path is None:
        return "tcexport's ONNX Runtime op library is not installed (" + HOW_TO_GET + ")"
    if not path.is_file():
        return f"tcexport's ONNX Runtime op library {path} (${LIBRARY_ENV}) does not exist"
    return None


def require(model, where: str | object) -> list[str]:
    """The plugin-only ops of `model`, after checking that the library runs them all (UsageError otherwise)."""
    ops = plugin_only_ops(model)
    if not ops:
        return ops
    named = ", ".join(f"{DOMAIN}::{op}" for op in ops)
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        raise UsageError(f"{where} holds plugin nodes ({named}) that have no ONNX Runtime kernel (tcexport's op "
                         f"library implements {', '.join(OPS)}); build it with --backend trt, or compress with "
                         "--impl function for a graph both run")
    reason = missing_reason()
    if reason:
        raise UsageError(f"{where} holds --impl plugin nodes ({named}) and {reason}; or compress with --impl "
                         "function, which ONNX Runtime runs without it")
    _check_loads(str(library_path()))
    return ops


@functools.lru_cache(maxsize=None)
def _check_loads(path: str) -> None:
    """Register the library once on throw-away options, so a library ONNX Runtime refuses is one clear line."""
    import onnxruntime as ort

    try:
        ort.SessionOptions().register_custom_ops_library(path)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types; the user needs one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UsageError(f"ONNX Runtime {ort.__version__} cannot load tcexport's op library {path}: {first}; "
                         f"rebuild it (pip install -e . with {HEADERS_ENV} set)") from None


_REGISTERED: weakref.WeakSet = weakref.WeakSet()  # options that hold the library (twice fails the session)


def register(options) -> str:
    """Register the library on `options` (an onnxruntime.SessionOptions) once; returns its path. Call require()
    first."""
    path = library_path()
    if path is None or not path.is_file():
        raise UsageError(missing_reason() or "tcexport's ONNX Runtime op library is missing")
    if options not in _REGISTERED:
        options.register_custom_ops_library(str(path))
        _REGISTERED.add(options)
    return str(path)


def record() -> dict:
    """What a build sidecar says about the library it registered: path and sha256."""
    import hashlib

    path = library_path()
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path and path.is_file() else None
    return {"library": str(path) if path else None, "sha256": digest, "ops": list(OPS)}
