"""llm-atc's layering, checked: imports go one way (the CLI > the Python API > app > backends > the rest) and
no module imports one that imports it back (scripts/imports.py prints the same report)."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import imports

# Left to do (issue #28): resolving `--name llm-atc/<run>` asks app.lifecycle for the run's live state, which
# ties models to app (and, through it, to backends, render and spec). Nothing may join it.
KNOWN_UPWARD = {("llm_atc.models", "llm_atc.app.lifecycle")}


def test_no_import_goes_up_a_layer():
    assert set(imports.upward(imports.graph())) <= KNOWN_UPWARD


def test_no_import_circle_but_the_known_one():
    edges = imports.graph()
    for module, target in KNOWN_UPWARD:
        edges[module].discard(target)
    assert imports.circles(edges) == []


def test_the_report_sees_a_circle_and_an_upward_import():
    """The checks above can fail: a lower module importing app both goes up and closes a circle."""
    edges = {"llm_atc.app.serve": {"llm_atc.spec"}, "llm_atc.spec": {"llm_atc.app.serve"}}
    assert imports.upward(edges) == [("llm_atc.spec", "llm_atc.app.serve")]
    assert imports.circles(edges) == [["llm_atc.app.serve", "llm_atc.spec"]]
