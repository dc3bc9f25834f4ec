"""The package's layers (docs/architecture.md): imports run one way, front ends to values.

Each package of ``gateway`` may import only the packages below it. A new module
that reaches upwards (the engine importing HTTP, values importing the engine)
fails here, before it becomes a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gateway"

#: what each part of the package may import of the gateway, besides itself
ALLOWED: dict[str, set[str]] = {
    "_errors": set(),
    "_settings": set(),
    "_build": set(),
    "embedded": set(),
    "values": {"_errors"},
    "catalog": {"values", "_errors"},
    "engine": {"values", "_errors", "_settings"},
    "web": {"engine", "catalog", "values", "_errors", "_settings"},
    "cli": {"web", "engine", "catalog", "values", "embedded", "_errors", "_settings", "_build"},
}


def _part_of(module: str) -> str:
    """The layer a dotted module below ``gateway`` belongs to."""
    return module.split(".")[0]


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found.append((".".join(parts), path))
    return found


def _imported(module: str, path: Path) -> set[str]:
    """The modules below ``gateway`` that `module`'s source imports, anywhere in it."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, *([node.module] if node.module else [])])
                alone = [f"{name}.{alias.name}".strip(".") for alias in node.names]
                names = [name] if node.module else alone
            elif node.module and node.module.startswith("gateway."):
                names = [node.module.removeprefix("gateway.")]
            else:
                continue
            targets.update(n for n in names if n)
        elif isinstance(node, ast.Import):
            targets.update(
                a.name.removeprefix("gateway.") for a in node.names if a.name.startswith("gateway.")
            )
    return targets


def test_every_part_of_the_package_has_a_layer() -> None:
    parts = {_part_of(module) for module, _ in _modules() if module}
    assert parts - {"__main__"} <= set(ALLOWED), parts - set(ALLOWED)


@pytest.mark.parametrize(("module", "path"), [m for m in _modules() if m[0] and m[0] != "__main__"])
def test_imports_run_one_way(module: str, path: Path) -> None:
    own = _part_of(module)
    allowed = ALLOWED[own] | {own}
    reaching = sorted(t for t in _imported(module, path) if _part_of(t) not in allowed)
    assert not reaching, f"{module} imports {reaching}: {own} may import only {sorted(allowed)}"


def test_each_package_says_what_it_owns_and_may_import() -> None:
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        where = f"{init.parent.name}/__init__.py"
        assert doc and "import" in doc.lower(), f"{where}: say what it owns and may import"
