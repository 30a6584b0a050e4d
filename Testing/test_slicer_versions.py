"""The Slicer versions the module supports, and what the Extensions Index reads.

Supported: Slicer 5.10 and later (Python 3.12; Slicer 5.12 is built with Qt 5.15 or Qt 6.8). Every file Slicer
runs is compiled with a real CPython 3.12 (Pyodide 0.27.7 from npm, run by Node.js: ``scripts/py312``); the
module file must also load in Python 3.9 so that Slicer 5.8 can show which Slicer it needs.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULE_FILE = ROOT / "MedSAM2Slicer" / "MedSAM2Slicer.py"
CATALOG_ENTRY = ROOT / "MedSAM2Slicer.json"
SCHEMA = ROOT / "Testing" / "data" / "slicer" / "slicer-extension-catalog-entry-schema-v1.0.1.json"
PY312 = ROOT / "scripts" / "py312"
SLICER_FILES = [MODULE_FILE, *sorted((ROOT / "MedSAM2Slicer" / "MedSAM2SlicerLib").glob("*.py"))]


def module_functions(*names: str) -> dict:
    """Functions and constants of the module file, executed alone (the file itself needs Slicer)."""
    tree = ast.parse(MODULE_FILE.read_text())
    kept = [
        node
        for node in tree.body
        if (isinstance(node, ast.FunctionDef) and node.name in names)
        or (
            isinstance(node, ast.Assign)
            and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)
        )
    ]
    namespace: dict = {}
    exec(compile(ast.Module(body=kept, type_ignores=[]), str(MODULE_FILE), "exec"), namespace)
    return namespace


def test_an_older_slicer_is_told_which_slicer_it_needs():
    message = module_functions("unsupportedSlicerMessage")["unsupportedSlicerMessage"]
    said = message((5, 8), (3, 9))
    assert (
        "needs 3D Slicer 5.10 or later (Python 3.12)" in said and "this is Slicer 5.8 with Python 3.9" in said
    )
    assert message((5, 10), (3, 12)) == message((5, 12), (3, 12)) == message((6, 0), (3, 13)) == ""
    assert message((5, 10), (3, 9)) and message((5, 9), (3, 12))

    # Said at load (module class) and instead of the panel (widget setup), before anything else is imported.
    tree = ast.parse(MODULE_FILE.read_text())
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    init = next(f for f in classes["MedSAM2Slicer"].body if getattr(f, "name", "") == "__init__")
    setup = next(f for f in classes["MedSAM2SlicerWidget"].body if getattr(f, "name", "") == "setup")
    assert "_unsupported()" in ast.unparse(init) and "warningDisplay" in ast.unparse(init)
    first_statements = ast.unparse(ast.Module(body=setup.body[:3], type_ignores=[]))
    assert "problem = _unsupported()" in first_statements and "return" in first_statements


def test_the_module_file_loads_in_python_39():
    source = MODULE_FILE.read_text()
    ast.parse(source, feature_version=(3, 9))
    future = [n for n in ast.parse(source).body if isinstance(n, ast.ImportFrom) and n.module == "__future__"]
    assert not future  # parameterNodeWrapper reads the annotations as types
    # Annotations are evaluated at load: ruff checks the file with Python 3.9 as target (FA102: no X | Y).
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    config = (ROOT / "pyproject.toml").read_text()
    assert '"MedSAM2Slicer/MedSAM2Slicer.py" = "py39"' in config and '"FA102"' in config
    broken = source.replace(
        "def onSegmentChanged(self, segmentID)", "def onSegmentChanged(self, segmentID: str | None)"
    )
    assert broken != source
    found = subprocess.run(
        [ruff, "check", "--select", "FA102", "--stdin-filename", "MedSAM2Slicer/MedSAM2Slicer.py", "-"],
        input=broken,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert found.returncode == 1 and "FA102" in found.stdout


def test_every_file_slicer_runs_compiles_with_python_312():
    node = shutil.which("node")
    if node is None or not (PY312 / "node_modules" / "pyodide").is_dir():
        pytest.fail("Node.js and Pyodide are needed: run scripts/setup.sh (npm ci --prefix scripts/py312)")
    environment = {**os.environ, "HOST_STDLIB_MODULES": " ".join(sorted(sys.stdlib_module_names))}
    done = subprocess.run(
        [node, str(PY312 / "check.mjs")], capture_output=True, text=True, env=environment, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    compiled = re.search(r"Python (3\.\d+)\.\d+: (\d+) files compiled", done.stdout)
    assert compiled and compiled.group(1) == "3.12", done.stdout
    in_module = [p for p in (ROOT / "MedSAM2Slicer").rglob("*.py") if "__pycache__" not in p.parts]
    assert int(compiled.group(2)) == len(in_module)


def test_the_python_312_check_finds_what_312_does_not_have(tmp_path):
    """The same checker, here on this Python: removed modules, missing names, 3.12 syntax warnings."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import check_slicer_python
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    (tmp_path / "MedSAM2Slicer").mkdir()
    # "dead_battery": a module the other Python's standard library has and this one has not, as imp for 3.12
    (tmp_path / "MedSAM2Slicer" / "old.py").write_text("import dead_battery\nfrom os import nothere\n")
    problems = check_slicer_python.check(tmp_path, {"dead_battery"})
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    assert problems == [
        f"MedSAM2Slicer/old.py:1: module dead_battery is not in the standard library of Python {version}",
        "MedSAM2Slicer/old.py:2: os has no nothere",
    ]
    (tmp_path / "MedSAM2Slicer" / "MedSAM2Slicer.py").write_text("match 1:\n    case 1:\n        pass\n")
    assert any("not Python 3.9 syntax" in p for p in check_slicer_python.check(tmp_path))


QT5_ONLY = {
    r"\.exec_\(": "exec_() (Qt 6 PythonQt: exec())",
    r"\bQRegExp\b": "QRegExp (Qt 6: QRegularExpression)",
    r"\bQDesktopWidget\b": "QDesktopWidget (Qt 6: QScreen)",
    r"\bQStringRef\b": "QStringRef",
    r"\bQTextCodec\b": "QTextCodec",
}


@pytest.mark.parametrize("path", SLICER_FILES, ids=lambda p: p.name)
def test_only_qt_api_of_both_qt5_and_qt6(path):
    text = path.read_text()
    used = [what for pattern, what in QT5_ONLY.items() if re.search(pattern, text)]
    assert not used, f"{path.name} uses {used}"


def test_catalog_entry_validates_against_slicers_schema():
    from jsonschema import Draft7Validator

    schema = json.loads(SCHEMA.read_text())
    Draft7Validator.check_schema(schema)
    validator = Draft7Validator(schema)
    entry = json.loads(CATALOG_ENTRY.read_text())
    assert not list(validator.iter_errors(entry))
    assert entry["$schema"] == schema["$id"]
    assert entry["build_dependencies"] == ["PyTorch"]
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in cmake
    homepage = re.search(r'set\(EXTENSION_HOMEPAGE "(.*?)"\)', cmake).group(1)
    assert entry["scm_url"] == homepage + ".git"
    # The schema does refuse a broken entry.
    assert list(validator.iter_errors({k: v for k, v in entry.items() if k != "category"}))
    assert list(validator.iter_errors({**entry, "depends": "PyTorch"}))
    assert not (ROOT / "MedSAM2Slicer.s4ext").exists()  # not read by the Extensions Index since Slicer 5.8
