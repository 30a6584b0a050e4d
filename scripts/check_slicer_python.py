"""Checks that every Python file Slicer runs compiles with this interpreter and finds the standard library it
imports; meant to run under CPython 3.12, the Python of Slicer 5.10 and later (``scripts/py312/check.mjs``).

Slicer runs the module file, ``MedSAM2SlicerLib``, the self-test, and the ``medsam2`` engine (also in its own
PythonSlicer process): every ``.py`` file under ``MedSAM2Slicer/``. For each file:

- it compiles, with warnings as errors (invalid escape sequences are a SyntaxWarning from 3.12 on);
- every standard-library module it imports exists in this Python, and every name it imports from one exists
  there; with ``--stdlib-of-another-python`` (the module names of an older Python, e.g. the one running the
  tests), a module of that standard library missing from this one is reported too (``imp``, ``distutils``,
  ``asyncore``: removed in 3.12);
- the module file also parses as Python 3.9, so that an older Slicer can load it and say which Slicer it needs.

    python scripts/check_slicer_python.py [REPO] [--stdlib-of-another-python "NAME NAME ..."]   # 1: problems
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import warnings
from pathlib import Path

MODULE_FILE = "MedSAM2Slicer/MedSAM2Slicer.py"


def stdlib_imports(tree: ast.AST, stdlib: set[str]) -> list[tuple[str, str | None, int]]:
    """``(module, name or None, line)`` of every absolute import of a module of ``stdlib`` (top-level names)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.module, alias.name, node.lineno) for alias in node.names]
    return [(m, n, line) for m, n, line in found if m.split(".")[0] in stdlib]


def check_import(module: str, name: str | None) -> str:
    """ "" when the import works here; else what is missing."""
    top = module.split(".")[0]
    if top not in sys.stdlib_module_names:
        return f"module {top} is not in the standard library of Python {sys.version_info[0]}.{sys.version_info[1]}"
    if top.startswith("_") or importlib.util.find_spec(top) is None:
        # Present by name (sys.stdlib_module_names) but not shipped in this build (Pyodide leaves out e.g.
        # ssl and sqlite3 unless loaded): the name check is all that can be done.
        return ""
    try:
        imported = importlib.import_module(module)
    except ImportError as error:
        return f"module {module} is missing ({error})"
    try:
        if name is None or name == "*" or hasattr(imported, name):
            return ""
    except ImportError:  # a lazy attribute that needs a module this build leaves out (Pyodide)
        return ""
    if hasattr(imported, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None:
        return ""  # a submodule of a package
    return f"{module} has no {name}"


def check(root: Path, other_stdlib: set[str] = frozenset()) -> list[str]:
    stdlib = set(sys.stdlib_module_names) | set(other_stdlib)
    problems = []
    files = sorted(p for p in (root / "MedSAM2Slicer").rglob("*.py") if "__pycache__" not in p.parts)
    imports = 0
    for path in files:
        name = path.relative_to(root).as_posix()
        source = path.read_text(encoding="utf-8")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                compile(source, name, "exec", dont_inherit=True)
        except SyntaxError as error:
            problems.append(f"{name}:{error.lineno}: {error.msg}")
            continue
        tree = ast.parse(source, name)
        for module, imported, line in stdlib_imports(tree, stdlib):
            imports += 1
            missing = check_import(module, imported)
            if missing:
                problems.append(f"{name}:{line}: {missing}")
        if name == MODULE_FILE:
            try:
                ast.parse(source, name, feature_version=(3, 9))
            except SyntaxError as error:
                problems.append(f"{name}:{error.lineno}: not Python 3.9 syntax: {error.msg}")
    version = ".".join(map(str, sys.version_info[:3]))
    print(f"Python {version}: {len(files)} files compiled, {imports} standard-library imports checked")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    other_stdlib: set[str] = set()
    if "--stdlib-of-another-python" in args:
        at = args.index("--stdlib-of-another-python")
        other_stdlib = set(args[at + 1].split())
        del args[at : at + 2]
    root = Path(args[0]) if args else Path(__file__).resolve().parent.parent
    problems = check(root, other_stdlib)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
