"""The package's parts keep their rooms: the planner never depends on the benchmark tool.

What both need (workloads, records, statistics, server-metrics scraping, machine probes) lives
in ``pdserve.traffic`` and ``pdserve.machine``; a planner module importing ``pdserve.bench``
would drag the load generator (and its plotting) into every plan.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pdserve

PACKAGE = Path(pdserve.__file__).parent


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_no_planner_module_imports_the_benchmarks() -> None:
    modules = sorted((PACKAGE / "planner").rglob("*.py"))
    assert len(modules) > 20
    offenders = {
        str(path.relative_to(PACKAGE)): sorted(m for m in imported_modules(path) if m.startswith("pdserve.bench"))
        for path in modules
    }
    assert {path: found for path, found in offenders.items() if found} == {}


def test_the_shared_parts_import_neither_bench_nor_planner() -> None:
    for path in [*sorted((PACKAGE / "traffic").rglob("*.py")), PACKAGE / "machine.py"]:
        found = [m for m in imported_modules(path) if m.startswith(("pdserve.bench", "pdserve.planner"))]
        assert found == [], (path, found)
