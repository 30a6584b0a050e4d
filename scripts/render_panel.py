"""Renders the module panel (``Resources/UI/MedSAM2Slicer.ui``) and the icons offscreen with PySide6.

Slicer's own widgets (MRML combo boxes, CTK collapsible buttons and sliders, the markups place widget) do not
exist outside Slicer, so the panel is loaded from a copy of the .ui file in which they are replaced by plain
Qt look-alikes (``lookalike_ui``); properties the look-alike lacks are dropped. The combo boxes are filled the
way the module fills them (the parameter node's choices, read from MedSAM2Slicer.py without importing it).

    pip install PySide6-Essentials
    QT_QPA_PLATFORM=offscreen python scripts/render_panel.py       # Resources/Screenshots/panel.png + icons
"""

from __future__ import annotations

import ast
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UI_FILE = ROOT / "MedSAM2Slicer" / "Resources" / "UI" / "MedSAM2Slicer.ui"
MODULE_FILE = ROOT / "MedSAM2Slicer" / "MedSAM2Slicer.py"
SCREENSHOT = ROOT / "Resources" / "Screenshots" / "panel.png"
ICONS = (
    ROOT / "Resources" / "MedSAM2Slicer.png",
    ROOT / "MedSAM2Slicer" / "Resources" / "Icons" / "MedSAM2Slicer.png",
)

# Slicer/CTK class -> the plain Qt class that looks most like it.
LOOKALIKES = {
    "qMRMLWidget": "QWidget",
    "qSlicerWidget": "QWidget",
    "ctkCollapsibleButton": "QGroupBox",
    "qMRMLNodeComboBox": "QComboBox",
    "qMRMLSegmentSelectorWidget": "QComboBox",
    "qSlicerMarkupsPlaceWidget": "QToolButton",
    "ctkPathLineEdit": "QLineEdit",
    "ctkSliderWidget": "QDoubleSpinBox",
}
RENAMED_PROPERTIES = {("QGroupBox", "text"): "title"}


def lookalike_ui(ui_text: str, has_property) -> str:
    """The .ui text with Slicer/CTK widgets replaced by plain Qt ones.

    ``has_property(class_name, property_name)`` says whether a Qt class has a property; properties that the
    look-alike lacks are dropped (dynamic ``stdset="0"`` ones are kept). Custom-widget declarations and
    signal connections (to Slicer slots such as ``setMRMLScene``) are removed.
    """
    root = ET.fromstring(ui_text)
    for widget in root.iter("widget"):
        cls = LOOKALIKES.get(widget.get("class"), widget.get("class"))
        widget.set("class", cls)
        for prop in list(widget.findall("property")):
            name = RENAMED_PROPERTIES.get((cls, prop.get("name")), prop.get("name"))
            prop.set("name", name)
            if prop.get("stdset") != "0" and not has_property(cls, name):
                widget.remove(prop)
    for section in ("customwidgets", "connections"):
        for element in root.findall(section):
            root.remove(element)
    return ET.tostring(root, encoding="unicode")


def qt_has_property(class_name: str, property_name: str) -> bool:
    from PySide6 import QtWidgets

    meta = getattr(QtWidgets, class_name).staticMetaObject
    return meta.indexOfProperty(property_name) >= 0


def load_panel(ui_file: Path = UI_FILE):
    """The panel as a QWidget built from the look-alike .ui (needs a QApplication)."""
    from PySide6 import QtCore, QtUiTools

    data = QtCore.QByteArray(lookalike_ui(ui_file.read_text(), qt_has_property).encode())
    buffer = QtCore.QBuffer(data)
    buffer.open(QtCore.QIODevice.ReadOnly)
    loader = QtUiTools.QUiLoader()
    widget = loader.load(buffer)
    if widget is None:
        raise RuntimeError(f"QUiLoader could not load {ui_file}: {loader.errorString()}")
    return widget


def parameter_choices(module_file: Path = MODULE_FILE) -> dict[str, list]:
    """``{field: choices}`` of the parameter node's ``Annotated[..., Choice([...])]`` fields, read with ast."""
    tree = ast.parse(module_file.read_text())
    constants = {
        target.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    choices = {}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ClassDef) and node.name.endswith("ParameterNode")):
            continue
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.annotation, ast.Subscript)):
                continue
            for call in ast.walk(item.annotation):
                if isinstance(call, ast.Call) and getattr(call.func, "id", "") == "Choice":
                    argument = call.args[0]
                    if isinstance(argument, ast.Name):
                        argument = constants[argument.id]
                    choices[item.target.id] = ast.literal_eval(argument)
    return choices


def fill_like_the_module(panel) -> None:
    """Put in what the module shows when a CT is loaded and the default model is chosen."""
    from PySide6 import QtWidgets

    choices = parameter_choices()
    for widget in panel.findChildren(QtWidgets.QComboBox):
        name = widget.property("SlicerParameterName")
        if name in choices:
            widget.addItems([str(c) for c in choices[name]])
    panel.findChild(QtWidgets.QComboBox, "inputVolumeSelector").addItem("CTChest")
    panel.findChild(QtWidgets.QComboBox, "segmentSelector").addItem("CTChest MedSAM2: right lung")
    models = panel.findChild(QtWidgets.QComboBox, "modelComboBox")
    models.addItems(model_labels() + ["Local file..."])
    # Before the first placement the module shows its Place buttons; the place widgets come with the nodes.
    hidden = (
        "positivePointsPlaceWidget",
        "negativePointsPlaceWidget",
        "boxPlaceWidget",
        "windowCustomWidget",
    )
    for name in hidden + ("modelPathLabel", "modelPathLineEdit", "downloadProgressBar"):
        panel.findChild(QtWidgets.QWidget, name).hide()
    panel.findChild(QtWidgets.QLabel, "windowDescriptionLabel").setText("level -500, width 1400")
    panel.findChild(QtWidgets.QLabel, "modelStatusLabel").setText("ready (Apache-2.0)")


def model_labels() -> list[str]:
    """The registry as the module lists it, when the engine can be imported here; else the default only."""
    try:
        sys.path.insert(0, str(ROOT / "MedSAM2Slicer"))
        from medsam2 import models
    except ImportError:
        return ["medsam2-lite"]
    rows = sorted(models.list_models(), key=lambda row: row.name != "medsam2-lite")
    return [f"{row.name}  ({', '.join(x for x in (row.size, row.licence) if x != '?')})" for row in rows]


def draw_icon(size: int = 128):
    """The module/extension icon: an axial slice with a segmented region, a box prompt and a click."""
    from PySide6 import QtCore, QtGui

    image = QtGui.QImage(size, size, QtGui.QImage.Format_ARGB32)
    image.fill(QtCore.Qt.transparent)
    painter = QtGui.QPainter(image)
    painter.setRenderHint(QtGui.QPainter.Antialiasing)
    s = size / 128
    for offset, shade in ((16, 70), (8, 95), (0, 125)):  # a stack of slices
        painter.setBrush(QtGui.QColor(shade, shade, shade + 10))
        painter.setPen(QtGui.QPen(QtGui.QColor(30, 30, 40), 2 * s))
        painter.drawRoundedRect(
            QtCore.QRectF((10 + offset) * s, (26 - offset) * s, 92 * s, 92 * s), 10 * s, 10 * s
        )
    painter.setPen(QtCore.Qt.NoPen)
    painter.setBrush(QtGui.QColor(60, 200, 90, 220))  # the segmented structure
    painter.drawEllipse(QtCore.QRectF(30 * s, 50 * s, 50 * s, 44 * s))
    painter.setBrush(QtCore.Qt.NoBrush)
    painter.setPen(QtGui.QPen(QtGui.QColor(255, 215, 40), 4 * s, QtCore.Qt.DashLine))  # the box prompt
    painter.drawRect(QtCore.QRectF(24 * s, 44 * s, 62 * s, 56 * s))
    painter.setPen(QtGui.QPen(QtGui.QColor(255, 255, 255), 3 * s))  # the click
    painter.setBrush(QtGui.QColor(40, 220, 80))
    painter.drawEllipse(QtCore.QPointF(55 * s, 72 * s), 7 * s, 7 * s)
    painter.end()
    return image


def main() -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtWidgets

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    panel = load_panel()
    fill_like_the_module(panel)
    panel.resize(400, panel.sizeHint().height())
    panel.show()
    app.processEvents()
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(SCREENSHOT)):
        raise SystemExit(f"could not write {SCREENSHOT}")
    print(f"wrote {SCREENSHOT}")
    icon = draw_icon()
    for path in ICONS:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not icon.save(str(path)):
            raise SystemExit(f"could not write {path}")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
