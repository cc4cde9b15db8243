"""The package's layout: entry points are thin (config -> objects -> run -> where the outputs went) and no module
imports one, so every piece of logic has its home in a library module. Reads the sources (ast); imports nothing but
the packages `pkgutil` walks."""

from __future__ import annotations

import ast
import pkgutil
from pathlib import Path

import pytest

import tmd_lightning

PACKAGE = Path(tmd_lightning.__file__).parent
ENTRY_POINTS = ("fit", "sample", "evaluate", "export", "precompute", "kd_pairs", "plan", "reproduce", "generate")
MAX_ENTRY_LINES = 110


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name, with its source file."""
    found = {"tmd_lightning": PACKAGE / "__init__.py"}
    for info in pkgutil.walk_packages(tmd_lightning.__path__, "tmd_lightning."):
        folder = Path(info.module_finder.path)
        name = info.name.rsplit(".", 1)[-1]
        found[info.name] = folder / name / "__init__.py" if info.ispkg else folder / f"{name}.py"
    return found


def _imported(module: str, source: Path) -> set[str]:
    """The dotted names a module imports, anywhere in it (functions too): `import a.b` gives a.b, `from a import b`
    gives a and a.b (b may be a module), relative imports resolved against `module`."""
    names: set[str] = set()
    package = module if source.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([base] if base else [])])
            names |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return names


def test_every_entry_point_exists() -> None:
    assert [e for e in ENTRY_POINTS if not (PACKAGE / f"{e}.py").is_file()] == []


def test_no_module_imports_an_entry_point() -> None:
    entry_modules = {f"tmd_lightning.{e}" for e in ENTRY_POINTS}
    found = {(module, name) for module, source in _modules().items() for name in _imported(module, source)
             if name in entry_modules and name != module}
    assert found == set(), "library logic belongs in a library module, not an entry point"


def test_the_import_walk_sees_imports_inside_functions() -> None:
    """The walk is not blind: `evaluation.generate` imports `checkpoints` inside a function only."""
    modules = _modules()
    assert "tmd_lightning.checkpoints" in _imported("tmd_lightning.evaluation.generate",
                                                     modules["tmd_lightning.evaluation.generate"])


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_points_are_thin(entry: str) -> None:
    lines = len((PACKAGE / f"{entry}.py").read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_ENTRY_LINES, f"{entry}.py has {lines} lines: move its logic into a library module"
