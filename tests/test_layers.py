"""Dependencies point one way, as docs/ARCHITECTURE.md draws them (SPEC section 10).

Parses every module's imports (``ast``, nothing is executed) and checks each part
imports only the parts the ``imports`` table of docs/ARCHITECTURE.md allows; the table
itself must be acyclic and name every part of the package. Also: ``import
penwatch.<subpackage>`` gives the subpackage (no public name shadows one).
"""

import ast
import importlib
import pathlib
import re
import tomllib

import pytest

import penwatch

ROOT = pathlib.Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def _allowed() -> dict[str, set[str]]:
    text = ARCHITECTURE.read_text()
    block = re.search(r"```imports\n(.*?)```", text, re.S)
    assert block, "docs/ARCHITECTURE.md has no ```imports table"
    table = {}
    for line in block.group(1).splitlines():
        part, _, deps = line.partition(":")
        table[part.strip()] = {d.strip() for d in deps.split(",") if d.strip()}
    return table


ALLOWED = _allowed()


def _part(path: pathlib.Path) -> str:
    """The part a file belongs to: ``penwatch/sinks/_otel.py`` -> ``sinks``."""
    rel = path.relative_to(ROOT).parts
    if rel[0] == "dashboard":  # installed as penwatch.dashboard (SPEC section 14)
        return "dashboard"
    if rel[1] == "__init__.py":
        return "penwatch"  # the public API
    return rel[1].removesuffix(".py")


def _penwatch_imports(path: pathlib.Path) -> set[str]:
    """First-level penwatch names a module imports (``penwatch.x.y`` -> ``x``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] != "penwatch":
                continue
            if len(parts) > 1:
                names.add(parts[1])
            else:  # from penwatch import x, y
                names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "penwatch":
                    names.add(parts[1] if len(parts) > 1 else "penwatch")
    return names


def _modules() -> list[pathlib.Path]:
    return sorted((ROOT / "penwatch").rglob("*.py")) + sorted((ROOT / "dashboard").rglob("*.py"))


def test_every_part_is_in_the_table():
    parts = {_part(f) for f in _modules()}
    assert parts == set(ALLOWED), (
        f"parts missing from docs/ARCHITECTURE.md: {sorted(parts - set(ALLOWED))}; "
        f"listed but absent: {sorted(set(ALLOWED) - parts)}"
    )


def test_the_table_has_no_cycle():
    state: dict[str, int] = {}

    def visit(part: str, path: tuple[str, ...]) -> None:
        if state.get(part) == 2:
            return
        assert state.get(part) != 1, f"cycle: {' -> '.join((*path, part))}"
        state[part] = 1
        for dep in ALLOWED.get(part, ()):
            visit(dep, (*path, part))
        state[part] = 2

    for part in ALLOWED:
        if part != "penwatch":
            visit(part, ())


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_part_imports_only_what_the_table_allows(part):
    files = [f for f in _modules() if _part(f) == part]
    assert files, f"no modules found for {part}"
    bad = {}
    for path in files:
        extra = _penwatch_imports(path) - ALLOWED[part] - {part}
        if extra:
            bad[str(path.relative_to(ROOT))] = sorted(extra)
    assert not bad, f"{part} imports parts the architecture does not allow: {bad}"


def test_the_schema_imports_nothing_of_penwatch_at_run_time():
    # The ground floor: importing it must not pull in a layer above (a cycle in waiting).
    for path in sorted((ROOT / "penwatch" / "schema").rglob("*.py")):
        assert _penwatch_imports(path) <= {"schema"}, path


@pytest.mark.parametrize(
    "name", sorted(p.name for p in (ROOT / "penwatch").iterdir() if (p / "__init__.py").exists())
)
def test_no_public_name_shadows_a_subpackage(name):
    module = importlib.import_module(f"penwatch.{name}")
    assert getattr(penwatch, name, module) is module
    # ``import penwatch.x as y`` binds the attribute, which must be the module too
    assert importlib.import_module(f"penwatch.{name}").__name__ == f"penwatch.{name}"


def test_dashboard_never_creates_metrics_tracers_or_writers():
    forbidden = {"prometheus_client", "opentelemetry", "StoreWriter", "sinks", "Monitor"}
    for path in sorted((ROOT / "dashboard").rglob("*.py")):
        tree = ast.parse(path.read_text())
        used = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                used.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                used.update(node.module.split("."))
                used.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Attribute):
                used.add(node.attr)
        assert not used & forbidden, f"{path.relative_to(ROOT)} uses {sorted(used & forbidden)}"


def test_the_wheel_lists_every_package():
    """pyproject's explicit package list (needed for the dashboard's package-dir mapping)
    names every package of the tree, and maps penwatch.dashboard to dashboard/."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    inits = (ROOT / "penwatch").rglob("__init__.py")
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in inits}
    assert set(config["packages"]) == tree | {"penwatch.dashboard"}
    assert config["package-dir"] == {"penwatch.dashboard": "dashboard"}
    assert (ROOT / "dashboard" / "__init__.py").is_file()
    assert not (ROOT / "penwatch" / "dashboard").exists()
