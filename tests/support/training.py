"""Training data and ``llm-atc train`` arguments for tiny runs on this machine."""

from __future__ import annotations

from pathlib import Path


def sharegpt(n: int = 8) -> list[dict]:
    return [
        {
            "id": f"c{i}",
            "conversations": [
                {"from": "human", "value": f"What is {i} plus {i}?"},
                {"from": "gpt", "value": f"{i} plus {i} is {2 * i}."},
            ],
        }
        for i in range(n)
    ]


def train_args(data: Path, tiny_model, name: str, *extra: str) -> list[str]:
    """`llm-atc train` of a LoRA run on ``data`` from the tiny model, on this machine."""
    return [
        "train",
        "--model_type",
        "lora",
        "--finetune_data",
        str(data),
        "--base_model",
        str(tiny_model),
        "--cloud",
        "local",
        "--name",
        name,
        *extra,
    ]
