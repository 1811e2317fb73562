"""The package's layers: nothing imports upward (README, Design).

core · numerics · models · data  <-  methods · concepts  <-  metrics · reports  <-  runners  <-  study · cli
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
    "concepts": {"core", "numerics", "models", "data"},
    "metrics": {"core", "numerics", "models", "data", "methods"},
    "reports": {"core", "numerics", "models", "data", "methods", "concepts", "metrics"},
    "runners": {"core", "numerics", "models", "data", "methods", "concepts", "metrics", "reports"},
    "study": {"core", "numerics", "models", "data", "concepts", "reports"},
    "cli": {"core", "numerics", "models", "data", "methods", "concepts", "metrics", "reports", "runners", "study"},
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
    module.write_text("def f():\n    from convlens.cli.main import app\n    import convlens.study.app\n")
    assert _imported_packages(module) == {"cli", "study"}
