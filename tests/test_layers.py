"""The package layers (STYLE.md): a package imports only the ones below it.

gazeattn < tracking < pipelines, serving, evaluation < training < jobs; serving and
evaluation share models and tracking URIs through ``tracking``, never through ``training``.
Read from the source (every import statement, at any depth), without importing anything.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FORBIDDEN = {
    "gazeattn": {"ray", "mlflow", "tracking", "pipelines", "training", "serving", "evaluation",
                 "jobs", "tests", "bench"},
    "tracking": {"ray", "pipelines", "training", "serving", "evaluation", "jobs", "tests", "bench"},
    "pipelines": {"training", "serving", "evaluation", "jobs", "tests", "bench"},
    "serving": {"training", "evaluation", "jobs", "tests", "bench"},
    "evaluation": {"training", "serving", "jobs", "tests", "bench"},
    "training": {"serving", "jobs", "tests", "bench"},
    "bench": {"tests"},
}  # fmt: skip


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_lower_layers(package):
    bad = {}
    for path in sorted((REPO / package).rglob("*.py")):
        wrong = imported_roots(path) & FORBIDDEN[package]
        if wrong:
            bad[str(path.relative_to(REPO))] = sorted(wrong)
    assert not bad, f"{package} imports layers above it: {bad}"
