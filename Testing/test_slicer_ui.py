"""The Slicer module's front end without Slicer: panel, names, CMake lists, light imports, dependencies.

The panel is loaded with PySide6's QUiLoader offscreen after Slicer's widgets are swapped for plain Qt
look-alikes (as ``scripts/render_panel.py`` does); that test is skipped when PySide6 is not installed
(``pip install PySide6-Essentials``).
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from MedSAM2SlicerLib import dependencies

ROOT = Path(__file__).resolve().parent.parent
MODULE_DIR = ROOT / "MedSAM2Slicer"
MODULE_FILE = MODULE_DIR / "MedSAM2Slicer.py"
SELF_TEST_FILE = MODULE_DIR / "Testing" / "Python" / "MedSAM2SlicerSelfTest.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MedSAM2Slicer.ui"
CMAKE_FILE = MODULE_DIR / "CMakeLists.txt"
LIGHT_MODULES = {"slicer", "vtk", "qt", "ctk"}


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def ui_widgets() -> dict[str, ET.Element]:
    widgets = list(ET.parse(UI_FILE).getroot().iter("widget"))
    names = [w.get("name") for w in widgets]
    assert len(names) == len(set(names)), "widget names in the .ui must be unique"
    return dict(zip(names, widgets))


def ui_names_used(path: Path) -> set[str]:
    """Every ``<something>.ui.<name>`` the code reads."""
    return set(re.findall(r"\.ui\.([A-Za-z_]\w*)", path.read_text()))


def parameter_fields() -> dict[str, ast.expr]:
    tree = ast.parse(MODULE_FILE.read_text())
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MedSAM2SlicerParameterNode"]
    return {item.target.id: item.annotation for item in node.body if isinstance(item, ast.AnnAssign)}


# -- panel -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [MODULE_FILE, SELF_TEST_FILE], ids=["module", "self-test"])
def test_every_widget_the_code_uses_is_in_the_panel(path):
    used = ui_names_used(path)
    assert "applyButton" in used
    missing = sorted(used - ui_widgets().keys())
    assert not missing, f"{path.name} uses widgets the .ui does not have: {missing}"


def test_parameter_names_in_the_panel_are_parameter_node_fields_with_fitting_widgets():
    fields = parameter_fields()
    connected = {
        w.find("property[@name='SlicerParameterName']/string").text: w.get("class")
        for w in ui_widgets().values()
        if w.find("property[@name='SlicerParameterName']") is not None
    }
    assert connected, "no widget is connected to the parameter node"
    for name, widget_class in connected.items():
        assert name in fields, f"the .ui connects '{name}', which the parameter node does not have"
        annotation = ast.unparse(fields[name])
        if "Choice(" in annotation:
            assert widget_class == "QComboBox", (name, widget_class)
        elif "WithinRange(" in annotation:
            assert widget_class in ("ctkSliderWidget", "QDoubleSpinBox"), (name, widget_class)
        elif annotation.startswith("vtkMRML"):
            assert widget_class == "qMRMLNodeComboBox", (name, widget_class)


def test_panel_loads_with_qt_lookalikes_offscreen():
    pytest.importorskip(
        "PySide6.QtUiTools", reason="PySide6 is not installed: pip install PySide6-Essentials"
    )
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtWidgets

    render = load_script("render_panel")
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    panel = render.load_panel(UI_FILE)
    loaded = {w.objectName() for w in panel.findChildren(QtWidgets.QWidget)}
    expected = set(ui_widgets()) - {"MedSAM2Slicer"}
    assert expected <= loaded, sorted(expected - loaded)
    assert isinstance(panel.findChild(QtWidgets.QWidget, "applyButton"), QtWidgets.QPushButton)
    options = panel.findChild(QtWidgets.QGroupBox, "optionsCollapsibleButton")
    assert options is not None and options.title() == "Options"
    slider = panel.findChild(QtWidgets.QDoubleSpinBox, "confidenceThresholdSlider")
    assert (slider.minimum(), slider.maximum(), slider.value()) == (0.0, 1.0, 0.5)
    render.fill_like_the_module(panel)
    orientations = panel.findChild(QtWidgets.QComboBox, "orientationsComboBox")
    assert [orientations.itemText(i) for i in range(orientations.count())] == ["6", "2", "1"]
    assert not panel.grab().isNull()
    app.processEvents()


def test_lookalike_keeps_dynamic_properties_and_drops_unknown_ones():
    render = load_script("render_panel")
    ui = (
        '<ui version="4.0"><widget class="ctkCollapsibleButton" name="box">'
        '<property name="text"><string>Title</string></property>'
        '<property name="collapsed"><bool>true</bool></property>'
        '<property name="SlicerParameterName" stdset="0"><string>x</string></property></widget>'
        "<customwidgets/><connections/></ui>"
    )
    known = {("QGroupBox", "title")}
    root = ET.fromstring(render.lookalike_ui(ui, lambda c, p: (c, p) in known))
    widget = root.find("widget")
    assert widget.get("class") == "QGroupBox"
    assert [p.get("name") for p in widget.findall("property")] == ["title", "SlicerParameterName"]
    assert root.find("customwidgets") is None and root.find("connections") is None


# -- module file -------------------------------------------------------------------------------------------------


def test_module_file_imports_only_slicer_qt_and_the_standard_library_at_load():
    tree = ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))
    compile(tree, str(MODULE_FILE), "exec")
    heavy = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top not in LIGHT_MODULES and top not in sys.stdlib_module_names:
                heavy.append(name)
    assert not heavy, (
        f"MedSAM2Slicer.py imports {heavy} when Slicer loads it; import them where they are used"
    )
    ast.parse(SELF_TEST_FILE.read_text(), filename=str(SELF_TEST_FILE))


def test_module_metadata_and_shortcuts():
    tree = ast.parse(MODULE_FILE.read_text())
    constants = {
        t.id: n.value
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    }
    shortcuts = ast.literal_eval(constants["SHORTCUTS"])
    methods = {
        f.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef) for f in n.body if hasattr(f, "name")
    }
    for keys, method in shortcuts.items():
        assert method in methods, method
        # Segment Editor owns single keys and Ctrl+Z/Y; Slicer's menus own Ctrl+<key>; Ctrl+Shift+S is "save as".
        assert keys.startswith("Ctrl+Shift+") and keys != "Ctrl+Shift+S", keys
    text = MODULE_FILE.read_text()
    assert 'self.parent.title = _("MedSAM2")' in text
    for citation in ("arXiv:2408.00874", "arXiv:2408.00714", "LiteMedSAM"):
        assert citation in text


# -- CMake ---------------------------------------------------------------------------------------------------------


def cmake_list(name: str) -> list[str]:
    match = re.search(rf"set\({name}\n(.*?)\n\s*\)", CMAKE_FILE.read_text(), re.DOTALL)
    assert match, f"{name} not found in {CMAKE_FILE}"
    return [line.strip() for line in match.group(1).splitlines() if line.strip()]


def test_cmake_lists_every_python_file_of_the_module():
    on_disk = {
        p.relative_to(MODULE_DIR).as_posix()
        for p in MODULE_DIR.rglob("*.py")
        if "__pycache__" not in p.parts and not any(part.endswith(".egg-info") for part in p.parts)
    }
    listed = set(cmake_list("MODULE_PYTHON_SCRIPTS"))
    missing = sorted(on_disk - listed)
    assert not missing, (
        f"not in {CMAKE_FILE.name}: {missing}; run python scripts/list_module_files.py --write"
    )
    assert not sorted(listed - on_disk), "CMakeLists.txt lists files that do not exist"
    assert "MedSAM2Slicer.py" in listed and "medsam2/model/sam2.py" in listed


def test_cmake_resources_exist_and_weights_are_listed():
    listed = cmake_list("MODULE_PYTHON_RESOURCES")
    assert {"Resources/UI/MedSAM2Slicer.ui", "Resources/Icons/MedSAM2Slicer.png"} <= set(listed)
    assert all((MODULE_DIR / name).is_file() for name in listed), listed
    weights = {p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.glob("medsam2/weights/*.safetensors")}
    assert weights <= set(listed)
    script = load_script("list_module_files")
    assert script.main(["--check"]) == 0


# -- dependencies ------------------------------------------------------------------------------------------------


def test_dependency_handling_imports_without_torch():
    # Inside Slicer these run before PyTorch is installed, to install it.
    code = (
        "import sys; sys.modules['torch'] = None; "
        "import MedSAM2SlicerLib.dependencies as d, MedSAM2SlicerLib.model_choice as m; "
        "assert m.choices() == [('medsam2-lite', 'medsam2-lite')], m.choices()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)


def test_missing_requirements_are_found_without_importing():
    present = {"safetensors", "tqdm", "fastapi"}
    missing = dependencies.missing_requirements(find_spec=lambda m: object() if m in present else None)
    assert [r.specifier for r in missing] == ["scikit-image>=0.20", "scipy>=1.9", "uvicorn>=0.29"]
    assert dependencies.missing_requirements() == []  # this environment has them all


def test_constraints_pin_slicers_own_packages_and_skip_unknown_ones():
    def version(name):
        if name == "vtk":
            raise importlib.metadata.PackageNotFoundError(name)
        return {"numpy": "1.26.4", "scipy": "1.13.0", "SimpleITK": "2.4.0", "torch": "2.5.1"}[name]

    assert dependencies.constraints(version=version) == (
        "numpy==1.26.4\nscipy==1.13.0\nSimpleITK==2.4.0\ntorch==2.5.1\n"
    )
    arguments = dependencies.pip_arguments(dependencies.REQUIREMENTS[:2], "/tmp/a b.txt")
    assert arguments == "'safetensors>=0.4' 'tqdm>=4.60' -c '/tmp/a b.txt'"


def test_ensure_asks_once_installs_with_constraints_and_checks_again(monkeypatch):
    missing = [dependencies.REQUIREMENTS[0], dependencies.REQUIREMENTS[2]]
    state = {"installed": False}
    monkeypatch.setattr(
        dependencies, "missing_requirements", lambda reqs=None: [] if state["installed"] else list(missing)
    )
    questions, installs = [], []

    def install(arguments):
        constraints_file = arguments.split(" -c ")[1].strip("'")
        installs.append((arguments, Path(constraints_file).read_text()))
        state["installed"] = True

    torch = dependencies.ensure(confirm=lambda text: questions.append(text) or True, install=install)
    assert torch.__name__ == "torch"
    assert len(questions) == 1 and "safetensors>=0.4, scikit-image>=0.20" in questions[0]
    ((arguments, constraints),) = installs
    assert arguments.startswith("'safetensors>=0.4' 'scikit-image>=0.20' -c ")
    assert f"numpy=={importlib.metadata.version('numpy')}" in constraints
    assert not Path(arguments.split(" -c ")[1].strip("'")).exists()  # the constraints file is removed

    state["installed"] = False
    with pytest.raises(dependencies.DependencyError, match="declined"):
        dependencies.ensure(confirm=lambda text: False, install=install)
    assert len(installs) == 1

    def failing(arguments):
        raise RuntimeError("no network")

    with pytest.raises(dependencies.DependencyError, match="no network"):
        dependencies.ensure(confirm=lambda text: True, install=failing)


def test_cpu_note_only_when_no_gpu_is_there():
    def fake_torch(cuda, mps):
        return SimpleNamespace(
            cuda=SimpleNamespace(is_available=lambda: cuda),
            backends=SimpleNamespace(mps=SimpleNamespace(is_available=lambda: mps)),
        )

    assert dependencies.device_note(fake_torch(False, False), "auto") == dependencies.CPU_NOTE
    assert "Orientations to 1 or 2" in dependencies.CPU_NOTE
    assert dependencies.device_note(fake_torch(True, False), "auto") == ""
    assert dependencies.device_note(fake_torch(False, True), "auto") == ""
    assert dependencies.device_note(fake_torch(False, False), "cuda") == ""


# -- model choice ------------------------------------------------------------------------------------------------


def test_module_and_library_agree_on_the_model_constants():
    from MedSAM2SlicerLib import model_choice

    tree = ast.parse(MODULE_FILE.read_text())
    constants = {
        t.id: ast.literal_eval(n.value)
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name) and t.id in ("DEFAULT_MODEL", "LOCAL_FILE")
    }
    assert constants == {"DEFAULT_MODEL": model_choice.DEFAULT_MODEL, "LOCAL_FILE": model_choice.LOCAL_FILE}


def test_model_choices_status_and_download_progress(tmp_path, monkeypatch):
    from medsam2 import models
    from MedSAM2SlicerLib import model_choice

    monkeypatch.setenv(model_choice.CACHE_ENV, str(tmp_path))
    assert model_choice.CACHE_ENV == models.CACHE_ENV and model_choice.models_folder() == models.cache_dir()
    names = [name for name, _ in model_choice.choices()]
    assert names == [row.name for row in models.list_models()] and "medsam2-lite" in names
    label = dict(model_choice.choices())["sam2.1_hiera_tiny"]
    assert label == "sam2.1_hiera_tiny  (149 MiB, Apache-2.0)"

    entry = models.get("sam2.1_hiera_tiny")
    assert model_choice.status(entry.name, "") == "downloaded on first use (149 MiB, Apache-2.0)"
    assert model_choice.download_progress(entry.name) is None
    (tmp_path / (entry.filename + ".partial")).write_bytes(b"\0" * (entry.size_bytes // 4))
    assert model_choice.download_progress(entry.name) == pytest.approx(0.25)
    (tmp_path / entry.filename).write_bytes(b"x")
    assert model_choice.status(entry.name, "") == "ready (Apache-2.0)"
    assert model_choice.status("no-such-model", "") == "unknown model 'no-such-model'"

    local = model_choice.LOCAL_FILE
    assert model_choice.status(local, "") == "choose a checkpoint file"
    assert model_choice.status(local, str(tmp_path / entry.filename)) == "file found"
    assert model_choice.source(local, str(tmp_path / entry.filename)) == str(tmp_path / entry.filename)
    assert model_choice.source("sam2.1_hiera_tiny", "ignored") == "sam2.1_hiera_tiny"
    with pytest.raises(ValueError, match="existing checkpoint"):
        model_choice.source(local, str(tmp_path / "missing.pt"))
    assert model_choice.download_progress(local) is None


# -- panel -> prompts (real MRML scene from slicer-core) ------------------------------------------------------


def panel_scene():
    import slicer
    import slicerio
    import vtk

    scene = slicer.vtkMRMLScene()
    data = Path(slicerio.__file__).parent / "data"
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CTChest4")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(data / "CTChest4.nrrd"))
    assert storage.ReadData(volume)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(data / "Segmentation.seg.nrrd"))
    assert storage.ReadData(segmentation)

    def view(normal, origin):
        """A slice node showing the plane through ``origin`` (RAS) with ``normal``."""
        node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        x = [0.0, 1.0, 0.0] if normal[0] else [1.0, 0.0, 0.0]
        y = list(vtk.vtkVector3d(*normal).Cross(vtk.vtkVector3d(*x)))
        matrix = node.GetSliceToRAS()
        for r in range(3):
            for c, column in enumerate((x, y, normal, origin)):
                matrix.SetElement(r, c, column[r])
        node.UpdateMatrices()
        return node

    p = SimpleNamespace(
        inputVolume=volume,
        segmentation=segmentation,
        segmentID="",
        positivePoints=scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode"),
        negativePoints=scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode"),
        box=scene.AddNewNodeByClass("vtkMRMLMarkupsROINode"),
        promptViewNodeID="",
        maskSegmentID="",
        maskAxis=0,
        maskSlice=-1,
        orientations=2,
        aggregation="majority",
        memoryPolicy="recent",
        confidenceThreshold=0.7,
        windowSource="lung",
        windowLevel=40.0,
        windowWidth=400.0,
    )
    return scene, p, view


def test_slice_of_a_view_and_the_view_decides_a_single_points_axis():
    from medsam2.errors import InputError
    from MedSAM2SlicerLib import panel, volume_geometry

    scene, p, view = panel_scene()
    geometry = volume_geometry(p.inputVolume)
    point_ras = geometry.kji_to_world([[17, 60, 80]])[0]  # k, j, i
    axial, coronal, sagittal = (view(n, point_ras) for n in ([0, 0, 1], [0, 1, 0], [1, 0, 0]))
    assert panel.slice_of(p.inputVolume, axial) == (0, 17)
    assert panel.slice_of(p.inputVolume, coronal) == (1, 60)
    assert panel.slice_of(p.inputVolume, sagittal) == (2, 80)

    import vtk

    p.positivePoints.AddControlPoint(vtk.vtkVector3d(*point_ras))
    (prompt,) = panel.panel_prompts(p)
    assert (prompt.axis, prompt.index) == (0, 17)  # no view known: axial first
    p.promptViewNodeID = coronal.GetID()
    (prompt,) = panel.panel_prompts(p)
    assert (prompt.axis, prompt.index) == (1, 60)
    assert prompt.points.tolist() == [[80.0, 17.0]] and list(prompt.labels) == [1]

    options = panel.engine_options(p)
    assert (options["orientations"], options["aggregate"]) == (2, "majority")
    assert (options["memory"].policy, options["memory"].confidence_threshold) == ("recent", 0.7)
    assert (options["modality"], options["window"]) == ("ct", "lung")

    p.inputVolume = None
    with pytest.raises(InputError, match="input volume"):
        panel.panel_prompts(p)


def test_mask_prompt_from_the_segment_on_the_viewed_slice():
    from medsam2.errors import InputError
    from MedSAM2SlicerLib import panel, read_segment_mask, volume_geometry

    scene, p, view = panel_scene()
    geometry = volume_geometry(p.inputVolume)
    lung = p.segmentation.GetSegmentation().GetSegmentIdBySegmentName("right lung")
    axial = view([0, 0, 1], geometry.kji_to_world([[20, 0, 0]])[0])
    with pytest.raises(InputError, match="segment drawn on the slice"):
        panel.set_mask_prompt(p, axial)
    p.segmentID = lung
    panel.set_mask_prompt(p, axial)
    assert (p.maskSegmentID, p.maskAxis, p.maskSlice) == (lung, 0, 20)
    assert panel.mask_description(p) == "'right lung' on slice 20 of array axis 0"
    (prompt,) = panel.panel_prompts(p)
    assert (prompt.axis, prompt.index, prompt.box, prompt.points) == (0, 20, None, None)
    expected = read_segment_mask(p.segmentation, lung, geometry)[20]
    assert expected.sum() > 500 and (prompt.mask == expected).all()

    top = view([0, 0, 1], geometry.kji_to_world([[0, 0, 0]])[0])
    with pytest.raises(InputError, match="empty on slice 0"):
        panel.set_mask_prompt(p, top)
    assert p.maskSlice == 20  # a refused mask leaves the previous one
