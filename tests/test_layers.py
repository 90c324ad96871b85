"""Dependencies point one way: math <- composition <- training <- telemetry <- dashboard.

Parses every module's imports (``ast``, nothing is executed) and checks each layer
imports only the layers below it (docs/ARCHITECTURE.md).
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# layer -> penwatch subpackages/modules it may import (besides itself)
ALLOWED = {
    "penwatch/penalties": {"_checks"},
    "penwatch/events.py": set(),
    "penwatch/pipeline": {"_checks", "events", "penalties"},
    "penwatch/diagnostics": {"_checks", "events", "penalties", "pipeline"},
    "penwatch/optim": {"_checks", "penalties"},
    "penwatch/training": {"_checks", "events", "penalties", "pipeline", "diagnostics", "optim"},
    "dashboard": {"store", "_version"},
}


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


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_lower_layers(layer):
    target = ROOT / layer
    files = [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))
    assert files, f"no modules found under {layer}"
    own = target.stem
    bad = {}
    for path in files:
        extra = _penwatch_imports(path) - ALLOWED[layer] - {own}
        if extra:
            bad[str(path.relative_to(ROOT))] = sorted(extra)
    assert not bad, f"{layer} imports layers above it: {bad}"


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
