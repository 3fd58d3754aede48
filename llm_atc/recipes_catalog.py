"""The recipes shipped inside the package: plain SkyPilot task YAML files."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from llm_atc.errors import NotFoundError


@dataclass(frozen=True)
class Recipe:
    """A recipe file: ``<kind>/<name>.yaml`` and the comment at its top."""

    kind: str
    name: str
    path: Path
    summary: str

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"

    def load(self) -> dict:
        """A fresh copy of the task config, safe to overlay."""
        return copy.deepcopy(_parse(self.path))


def recipes_dir() -> Path:
    return Path(str(resources.files("llm_atc.recipes")))


def all_recipes() -> list[Recipe]:
    found = []
    for path in sorted(recipes_dir().glob("*/*.yaml")):
        found.append(Recipe(path.parent.name, path.stem, path, _summary(path)))
    return found


def get_recipe(ref: str) -> Recipe:
    for recipe in all_recipes():
        if recipe.ref == ref:
            return recipe
    raise NotFoundError(f"no recipe {ref!r}; see `llm-atc recipes`")


@lru_cache(maxsize=None)
def _parse(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _summary(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""
