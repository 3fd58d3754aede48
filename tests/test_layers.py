"""llm-atc's layering, checked: imports go one way (the CLI > the Python API > app > backends > the rest) and
no module imports one that imports it back (scripts/imports.py prints the same report)."""

from __future__ import annotations

import sys

from support.paths import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import imports


def test_no_import_goes_up_a_layer():
    assert imports.upward(imports.graph()) == []


def test_no_import_circle():
    assert imports.circles(imports.graph()) == []


# What a spec may not reach, even through other modules: state, the catalog, the Hub, bucket clients, output.
IMPURE = ("registry", "ui", "demo", "planning", "colocate", "catalog", "hub", "sky_sdk", "storage", "credentials")


def test_specs_are_pure():
    """``spec`` checks options with no registry, catalog, Hub, bucket client or terminal output: those lookups are
    ``app.resolve``'s, made after every check that needs none of them."""
    reached = imports.reachable(imports.graph(), "llm_atc.spec")
    assert "llm_atc.models" in reached  # (the walk follows imports)
    assert sorted(m for m in reached if m.removeprefix("llm_atc.").split(".")[0] in IMPURE) == []


# What only app/ may call: launching, specs, buckets, the Hub, SkyPilot, rendering, planning, tunnels.
WORKERS = ("backends", "spec", "storage", "hub", "sky_sdk", "render", "planning", "models", "weights", "tunnel")
FRONTS = ("llm_atc", "llm_atc.cli", "llm_atc.api", "llm_atc.deployment", "llm_atc.handle")


def test_commands_and_the_python_api_go_through_app():
    """The CLI and ``llm_atc.serve``/``train``/... reach the work only through ``app/``, so the two cannot drift."""
    edges = imports.graph()
    fronts = [m for m in edges if m in FRONTS or m.startswith("llm_atc.commands")]
    assert len(fronts) > 15
    reached = sorted(
        (front, target)
        for front in fronts
        for target in edges[front]
        if target.removeprefix("llm_atc.").split(".")[0] in WORKERS
    )
    assert reached == []


def test_the_report_sees_a_circle_and_an_upward_import():
    """The checks above can fail: a lower module importing app both goes up and closes a circle."""
    edges = {"llm_atc.app.serve": {"llm_atc.spec"}, "llm_atc.spec": {"llm_atc.app.serve"}}
    assert imports.upward(edges) == [("llm_atc.spec", "llm_atc.app.serve")]
    assert imports.circles(edges) == [["llm_atc.app.serve", "llm_atc.spec"]]
