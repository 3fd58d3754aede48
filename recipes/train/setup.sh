#!/usr/bin/env bash
# Install the training stack unless an adequate one is already importable (SkyPilot runs this on
# every launch and every spot recovery, so it must be quick when there is nothing to do).
# Uses uv when the node has it (SkyPilot installs it in ~/.local/bin), else pip; both honour their
# usual variables (UV_FIND_LINKS, UV_EXTRA_INDEX_URL, PIP_EXTRA_INDEX_URL, ...).
# TORCH_SPEC overrides the torch requirement, e.g. torch==2.13.0+cpu on CPU-only nodes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# "import name|pip requirement|minimum version|exact major.minor (optional)"
REQUIREMENTS=(
  "torch|${TORCH_SPEC:-torch>=2.6}|2.6"
  "transformers|transformers>=5.17,<6|5.17"
  "trl|trl==1.16.0|1.16.0|1.16"
  "peft|peft==0.21.2|0.21.2|0.21"
  "datasets|datasets>=4.7|4.7"
  "accelerate|accelerate>=1.10.1|1.10.1"
  "boto3|boto3|0"
  "google.cloud.storage|google-cloud-storage|0"
)
if [ "${MODEL_TYPE:-lora}" = "qlora" ]; then
  REQUIREMENTS+=("bitsandbytes|bitsandbytes>=0.45|0.45")
fi
if [ -n "${WANDB_API_KEY:-}" ]; then
  REQUIREMENTS+=("wandb|wandb|0")
fi

# Prints the pip requirements of whatever is missing or too old.
missing="$(python3 - "${REQUIREMENTS[@]}" <<'PY'
import importlib
import importlib.metadata as md
import re
import sys

DISTRIBUTIONS = {"google.cloud.storage": "google-cloud-storage"}

def version_tuple(text):
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])

for spec in sys.argv[1:]:
    module, requirement, minimum, *exact = spec.split("|")
    try:
        importlib.import_module(module)
        installed = md.version(DISTRIBUTIONS.get(module, module))
    except Exception:
        print(requirement)
        continue
    if version_tuple(installed) < version_tuple(minimum):
        print(requirement)
    elif exact and exact[0] and version_tuple(installed)[:2] != version_tuple(exact[0])[:2]:
        print(requirement)
PY
)"

if [ -z "$missing" ]; then
  echo "llm-atc: training packages already installed"
  exit 0
fi
echo "llm-atc: installing:" $missing
UV="$(command -v uv || echo "$HOME/.local/bin/uv")"
# shellcheck disable=SC2086  # one requirement per word
if [ -x "$UV" ]; then
  "$UV" pip install --python "$(command -v python3)" $missing
else
  python3 -m pip install --quiet --upgrade-strategy only-if-needed $missing
fi
