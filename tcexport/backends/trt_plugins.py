"""Which TensorRT plugins a build loads (--plugins auto|none|python|PATH.so), loading them, and the sidecar record.

Decisions are plain functions (tested without TensorRT); load() is the only part that touches tensorrt, and
trt_build.py calls it before parsing (build), trt_engine.py before deserializing (validate, bench). Version
switches come from trt_versions.py.

- `none`: load nothing. A graph with plugin-only nodes (--impl plugin) then cannot parse: refused up front.
- `auto`: plugins only when the graph has plugin-only nodes; --impl function graphs (their bodies inline) and
  subgraph graphs load nothing. It takes the C++ library when one is found ($TCEXPORT_PLUGIN_LIBRARY, else
  plugins/cpp/build/libtcexport_plugins.so of this checkout), else the Python plugins where TensorRT has them.
- `python`: tcexport.plugins.python (tensorrt.plugin; TensorRT >= 10.6, AOT >= 10.9).
- `PATH.so`: the C++ IPluginV3 library (TensorRT >= 10.0, JetPack 6's 10.3 included), through
  trt.get_plugin_registry().load_library.

From TensorRT 10.15 a registered plugin overrides a model-local function only when the node has
plugin_namespace (tcexport's nodes do) or the parser flag kENABLE_PLUGIN_OVERRIDE is set: tcexport sets the
flag whenever it loads plugins on 10.15+, so --impl function graphs run the plugin too.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from tcexport import __version__
from tcexport.backends.trt_versions import parse_version, supports_aot_plugins, supports_python_plugins
from tcexport.core.errors import UsageError

NONE, AUTO, PYTHON = "none", "auto", "python"
LIBRARY_ENV = "TCEXPORT_PLUGIN_LIBRARY"
DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / "plugins" / "cpp" / "build" / "libtcexport_plugins.so"
DOMAIN = "tcexport"


@dataclass(frozen=True)
class PluginLoad:
    """What to load: kind "none", "library" (path) or "python"."""

    kind: str
    path: str | None = None
    reason: str = ""
    versions: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        data = asdict(self)
        if self.kind == "library" and self.path and Path(self.path).is_file():
            from tcexport.backends.ort import file_sha256

            data["sha256"] = file_sha256(self.path)
        return data


def plugin_only_ops(model: onnx.ModelProto) -> list[str]:
    """op_types of tcexport-domain nodes with no model-local function behind them (--impl plugin)."""
    local = {(f.domain, f.name) for f in model.functions}
    return sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN and (n.domain, n.op_type) not in local})


def masked_plugin_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of plugin nodes that pass a mask (a 4th input): the Python plugins take the 3-input form only."""
    return [n.name for n in model.graph.node if n.domain == DOMAIN and len(n.input) > 3]


def numpy_breaks_python_plugins(trt_version, numpy_version: str) -> bool:
    """TensorRT 10.13 up to 11.3 parse Python plugin fields with int() on a 1-element array, which NumPy >= 2.4
    refuses (TypeError: only 0-dimensional arrays can be converted); fixed in TensorRT 11.4."""
    version = parse_version(trt_version)
    parts = (numpy_version.split(".") + ["0"])[:2]
    numpy_major_minor = (int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0))
    return version.at_least(10, 13) and not version.at_least(11, 4) and numpy_major_minor >= (2, 4)


def find_library() -> Path | None:
    configured = os.environ.get(LIBRARY_ENV)
    if configured:
        return Path(configured)
    return DEFAULT_LIBRARY if DEFAULT_LIBRARY.is_file() else None


def choose(choice: str, model: onnx.ModelProto, trt_version, numpy_version: str | None = None,
           library: Path | None = None) -> PluginLoad:
    """The plugins a build of `model` on TensorRT `trt_version` loads for --plugins `choice`."""
    version = parse_version(trt_version)
    ops = plugin_only_ops(model)
    choice = str(choice or AUTO)
    if choice == NONE:
        if ops:
            raise UsageError(f"the graph holds TensorRT plugin nodes ({', '.join(ops)}, --impl plugin), so "
                             "--plugins none cannot build it; use --plugins auto, python or PATH.so")
        return PluginLoad(NONE, reason="--plugins none")
    if choice == AUTO:
        if not ops:
            return PluginLoad(NONE, reason="auto: no plugin-only nodes in the graph")
        found = library if library is not None else find_library()
        if found is not None:
            return _library(found, version, "auto: the graph has plugin nodes; C++ plugin library found")
        if supports_python_plugins(version):
            return _python(model, version, numpy_version, "auto: the graph has plugin nodes; no C++ library found "
                                                          f"(set {LIBRARY_ENV}), using the Python plugins")
        raise UsageError(f"the graph holds TensorRT plugin nodes ({', '.join(ops)}) and TensorRT {version} has no "
                         f"Python plugins (10.6+): build plugins/cpp and pass --plugins PATH.so (or set "
                         f"{LIBRARY_ENV}), or compress with --impl subgraph")
    if choice == PYTHON:
        return _python(model, version, numpy_version, "--plugins python")
    return _library(Path(choice), version, f"--plugins {choice}")


def _library(path: Path, version, reason: str) -> PluginLoad:
    if path.suffix not in (".so", ".dll") and ".so." not in path.name:
        raise UsageError(f"--plugins takes auto, none, python or a plugin library PATH.so, got '{path}'")
    if not path.is_file():
        raise UsageError(f"plugin library {path}: no such file; build it with cmake in plugins/cpp "
                         "(docs/deploy-jetson.md) or pass its path")
    return PluginLoad("library", str(path.resolve()), reason, {"tensorrt": str(version)})


def _python(model: onnx.ModelProto, version, numpy_version: str | None, reason: str) -> PluginLoad:
    if not supports_python_plugins(version):
        raise UsageError(f"TensorRT {version} has no Python plugins (10.6+; ahead-of-time 10.9+): use the C++ "
                         "plugin library (--plugins PATH.so), which runs from TensorRT 10.0")
    if numpy_version is None:
        import numpy

        numpy_version = numpy.__version__
    if numpy_breaks_python_plugins(version, numpy_version):
        raise UsageError(f"TensorRT {version}'s Python plugins cannot read their fields with NumPy {numpy_version} "
                         "(fixed in TensorRT 11.4): pip install 'numpy<2.4', or use the C++ plugin library")
    masked = masked_plugin_nodes(model)
    if masked:
        raise UsageError(f"plugin node {masked[0]} passes a mask, which tcexport's Python plugins do not take "
                         "(vision form only): use the C++ plugin library (--plugins PATH.so)")
    versions = {"tensorrt": str(version), "numpy": numpy_version, "tcexport": __version__}
    try:
        import triton

        from tcexport.plugins import aot

        versions |= {"triton": triton.__version__, "ptx_isa": f"{aot.PTX_VERSION // 10}.{aot.PTX_VERSION % 10}",
                     "aot": supports_aot_plugins(version)}
    except ImportError:
        pass
    return PluginLoad(PYTHON, "tcexport.plugins.python", reason, versions)


def parser_flags(trt_version, load: PluginLoad) -> tuple[str, ...]:
    """tensorrt.OnnxParserFlag members to set: ENABLE_PLUGIN_OVERRIDE (10.15+) when plugins are loaded."""
    if load.kind != NONE and parse_version(trt_version).at_least(10, 15):
        return ("ENABLE_PLUGIN_OVERRIDE",)
    return ()


def from_sidecar(sidecar: dict) -> PluginLoad:
    """The plugins an engine was built with, to load again before deserializing it (sha256 checked)."""
    record = (sidecar or {}).get("plugins") or {}
    kind = record.get("kind", NONE)
    if kind == "library":
        path = Path(record.get("path") or "")
        if not path.is_file():
            raise UsageError(f"the engine was built with the plugin library {path}, which is missing; rebuild the "
                             "engine or put the library back")
        from tcexport.backends.ort import file_sha256

        expected = record.get("sha256")
        if expected and file_sha256(path) != expected:
            raise UsageError(f"plugin library {path} changed since the engine was built (sha256 differs); rebuild "
                             "the engine with 'tcexport build --backend trt'")
        return PluginLoad("library", str(path), "as built", record.get("versions", {}))
    if kind == PYTHON:
        return PluginLoad(PYTHON, record.get("path"), "as built", record.get("versions", {}))
    return PluginLoad(NONE, reason="as built")


def load(load_: PluginLoad, trt) -> None:
    """Register the plugins with TensorRT (the only part that needs tensorrt)."""
    if load_.kind == "library":
        registry = trt.get_plugin_registry()
        if registry.load_library(load_.path) is None:
            raise UsageError(f"TensorRT could not load the plugin library {load_.path} (built against another "
                             "TensorRT or CUDA?); rebuild it against this TensorRT")
    elif load_.kind == PYTHON:
        try:
            import tcexport.plugins.python  # noqa: F401  (registers on import)
        except ImportError as exc:
            raise UsageError(f"tcexport's Python plugins need tensorrt.plugin, torch and triton: {exc}") from None
