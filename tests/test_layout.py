"""The training package's layout is a rule, not a habit: data flows from the driver to the
workers, and evaluation is called, never calling back (DESIGN.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TRAINING = Path(__file__).resolve().parents[1] / "recoder_dist" / "training"
PACKAGE = "recoder_dist.training"
# What each part may not import, however lazily (an import inside a function counts).
FORBIDDEN = {
    "driver": (),
    "worker": ("driver",),
    "evaluation": ("driver", "worker"),
    "shared": ("driver", "worker"),  # the modules of training/ itself
}


def part_of(path: Path) -> str:
    parent = path.parent.relative_to(TRAINING).parts
    return parent[0] if parent else "shared"


def imported_parts(path: Path) -> set[str]:
    """The parts of training/ (driver, worker, evaluation) that ``path`` imports."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith(PACKAGE + "."):
                parts.add(name.removeprefix(PACKAGE + ".").split(".")[0])
    return parts


MODULES = sorted(TRAINING.rglob("*.py"))


def test_every_part_holds_modules():
    assert {part_of(p) for p in MODULES} == set(FORBIDDEN)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(TRAINING)))
def test_imports_flow_from_the_driver_to_the_workers_and_evaluation(path):
    wrong = imported_parts(path) & set(FORBIDDEN[part_of(path)])
    assert not wrong, f"{path.relative_to(TRAINING)} ({part_of(path)}) imports {sorted(wrong)}"


def test_a_backward_import_is_found(tmp_path):
    """The check sees a lazy import and a ``from package import module`` alike."""
    module = tmp_path / "m.py"
    module.write_text(
        "def f():\n    from recoder_dist.training.driver import launcher\n"
        "from recoder_dist.training import worker\n"
    )
    assert imported_parts(module) == {"driver", "worker"}
