"""What a method's TensorRT plugin is called and which fields it takes: part of the method's spec.

`--impl function` and `--impl plugin` write one node per compressed block whose op type is the method's plugin
name (domain and plugin namespace "tcexport"). TensorRT's ONNX parser maps such a node to a registered plugin by
op type, `plugin_version` and `plugin_namespace`, and passes it only the INT32 fields its creator declares.
The backends read these specs (which kinds of plugin a TensorRT version runs is theirs to decide); the graph
rewriter writes the node attributes from them. Nothing here imports a backend.
"""

from __future__ import annotations

from dataclasses import dataclass

PLUGIN_DOMAIN = "tcexport"


@dataclass(frozen=True)
class PluginSpec:
    """A TensorRT plugin that stands in for a tcexport op (ONNX node op_type == name, domain == namespace)."""

    name: str
    namespace: str = PLUGIN_DOMAIN
    version: str = "1"
    description: str = ""
    # tcexport's Python plugin has both a JIT (impl) and an AOT (aot_impl) implementation: the ONNX parser then
    # needs the node attribute `aot` (or a PREFER_AOT/PREFER_JIT network flag) to choose one.
    python_aot: bool = False
    # The INT32 fields its creator declares, in order: the ONNX parser passes only these.
    fields: tuple[str, ...] = ()
    cpp: bool = False  # implemented in plugins/cpp (libtcexport_plugins.so, IPluginV3)
    # implemented as an ONNX Runtime custom op (plugins/ort, tcexport/plugins/_ort_ops*.so): CPU kernels
    ort: bool = False

    @property
    def implemented(self) -> bool:
        """Whether an implementation exists (TensorRT C++ or Python, or ONNX Runtime): what `--impl plugin` can
        emit."""
        return self.cpp or self.python_aot or self.ort


def default_op_type(method: str) -> str:
    """The op type of a method that names no plugin: Token<Name>; never the name of an ONNX op."""
    return "Token" + "".join(part.capitalize() for part in method.replace("-", "_").split("_"))


def plugin_choice_attributes(spec: PluginSpec) -> dict[str, int]:
    """INT node attributes that pick the implementation: aot=1 (no Python at run time) where both exist.

    A C++ IPluginV3 creator does not declare `aot`, so the parser never passes it to one (only declared fields
    reach a plugin); for a Python plugin with impl and aot_impl the parser fails without it or a network flag.
    """
    return {"aot": 1} if spec.python_aot else {}


def plugin_node_attributes(spec: PluginSpec) -> dict[str, str]:
    """Attributes an ONNX node needs so TensorRT's parser maps it to `spec`'s plugin.

    The namespace goes in `plugin_namespace` as well as the node domain: before 10.10 the parser ignores the domain.
    """
    return {"plugin_namespace": spec.namespace, "plugin_version": spec.version}
