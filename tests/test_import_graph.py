"""No import cycles in covid_plugin/ or training/, lazy (function-level) imports included.

A cycle hidden by an import inside a function still ties two modules together: neither can be
understood, tested or moved without the other, and the import order decides whether a name
exists yet. The graph is built statically (ast over every file), so an import that only runs on
one code path, or only under `TYPE_CHECKING`, counts the same as one at the top of a module.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("covid_plugin", "training")

# Cycles that pass through files other engineers own this session; each entry names the
# cycle as the sorted tuple of its modules. Empty: no known cycle is tolerated.
ALLOWED_CYCLES: set[tuple[str, ...]] = set()

# The node's own machinery: receiving, queueing, running jobs, sending, the commands.
NODE = ("covid_plugin.worker", "covid_plugin.service", "covid_plugin.node", "covid_plugin.store",
        "covid_plugin.series", "covid_plugin.observability", "covid_plugin.cli",
        "covid_plugin.demo", "covid_plugin.oneshot")
# Layers: a package (left) never imports these (right). The analysis (models, pipelines,
# writers) knows nothing of how a series reached the node or how its results leave, so a
# pipeline runs the same under the worker, `covid-plugin run` and a test.
LAYERS: dict[str, tuple[str, ...]] = {
    "covid_plugin.pipelines": NODE,
    "covid_plugin.outputs": NODE,
    "covid_plugin.ml": (*NODE, "covid_plugin.pipelines", "covid_plugin.outputs"),
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES
            for p in sorted((REPO / package).rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of our modules (None: a third party)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every project module `module` imports, wherever in the file the import statement sits."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import sub` is an import of the submodule pkg.sub when there is one,
            # else of a name defined in pkg (as in grimp: a package's __init__ is not counted
            # as imported by every module that reaches a sibling through it)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                found.add(resolved)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[tuple[str, ...]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def layer_violations(graph: dict[str, set[str]],
                     layers: dict[str, tuple[str, ...]]) -> list[str]:
    """Every import that crosses a layer the wrong way, as 'importer -> imported'."""
    return sorted(f"{module} -> {target}"
                  for module, imported in graph.items()
                  for package, forbidden in layers.items() if _within(module, package)
                  for target in imported if any(_within(target, f) for f in forbidden))


def test_the_graph_sees_the_project():
    graph = import_graph()
    assert "covid_plugin.worker" in graph and "training.__main__" in graph
    assert "covid_plugin.ml.spec" in graph["covid_plugin.ml.cxr"]


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [("a", "b", "c")]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_are_edges(tmp_path: Path):
    source = "def f():\n    from training import metrics\n"
    path = tmp_path / "x.py"
    path.write_text(source)
    modules = {"training.x": path, "training.metrics": path, "training": path}
    assert _imports("training.x", path, modules) == {"training.metrics"}


def test_no_import_cycles():
    found = set(cycles(import_graph()))
    unexpected = sorted(found - ALLOWED_CYCLES)
    assert not unexpected, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in unexpected)


def test_model_packages_share_only_through_common():
    """training/<model>/ imports its own package and training/common/, never another model's."""
    crossing = []
    for module, imported in import_graph().items():
        parts = module.split(".")
        if parts[0] != "training" or len(parts) < 3 or parts[1] == "common":
            continue
        allowed = (f"training.{parts[1]}.", "training.common.")
        crossing += [f"{module} -> {target}" for target in sorted(imported)
                     if target.startswith("training.") and not target.startswith(allowed)]
    assert not crossing, "\n".join(crossing)


def _function_level_imports(path: Path) -> list[ast.stmt]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node for func in ast.walk(tree)
            if isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(func) if isinstance(node, ast.Import | ast.ImportFrom)]


def test_training_imports_inside_functions_say_why():
    """In training/, an import inside a function is only for a heavy optional dependency, and
    the comment line above it says so (`# lazy: ...`); anything else belongs at the top."""
    unexplained = []
    for path in sorted((REPO / "training").rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in _function_level_imports(path):
            above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
            if not above.startswith("# lazy:"):
                unexplained.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not unexplained, "function-level imports without a `# lazy:` reason: " + ", ".join(
        unexplained)


@pytest.mark.parametrize("module", sorted(m for m in _modules() if m.startswith("training.")))
def test_every_training_module_imports(module: str):
    """The graph is static; this proves each moved module's imports resolve (most are not
    exercised by a training test: compare, the cxr-lung teacher path, the CT benchmark)."""
    importlib.import_module(module)


def test_the_layer_check_finds_an_import_of_the_worker():
    graph = {"covid_plugin.pipelines.ct": {"covid_plugin.worker", "covid_plugin.findings"},
             "covid_plugin.pipelinesx": {"covid_plugin.worker"},
             "covid_plugin.worker": {"covid_plugin.pipelines.ct"}}
    assert layer_violations(graph, LAYERS) == ["covid_plugin.pipelines.ct -> covid_plugin.worker"]


def test_layers_are_kept():
    """pipelines/, outputs/ and ml/ import nothing of the node (worker, node/, store/ ...),
    and ml/ nothing of the pipelines or writers that use it."""
    violations = layer_violations(import_graph(), LAYERS)
    assert not violations, "imports against the layers:\n" + "\n".join(violations)
