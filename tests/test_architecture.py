"""The layers of docs/ARCHITECTURE.md, read from the imports: every import of a tailor_ui
module points down the table (or stays within its own layer), and there is no circle.

Deferred imports (inside functions, kept for start-up speed) count like any other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# top to bottom, as in docs/ARCHITECTURE.md; a module belongs to the first prefix it matches
LAYERS: list[tuple[str, ...]] = [
    ("tailor_ui.app.ui",),
    ("tailor_ui.app.service",),
    ("tailor_ui.app.gpu", "tailor_ui.app.jobs", "tailor_ui.app.workers", "tailor_ui.app.session",
     "tailor_ui.app.plots"),
    ("tailor_ui.app",),
    # the library and its command line: nothing below this line imports tailor_ui.app
    ("tailor_ui.cli", "tailor_ui.__main__"),
    ("tailor_ui.demo",),
    ("tailor_ui.model_card", "tailor_ui.hub", "tailor_ui.outputs"),
    ("tailor_ui.training", "tailor_ui.evaluation"),
    ("tailor_ui.stream", "tailor_ui.pair_stream"),
    ("tailor_ui.engine",),
    ("tailor_ui.routing",),
    ("tailor_ui.settings", "tailor_ui.calibration", "tailor_ui.methods"),
    ("tailor_ui.pair",),
    ("tailor_ui.patch", "tailor_ui.checkpoint", "tailor_ui.adapter", "tailor_ui.adapter_fit",
     "tailor_ui.data", "tailor_ui.prompts", "tailor_ui.memory"),
    ("tailor_ui.errors", "tailor_ui.control", "tailor_ui.names", "tailor_ui.weights", "tailor_ui.io",
     "tailor_ui.gram"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _target(module: str, name: str) -> str:
    """`from module import name` imports the submodule module.name where one exists."""
    candidate = f"{module}.{name}"
    as_file = ROOT / (candidate.replace(".", "/") + ".py")
    as_package = ROOT / candidate.replace(".", "/") / "__init__.py"
    return candidate if as_file.exists() or as_package.exists() else module


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted((ROOT / "tailor_ui").rglob("*.py")):
        targets = graph.setdefault(_module_name(path), set())
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tailor_ui"):
                targets.update(_target(node.module, a.name) for a in node.names)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name.startswith("tailor_ui"))
    return graph


def layer_of(module: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of the table: add it where it belongs")


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_layer():
    for module in import_graph():
        if module != "tailor_ui":
            layer_of(module)


def test_imports_point_down_only():
    upward = [f"{m} imports {t}" for m, targets in import_graph().items() if m != "tailor_ui"
              for t in targets if t != "tailor_ui" and layer_of(t) < layer_of(m)]
    assert upward == []


def test_the_library_and_the_cli_import_nothing_of_the_app():
    app = [m for m in import_graph() if m == "tailor_ui.app" or m.startswith("tailor_ui.app.")]
    assert app, "the app package moved: update this test"
    reaching = [f"{m} imports {t}" for m, targets in import_graph().items() if m not in app
                for t in targets if t in app or t.startswith("tailor_ui.app.")]
    assert reaching == []


def test_no_import_circles():
    assert circles(import_graph()) == []


def test_the_checks_catch_what_they_look_for():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer_of("tailor_ui.app.ui.tailor") < layer_of("tailor_ui.engine") < layer_of("tailor_ui.errors")
