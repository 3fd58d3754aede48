"""The recipes shipped inside the package: plain SkyPilot task YAML files."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import cache
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


@cache
def _parse(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _summary(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


# `llm-atc plan --mode` / `train --model_type` -> the training recipe that runs it
TRAIN_RECIPES = {"full": "train/vicuna", "lora": "train/lora", "qlora": "train/qlora"}


def train_settings(mode: str, overrides: dict[str, str] | None = None) -> dict[str, int]:
    """The recipe's sequence length, batch size and LoRA rank for a training mode (what the node
    trains with, so what the planner sizes), with ``--envs`` overrides applied."""
    envs = {**get_recipe(TRAIN_RECIPES[mode]).load().get("envs", {}), **(overrides or {})}
    settings = {}
    for key in ("MAX_SEQ_LEN", "BATCH_SIZE", "LORA_R"):
        try:
            settings[key] = int(envs[key])
        except (KeyError, TypeError, ValueError):
            continue
    return settings
