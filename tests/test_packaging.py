"""The wheel holds every subpackage: pyproject.toml lists packages by hand, and an editable install
(what CI and the tests use) imports a subpackage missing from that list without complaint."""
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_every_library_subpackage_is_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "tinycnn").rglob("__init__.py")
             if "__pycache__" not in p.parts}
    assert found - listed == set(), "add them to [tool.setuptools] packages in pyproject.toml"
