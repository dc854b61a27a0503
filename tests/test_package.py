"""Tests for the package's shape (STYLE.md habits 1 and 2), read from the source with
:mod:`ast`, imports inside functions included: only :mod:`anomaly_flow.tracking` imports
MLflow, only :mod:`anomaly_flow.cli` imports click, and every module imports only from
its own group or the groups above it, in the order the package docstring maps them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import anomaly_flow

PACKAGE = Path(anomaly_flow.__file__).parent

LAYERS: tuple[frozenset[str], ...] = tuple(frozenset(group) for group in (
    {"config", "layers", "glow", "score_kinds", "threshold_methods", "errors", "stopping",
     "presets", "file_lock"},
    {"data", "folders", "survey", "fingerprint", "fashion_mnist"},
    {"calibration_checks", "detection", "calibration"},
    {"scoring", "complexity", "heatmap", "score_table", "folder_scoring"},
    {"train", "checkpoint", "distributed"},
    {"plots"},
    {"tracking"},
    {"prechecks", "evaluation", "report", "demo", "pipeline_options"},
    {"cli"},
))
"""The package's modules (a subpackage by its name), lowest first; the first group is
the model and what even it may use (names, errors, stop handling, file locks, the preset files)."""


def _modules() -> dict[str, list[Path]]:
    """Top-level module or subpackage name -> its source files."""
    found: dict[str, list[Path]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        top = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if top not in ("__init__", "__main__"):
            found.setdefault(top, []).append(path)
    return found


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute names, anywhere in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "anomaly_flow":  # from anomaly_flow import tracking
                names.update(f"anomaly_flow.{alias.name}" for alias in node.names)
    return names


MODULES = _modules()


def test_every_module_has_a_layer_and_the_package_docstring_names_it() -> None:
    layered = set().union(*LAYERS)
    assert sorted(set(MODULES) - layered) == []
    assert sorted(layered - set(MODULES)) == []  # a module gone: drop it from LAYERS
    documented = {name for name in MODULES if f"anomaly_flow.{name}`" in anomaly_flow.__doc__}
    # the minor modules of the first group need no entry in the map
    assert sorted(set(MODULES) - documented - LAYERS[0]) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down_the_layers(name: str) -> None:
    rank = {module: i for i, group in enumerate(LAYERS) for module in group}
    upward = sorted(
        f"{path.relative_to(PACKAGE)} imports {imported}"
        for path in MODULES[name]
        for imported in _imports(path)
        if imported.startswith("anomaly_flow.")
        and (target := imported.split(".")[1]) in rank and rank[target] > rank[name]
    )
    assert upward == []


@pytest.mark.parametrize(("library", "owner"), [("mlflow", "tracking"), ("click", "cli")])
def test_only_one_part_of_the_package_imports(library: str, owner: str) -> None:
    importers = sorted(
        str(path.relative_to(PACKAGE))
        for name, paths in MODULES.items() if name != owner
        for path in paths
        if any(imported == library or imported.startswith(f"{library}.")
               for imported in _imports(path))
    )
    assert importers == []


def test_the_score_command_starts_without_scikit_learn() -> None:
    """scikit-learn takes a second or more to import and scoring draws no curve: what
    ``anomaly-flow score`` imports (the command and the evaluation module it runs) leaves
    it out, so a command that fails at once (a model URI with no store) answers at once."""
    probe = ("import sys, anomaly_flow.cli.score, anomaly_flow.evaluation\n"
             "print(sorted({'sklearn', 'torch', 'mlflow'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)})
    assert done.stdout.strip() == "['mlflow', 'torch']", done.stdout + done.stderr
