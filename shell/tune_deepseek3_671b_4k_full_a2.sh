#!/usr/bin/env bash
# DeepSeek-V3 671B full-parameter supervised fine-tuning, 4K sequences, on Atlas A2 (910B): the A3 recipe
# (shell/tune_deepseek3_671b_4k_full_a3.sh: its layout, flags and environment variables) on 32 nodes x 8 NPUs
# = 256 by default. Run on every node:
#
#   NNODES=32 NODE_RANK=<this node> MASTER_ADDR=<node 0> HF_DIR=/data/DeepSeek-V3-bf16 \
#   DATA_PATH=/data/dsv3/alpaca CKPT_LOAD_DIR=/ckpt/dsv3-tp2pp16ep8 CKPT_SAVE_DIR=/ckpt/dsv3-sft \
#   bash shell/tune_deepseek3_671b_4k_full_a2.sh
set -euo pipefail
NPUS_PER_NODE=${NPUS_PER_NODE:-8} NNODES=${NNODES:-32} \
    exec bash "$(dirname "${BASH_SOURCE[0]}")/tune_deepseek3_671b_4k_full_a3.sh" "$@"
