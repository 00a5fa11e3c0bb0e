#!/usr/bin/env bash
# DeepSeek-V3 671B QLoRA supervised fine-tuning, 4K sequences, on Atlas A3: LoRA adapters on a frozen NF4
# base, MindSpeed-LLM's QLoRA layout TP1 PP8 EP4 (--num-layer-list 7,7,7,8,8,8,8,8), 2 nodes x 16 NPUs = 32
# by default. It is the LoRA recipe (shell/tune_deepseek3_671b_4k_lora_a3.sh: its flags, targets and
# environment variables) with --qlora and this layout. Run on every node:
#
#   NNODES=2 NODE_RANK=<this node> MASTER_ADDR=<node 0> HF_DIR=/data/DeepSeek-V3-bf16 \
#   DATA_PATH=/data/dsv3/alpaca CKPT_LOAD_DIR=/ckpt/dsv3-nf4-tp1pp8ep4 CKPT_SAVE_DIR=/ckpt/dsv3-qlora \
#   bash shell/tune_deepseek3_671b_4k_qlora_a3.sh
#
# CKPT_LOAD_DIR: the NF4 base, written by shell/ckpt_convert_deepseek3_hf2mcore.sh with QLORA_NF4=1 and
# this layout (TP=1 PP=8 EP=4 NUM_LAYER_LIST=7,7,7,8,8,8,8,8 NOOP_LAYERS= SCHEDULE=), or SAVE_FORMAT=torch_dist.
# Checkpoints hold the adapters (--lora-ckpt-filter); shell/ckpt_convert_deepseek3_merge_lora2hf.sh merges
# them into the unquantized base (re-converted without QLORA_NF4) or writes a PEFT adapter.
set -euo pipefail
QLORA=1 TP=${TP:-1} PP=${PP:-8} EP=${EP:-4} NUM_LAYER_LIST=${NUM_LAYER_LIST:-7,7,7,8,8,8,8,8} NNODES=${NNODES:-2} \
    exec bash "$(dirname "${BASH_SOURCE[0]}")/tune_deepseek3_671b_4k_lora_a3.sh" "$@"
