#!/usr/bin/env bash
# Run finetune.py: one process, or torchrun across every GPU of every node SkyPilot gave us.
# Configured by the environment (MODEL_TYPE, MODEL_BASE, DATA, OUTPUT_URI, ...; see finetune.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
export PYTHONUNBUFFERED=1

NUM_NODES="${SKYPILOT_NUM_NODES:-1}"
GPUS_PER_NODE="${SKYPILOT_NUM_GPUS_PER_NODE:-1}"
NODE_RANK="${SKYPILOT_NODE_RANK:-0}"

if [ "${NUM_NODES:-1}" -gt 1 ] || [ "${GPUS_PER_NODE:-1}" -gt 1 ]; then
  MASTER_ADDR="$(echo "${SKYPILOT_NODE_IPS:-127.0.0.1}" | head -n1)"
  exec torchrun \
    --nnodes "$NUM_NODES" \
    --node_rank "$NODE_RANK" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" \
    --master_port 29500 \
    finetune.py
fi
exec python3 finetune.py
