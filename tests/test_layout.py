"""The training package's layout is a rule, not a habit: data flows from the driver to the
workers, and evaluation is called, never calling back (``recoder_dist/training/__init__.py``).

Checked on the package's import graph, read from the source: a module may not reach a part it
must not import through any chain of ``recoder_dist`` modules (``sharded/`` included), lazy
imports inside functions and relative imports counted."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "recoder_dist"
TRAINING = "recoder_dist.training"
# What each part may not reach.
FORBIDDEN = {
    "driver": (),
    "worker": ("driver",),
    "evaluation": ("driver", "worker"),
    "shared": ("driver", "worker"),  # the modules of training/ itself
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], root: Path = ROOT) -> set[str]:
    """The modules of ``modules`` that ``path`` (under ``root``) imports (a package's
    ``__init__`` counts as the package), relative imports resolved."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found.update(n for n in names if n in modules)
    return found


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(paths)) for name, path in paths.items()}


def reached(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for name in graph[todo.pop()] - seen:
            seen.add(name)
            todo.append(name)
    return seen


def part_of(name: str) -> str | None:
    """driver, worker, evaluation or shared for a module of training/; None elsewhere."""
    if not name.startswith(TRAINING + "."):
        return None
    rest = name.removeprefix(TRAINING + ".").split(".")
    return rest[0] if len(rest) > 1 and rest[0] in FORBIDDEN else "shared"


GRAPH = graph()
TRAINING_MODULES = sorted(n for n in GRAPH if part_of(n) and not n.endswith("__init__"))


def test_every_part_holds_modules():
    assert {part_of(n) for n in TRAINING_MODULES} == set(FORBIDDEN)


@pytest.mark.parametrize("name", TRAINING_MODULES)
def test_no_module_reaches_a_part_it_must_not(name):
    part = part_of(name)
    wrong = sorted(n for n in reached(GRAPH, name) if part_of(n) in FORBIDDEN[part])
    assert not wrong, f"{name} ({part}) reaches {wrong}"


def test_a_backward_import_is_found_through_a_chain(tmp_path):
    """A lazy, relative import in a module outside training/ that an evaluation module
    imports: found."""
    (tmp_path / "recoder_dist" / "training" / "evaluation").mkdir(parents=True)
    (tmp_path / "recoder_dist" / "training" / "driver").mkdir()
    (tmp_path / "recoder_dist" / "other").mkdir()
    files = {
        "recoder_dist/training/evaluation/scores.py": "from recoder_dist.other import helper\n",
        "recoder_dist/other/helper.py": "def f():\n    from ..training.driver import launcher\n",
        "recoder_dist/training/driver/launcher.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    paths = {module_name(tmp_path / n, tmp_path): tmp_path / n for n in files}
    small = {name: imports_of(path, set(paths), tmp_path) for name, path in paths.items()}
    assert "recoder_dist.training.driver.launcher" in reached(
        small, "recoder_dist.training.evaluation.scores"
    )
