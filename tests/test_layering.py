"""The package's layers: nothing imports upward (README, Design).

core · numerics · models · data  <-  methods · inv · labels · tcav  <-  metrics · reports  <-  runners
    <-  study · crowd · cli
"""

from __future__ import annotations

import ast
from pathlib import Path

import convlens

PACKAGE = Path(convlens.__file__).parent
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "numerics": {"core"},
    "models": {"core"},
    "data": {"core", "models"},
    "methods": {"core", "numerics", "models"},
    "inv": {"core", "numerics", "models", "data"},
    "labels": {"core", "numerics"},
    "tcav": {"core", "numerics", "models", "data", "inv", "labels"},
    "metrics": {"core", "numerics", "models", "data", "methods"},
    "reports": {"core", "numerics", "models", "data", "methods", "inv", "labels", "tcav", "metrics"},
    "runners": {"core", "numerics", "models", "data", "methods", "inv", "metrics", "reports"},
    "study": {"core", "inv", "labels"},
    "crowd": {"core", "inv", "labels", "study"},
    "cli": {"core", "numerics", "models", "data", "methods", "inv", "labels", "tcav", "metrics", "reports", "runners",
            "study", "crowd"},
}


def _imported_packages(path: Path) -> set[str]:
    """convlens sub-packages imported anywhere in ``path`` (also inside functions: lazy imports count)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "convlens" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_package_is_in_the_layer_table() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(ALLOWED)


def test_nothing_imports_upward() -> None:
    violations = []
    for package, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / package).rglob("*.py")):
            for imported in _imported_packages(path) - allowed - {package}:
                violations.append(f"{path.relative_to(PACKAGE)} imports convlens.{imported}")
    assert not violations, "\n".join(violations)


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from convlens.cli.main import app\n    import convlens.study.web.app\n")
    assert _imported_packages(module) == {"cli", "study"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside ``if TYPE_CHECKING:`` blocks (imports for annotations only: not run)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def module_imports() -> dict[str, set[str]]:
    """convlens module -> the convlens modules it imports anywhere (lazy imports too; not TYPE_CHECKING ones).

    ``from convlens.x import name`` counts as importing ``convlens.x.name`` when that is a module, else
    ``convlens.x``; a package's ``__init__`` is its own node."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        found: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    found.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_import_cycles() -> None:
    """No two modules import each other, directly or around a loop, not even through a lazy import."""
    graph = module_imports()
    # package __init__s that re-export lazily by name strings do not import their modules: no edges to drop
    assert not _cycles(graph), "\n".join(" <-> ".join(c) for c in _cycles(graph))


def test_the_cycle_check_finds_a_lazy_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
