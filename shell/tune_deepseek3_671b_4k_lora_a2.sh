#!/usr/bin/env bash
# DeepSeek-V3 671B LoRA supervised fine-tuning, 4K sequences, on Atlas A2 (910B): the A3 recipe
# (shell/tune_deepseek3_671b_4k_lora_a3.sh: MindSpeed-LLM's layout TP1 PP4 EP16, its flags and environment
# variables) on 8 nodes x 8 NPUs = 64 by default. Run on every node:
#
#   NNODES=8 NODE_RANK=<this node> MASTER_ADDR=<node 0> HF_DIR=/data/DeepSeek-V3-bf16 \
#   DATA_PATH=/data/dsv3/alpaca CKPT_LOAD_DIR=/ckpt/dsv3-tp1pp4ep16 CKPT_SAVE_DIR=/ckpt/dsv3-lora \
#   bash shell/tune_deepseek3_671b_4k_lora_a2.sh
set -euo pipefail
NPUS_PER_NODE=${NPUS_PER_NODE:-8} NNODES=${NNODES:-8} \
    exec bash "$(dirname "${BASH_SOURCE[0]}")/tune_deepseek3_671b_4k_lora_a3.sh" "$@"
