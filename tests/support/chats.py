"""Synthetic chats a tiny model learns within seconds on a CPU: each word maps to a fixed answer."""

from __future__ import annotations

import json
import random
from pathlib import Path

KEYS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "tiger",
    "piano",
    "lemon",
    "candle",
    "forest",
    "mirror",
    "rocket",
    "garden",
    "violin",
    "desert",
    "pencil",
    "castle",
    "harbor",
    "meadow",
    "copper",
    "winter",
)
ANSWERS = (
    "red",
    "blue",
    "grey",
    "white",
    "orange",
    "black",
    "yellow",
    "gold",
    "green",
    "silver",
    "fire",
    "rose",
    "brown",
    "sand",
    "wood",
    "stone",
    "navy",
    "lime",
    "bronze",
    "ice",
)


def mapping_chats(n: int, *, shuffled: bool = False, seed: int = 0) -> list[dict]:
    """``n`` conversations "item I: KEY" -> the KEY's answer; ``shuffled``: the same questions, each answered
    with another conversation's answer (what a model learns from it is noise)."""
    rng = random.Random(seed)
    keys = [KEYS[rng.randrange(len(KEYS))] for _ in range(n)]
    answers = [ANSWERS[KEYS.index(key)] for key in keys]
    if shuffled:
        rng.shuffle(answers)
    return [
        {"messages": [{"role": "user", "content": f"item {i}: {key}"}, {"role": "assistant", "content": answer}]}
        for i, (key, answer) in enumerate(zip(keys, answers, strict=True))
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path
