"""What llm-atc and the training node agree on: the one definition both sides import (the CLI as
``llm_atc.recipes.train.contract``, the node's finetune.py from beside it, where the workdir sync puts it)."""

# The line finetune.py prints last; a run on this machine whose log has it finished.
FINISHED_MARKER = "llm-atc: training finished:"
# What the node trains (MODEL_TYPE), by the name `train --model_type` gives it (the original llm-atc's names).
MODEL_TYPES = {"vicuna": "full", "lora": "lora", "qlora": "qlora"}
# An adapter run whose base was a folder carries a copy of it under this name in its own folder, and says so in
# adapter_config.json (llm-atc serves the run's base from there, wherever the run is served).
RUN_BASE = "base"
# The conversations a run held out of training (EVAL_FRACTION), as OpenAI messages JSONL at the top of its folder;
# `llm-atc eval --run` and `promote` score models on them.
HELD_OUT_FILE = "eval.jsonl"
DEFAULT_EVAL_FRACTION = 0.05
