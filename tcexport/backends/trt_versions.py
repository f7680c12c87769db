"""TensorRT versions and what each one does: TrtVersion, parse_version and the version switches.

Plain functions, testable without TensorRT: strong typing, builder and network-creation flags per precision,
plugin features, parser behaviours, and which kinds of tcexport plugin a version runs (plugin_kinds).

Facts this encodes (see DESIGN.md §5): TensorRT 11 networks are strongly typed and the FP16/BF16/INT8 builder
flags are gone, so reduced precision there means converting the ONNX graph (tcexport.backends.precision). TensorRT 10.x
still has the flags, but they mean "fp16 where faster" and could run the layers that decide which tokens merge
in fp16; so 10.x fp16/bf16 engines are built the same way, strongly typed from the converted graph, and both
lines make the same fp32 decisions. Plugins to load (--plugins) are decided in trt_plugins.py. Python plugins
("quickly deployable plugins") need 10.6, ahead-of-time plugins 10.9, C++ IPluginV3 plugins 10.0; the parser
prefers a registered plugin over a model-local function of the same name from 10.7 and reads the plugin
namespace from the node's domain from 10.10.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tcexport.core.errors import UsageError
from tcexport.methods.plugin import PluginSpec

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True, order=True)
class TrtVersion:
    major: int
    minor: int
    patch: int = 0

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}" + (f".{self.patch}" if self.patch else "")

    def at_least(self, major: int, minor: int = 0) -> bool:
        return (self.major, self.minor) >= (major, minor)


_VERSION_RE = re.compile(r"^\s*(\d+)\.(\d+)(?:\.(\d+))?(?:\.\d+)*(?:[.+-]?[A-Za-z0-9.+-]*)?\s*$")


def parse_version(text: str | TrtVersion) -> TrtVersion:
    """'10.3' / '10.13.3' / '10.3.0.30' (tensorrt.__version__) -> TrtVersion. Only majors 10 and 11 are known."""
    if isinstance(text, TrtVersion):
        return text
    match = _VERSION_RE.match(str(text))
    if not match:
        raise UsageError(f"TensorRT version must look like 10.3 or 10.13.3, got '{text}'")
    version = TrtVersion(int(match.group(1)), int(match.group(2)), int(match.group(3) or 0))
    if version.major not in (10, 11):
        raise UsageError(f"TensorRT {version} is outside what tcexport knows (10.x and 11.x); use one of those")
    return version


def uses_strong_typing(version: str | TrtVersion) -> bool:
    """TensorRT 11 builds strongly typed networks only; 10.x builds weakly typed ones by default."""
    return parse_version(version).major >= 11


def builder_flags(version: str | TrtVersion, precision: str) -> tuple[str, ...]:
    """Names of tensorrt.BuilderFlag members to set: none on any version.

    10.x's FP16/BF16 flags mean "fp16 where faster, fp32 fallback": the score MatMul, TopK and ArgMax that decide
    which tokens merge could then run in fp16, and decisions would differ from 11.x. So reduced precision is built
    the 11.x way on 10.x too: a strongly typed network from the converted graph (converts_graph), whose deciding
    layers tcexport.backends.precision keeps in fp32. A strongly typed network takes no precision flags.
    """
    check_precision(precision)
    parse_version(version)
    return ()


def converts_graph(version: str | TrtVersion, precision: str) -> bool:
    """Whether reduced precision needs the ONNX graph rewritten (tcexport.backends.precision) before parsing: always."""
    parse_version(version)
    return check_precision(precision) != "fp32"


def builds_strongly_typed(version: str | TrtVersion, precision: str) -> bool:
    """11.x: always; 10.x: for fp16/bf16 (from the converted graph), weakly typed fp32 as before."""
    return uses_strong_typing(version) or converts_graph(version, precision)


def network_creation_flags(version: str | TrtVersion, precision: str) -> tuple[str, ...]:
    """tensorrt.NetworkDefinitionCreationFlag members: STRONGLY_TYPED on 10.x reduced precision (11.x networks
    are strongly typed without it; the flag is deprecated there)."""
    if builds_strongly_typed(version, precision) and not uses_strong_typing(version):
        return ("STRONGLY_TYPED",)
    return ()


def supports_python_plugins(version: str | TrtVersion) -> bool:
    return parse_version(version).at_least(10, 6)


def supports_aot_plugins(version: str | TrtVersion) -> bool:
    return parse_version(version).at_least(10, 9)


def prefers_plugin_over_local_function(version: str | TrtVersion) -> bool:
    return parse_version(version).at_least(10, 7)


def reads_plugin_namespace_from_domain(version: str | TrtVersion) -> bool:
    return parse_version(version).at_least(10, 10)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision '{precision}'; choose one of {', '.join(PRECISIONS)}")
    return precision


# --- plugin kinds ------------------------------------------------------------------------------------------------


# Which plugin kinds a TensorRT version runs: C++ IPluginV3 from 10.0 (JetPack 6's 10.3 included), Python
# "quickly deployable" plugins JIT from 10.6, ahead of time (aot_impl, no Python at run time) from 10.9.
CPP_PLUGIN, PYTHON_JIT_PLUGIN, PYTHON_AOT_PLUGIN = "C++ IPluginV3 library", "Python plugin (JIT)", "Python plugin (AOT)"


def plugin_kinds(version: str | TrtVersion, spec: PluginSpec, with_mask: bool = False) -> list[str]:
    """The kinds of tcexport plugin that can run `spec` on TensorRT `version` (the Python ones take no mask)."""
    version = parse_version(version)
    kinds = [CPP_PLUGIN] if spec.cpp else []
    if spec.python_aot and not with_mask:
        if supports_python_plugins(version):
            kinds.append(PYTHON_JIT_PLUGIN)
        if supports_aot_plugins(version):
            kinds.append(PYTHON_AOT_PLUGIN)
    return kinds


__all__ = [
    "builder_flags", "builds_strongly_typed", "check_precision", "converts_graph", "network_creation_flags",
    "parse_version", "plugin_kinds", "prefers_plugin_over_local_function", "reads_plugin_namespace_from_domain",
    "supports_aot_plugins", "supports_python_plugins", "uses_strong_typing",
    "TrtVersion", "CPP_PLUGIN", "PRECISIONS", "PYTHON_AOT_PLUGIN", "PYTHON_JIT_PLUGIN",
]
