"""Imports inside ``src/detrkit`` run one way, read off the source with ``ast`` (nothing imported).

Ranks, lowest first; a module imports its own package or packages of a lower rank only:

0. ``version``, ``files``: leaf modules with no detrkit imports of their own.
1. ``ops`` (kernels) and ``data`` (datasets, COCO files and names, drawing boxes): neither needs a
   model, and ``engine``, ``inference`` and ``deploy`` all read them.
2. ``models``.
3. ``fast``: accelerations of the models.
4. ``loss``, ``checkpoints``.
5. ``engine``, ``inference``, ``deploy``.
6. ``cli``.
7. the facade, ``detrkit/__init__.py``, and ``__main__``.

Packages of one rank do not import each other either: a sideways import ties two packages that
are meant to change independently (inference must not need the training engine).
Besides, no module in src goes through the facade (``import detrkit``, ``from detrkit import X``)
and no package imports another's private (``_``) names or modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "detrkit"

RANKS: dict[str, int] = {
    "version": 0,
    "files": 0,
    "ops": 1,
    "data": 1,
    "models": 2,
    "fast": 3,
    "loss": 4,
    "checkpoints": 4,
    "engine": 5,
    "inference": 5,
    "deploy": 5,
    "cli": 6,
    "__init__": 7,
    "__main__": 7,
}


def module_name(path: Path) -> str:
    """``detrkit.models.config`` for ``models/config.py``; a package for its ``__init__.py``."""
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The ranked unit a dotted ``detrkit.…`` module belongs to: its first component below
    ``detrkit`` (the package, or a top-level module such as ``files``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, imported detrkit module, imported names)`` of every import in ``path``,
    including those inside functions; relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    if path.name != "__init__.py":
        here = here[:-1]  # a relative import counts from the module's package
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "detrkit":
                    found.append((node.lineno, alias.name, []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "detrkit":
                found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def layering_violations() -> list[str]:
    problems = []
    for path in sources():
        where = path.relative_to(SRC.parent)
        own = package_of(module_name(path))
        for line, module, names in imports_of(path):
            if module == "detrkit" and own != "__init__":
                spelled = f"from detrkit import {', '.join(names)}" if names else "import detrkit"
                problems.append(f"{where}:{line}: {spelled} goes through the package facade")
                continue
            target = package_of(module)
            if target == own or own == "__init__":
                continue
            if target not in RANKS:
                problems.append(f"{where}:{line}: {module} is in no package of RANKS")
            elif RANKS[target] >= RANKS[own]:
                direction = "up" if RANKS[target] > RANKS[own] else "sideways"
                problems.append(f"{where}:{line}: {own} imports {module} ({direction})")
            private = [
                name
                for name in [*module.split("."), *names]
                if name.startswith("_") and not name.endswith("__")  # __version__ is public
            ]
            if private:
                problems.append(
                    f"{where}:{line}: {own} imports private {', '.join(private)} of {module}"
                )
    return problems


def test_every_package_has_a_rank():
    units = {package_of(module_name(path)) for path in sources()}
    assert sorted(units - set(RANKS)) == [], "give the new package a rank in RANKS"


def test_imports_run_one_way():
    problems = layering_violations()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("importer", "source", "expected"),
    [
        ("engine/x.py", "from detrkit.cli.main import run\n", "(up)"),
        ("inference/x.py", "from detrkit.engine.visualize import draw\n", "(sideways)"),
        ("loss/x.py", "import detrkit\n", "facade"),
        ("loss/x.py", "from detrkit import load\n", "facade"),
        ("deploy/x.py", "from detrkit.checkpoints.native import _write\n", "private _write"),
        ("deploy/x.py", "from detrkit.ops._extension import load\n", "private _extension"),
        ("models/x.py", "def f():\n    from ..loss import build_criterion\n", "(up)"),
    ],
)
def test_the_check_catches(tmp_path, monkeypatch, importer, source, expected):
    """Each kind of violation is reported, in a copy of the layout with one bad module added."""
    root = tmp_path / "detrkit"
    for package in ("engine", "inference", "loss", "deploy", "models", "cli"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / importer).write_text(source)
    monkeypatch.setitem(globals(), "SRC", root)
    problems = layering_violations()
    assert len(problems) == 1 and expected in problems[0], problems
