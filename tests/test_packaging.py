"""pyproject.toml: what ``pip install`` shows a new user (no setuptools deprecation warnings) and the licence."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_is_read_without_setuptools_warnings():
    tomllib = pytest.importorskip("tomllib")
    pyprojecttoml = pytest.importorskip("setuptools.config.pyprojecttoml")
    from setuptools.dist import Distribution

    project = tomllib.loads(PYPROJECT.read_text())["project"]
    # An SPDX expression (setuptools >= 77); the `{ text = ... }` table is deprecated and printed at every install.
    assert project["license"] == "Apache-2.0"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyprojecttoml.apply_configuration(Distribution(), PYPROJECT)
    assert [str(w.message).splitlines()[0] for w in caught] == []
