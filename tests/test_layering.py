"""The package's layering, enforced: no import cycle between modules, and no import from a lower layer into a
higher one (graph/ and methods/ never reach a backend). Imports inside functions count too (grimp reads every
import statement), so a lazy import cannot hide a cycle."""

from __future__ import annotations

import grimp
import pytest

# Highest first. A module may import from its own layer's package and from any layer below it; packages in one
# line are independent of each other.
LAYERS = (
    "tcexport.cli",
    "tcexport.tune",
    "tcexport.pipeline",
    "tcexport.recipes",
    "tcexport.bench",
    "tcexport.validate | tcexport.export",
    "tcexport.generation",
    "tcexport.backends",
    "tcexport.plugins",
    "tcexport.compress",
    "tcexport.reference",
    "tcexport.graph",
    "tcexport.methods",
    "tcexport.models | tcexport.data",
    "tcexport.core",
)


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("tcexport", cache_dir=None)


def _layers():
    return [grimp.Layer(*(part.strip() for part in line.split("|")), independent=True) for line in LAYERS]


def cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in sorted(graph.modules)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in edges:
        if module not in index:
            visit(module)
    return found


def test_every_subpackage_has_a_layer(graph):
    listed = {part.strip() for line in LAYERS for part in line.split("|")}
    top = {m for m in graph.find_children("tcexport")}
    assert top - listed == set(), "a new top-level module or package needs a place in LAYERS"


def test_no_import_cycle(graph):
    assert cycles(graph) == []


def test_no_import_goes_up_a_layer(graph):
    illegal = graph.find_illegal_dependencies_for_layers(layers=_layers())
    assert [f"{d.importer} -> {d.imported}" for d in illegal] == []


def test_graph_and_methods_never_import_a_backend(graph):
    for low in ("tcexport.graph", "tcexport.methods"):
        for high in ("tcexport.backends", "tcexport.plugins"):
            assert not graph.chain_exists(importer=low, imported=high, as_packages=True), f"{low} -> {high}"


def test_the_checks_catch_what_they_are_for():
    """Cycle and layer checks on a graph with a planted cycle and an upward import."""
    planted = grimp.ImportGraph()
    for module in ("tcexport", "tcexport.core", "tcexport.core.a", "tcexport.graph", "tcexport.graph.b",
                   "tcexport.backends", "tcexport.backends.c"):
        planted.add_module(module)
    planted.add_import(importer="tcexport.graph.b", imported="tcexport.backends.c")  # upward
    planted.add_import(importer="tcexport.core.a", imported="tcexport.graph.b")  # upward, and ...
    planted.add_import(importer="tcexport.graph.b", imported="tcexport.core.a")  # ... a cycle
    assert cycles(planted) == [["tcexport.core.a", "tcexport.graph.b"]]
    illegal = planted.find_illegal_dependencies_for_layers(layers=_layers(), containers=set())
    assert {(d.importer, d.imported) for d in illegal} == {("tcexport.graph", "tcexport.backends"),
                                                           ("tcexport.core", "tcexport.graph")}
