"""llm-atc's layering, checked: imports go one way (the CLI > the Python API > app > backends > the rest) and
no module imports one that imports it back (scripts/imports.py prints the same report)."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import imports


def test_no_import_goes_up_a_layer():
    assert imports.upward(imports.graph()) == []


def test_no_import_circle():
    assert imports.circles(imports.graph()) == []


def test_the_report_sees_a_circle_and_an_upward_import():
    """The checks above can fail: a lower module importing app both goes up and closes a circle."""
    edges = {"llm_atc.app.serve": {"llm_atc.spec"}, "llm_atc.spec": {"llm_atc.app.serve"}}
    assert imports.upward(edges) == [("llm_atc.spec", "llm_atc.app.serve")]
    assert imports.circles(edges) == [["llm_atc.app.serve", "llm_atc.spec"]]
