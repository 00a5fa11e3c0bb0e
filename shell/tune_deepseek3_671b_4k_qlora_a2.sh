#!/usr/bin/env bash
# DeepSeek-V3 671B QLoRA supervised fine-tuning, 4K sequences, on Atlas A2 (910B): the A3 recipe
# (shell/tune_deepseek3_671b_4k_qlora_a3.sh: TP1 PP8 EP4, --num-layer-list 7,7,7,8,8,8,8,8, --qlora) on
# 4 nodes x 8 NPUs = 32 by default. Run on every node:
#
#   NNODES=4 NODE_RANK=<this node> MASTER_ADDR=<node 0> HF_DIR=/data/DeepSeek-V3-bf16 \
#   DATA_PATH=/data/dsv3/alpaca CKPT_LOAD_DIR=/ckpt/dsv3-nf4-tp1pp8ep4 CKPT_SAVE_DIR=/ckpt/dsv3-qlora \
#   bash shell/tune_deepseek3_671b_4k_qlora_a2.sh
set -euo pipefail
NPUS_PER_NODE=${NPUS_PER_NODE:-8} NNODES=${NNODES:-4} \
    exec bash "$(dirname "${BASH_SOURCE[0]}")/tune_deepseek3_671b_4k_qlora_a3.sh" "$@"
