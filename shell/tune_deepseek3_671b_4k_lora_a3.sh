#!/usr/bin/env bash
# DeepSeek-V3 671B LoRA supervised fine-tuning, 4K sequences, on Atlas A3: MindSpeed-LLM's
# tune_deepseek3_671b_4k_lora_ptd.sh layout, 4 nodes x 16 NPUs = 64 by default. Run on every node:
#
#   NNODES=4 NODE_RANK=<this node> MASTER_ADDR=<node 0> HF_DIR=/data/DeepSeek-V3-bf16 \
#   DATA_PATH=/data/dsv3/alpaca CKPT_LOAD_DIR=/ckpt/dsv3-tp1pp4ep16 CKPT_SAVE_DIR=/ckpt/dsv3-lora \
#   bash shell/tune_deepseek3_671b_4k_lora_a3.sh
#
# The base weights are frozen; adapters of rank 8 (alpha 16) train on MLA's down-projections
# (linear_qkv), linear_proj and every fc1/fc2 -- dense MLPs, shared and routed experts (per expert,
# grouped GEMM). CKPT_LOAD_DIR: the base, written by shell/ckpt_convert_deepseek3_hf2mcore.sh with this
# layout (TP=1 PP=4 EP=16 NUM_LAYER_LIST=15,15,16,15 NOOP_LAYERS= SCHEDULE= MOE_TP_EXTEND_EP=0).
# Checkpoints hold the adapters only (--lora-ckpt-filter); LORA_LOAD=<a LoRA checkpoint> continues one
# (--lora-load); shell/ckpt_convert_deepseek3_merge_lora2hf.sh merges them into HF weights or writes a
# PEFT adapter. Left out of MindSpeed's recipe: --recompute-activation-function (refused: use
# --recompute-modules moe_act, here full recompute) and --lora-register-forward-hook (nothing to hook).
# Also: NPUS_PER_NODE=16 MASTER_PORT=6000 GBS=64 SEQ_LEN=4096 TRAIN_ITERS=2000 LR=1.0e-5 LORA_R=8
# LORA_ALPHA=16 SAVE_INTERVAL=500, EXTRA_ARGS (appended flags), DRY_RUN=1 prints the environment and command.
# QLoRA (shell/tune_deepseek3_671b_4k_qlora_a3.sh runs this recipe so): QLORA=1 adds --qlora (the base
# converted with QLORA_NF4=1), QLORA_SAVE_DEQUANTIZE=1 saves the whole model with the base
# dequantized (--qlora-save-dequantize instead of --lora-ckpt-filter); TP PP EP NUM_LAYER_LIST
# set the layout (defaults: the LoRA one above).
set -euo pipefail
# shellcheck source=shell/ascend_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/ascend_env.sh"

: "${HF_DIR:?set HF_DIR to the HF DeepSeek-V3 directory (config.json and tokenizer)}"
: "${DATA_PATH:?set DATA_PATH to the instruction data prefix (shell/data_convert_deepseek3_instruction.sh)}"
: "${CKPT_LOAD_DIR:?set CKPT_LOAD_DIR to the converted base checkpoint}"
: "${CKPT_SAVE_DIR:?set CKPT_SAVE_DIR to where the adapters are written}"
NPUS_PER_NODE=${NPUS_PER_NODE:-16}
NNODES=${NNODES:-4}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}

launcher=(torchrun --nproc-per-node "$NPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
          --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
finetune=(--stage sft --is-instruction-dataset --prompt-type deepseek3 --finetune)
lora=(--lora-r "${LORA_R:-8}" --lora-alpha "${LORA_ALPHA:-16}" --lora-fusion
      --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2)
# saves: the adapters only, or (QLoRA) the whole model with its NF4 base dequantized
if [[ "${QLORA_SAVE_DEQUANTIZE:-0}" == 1 ]]; then lora+=(--qlora-save-dequantize); else lora+=(--lora-ckpt-filter); fi
[[ -n "${LORA_LOAD:-}" ]] && lora+=(--lora-load "$LORA_LOAD")
[[ "${QLORA:-0}" == 1 ]] && lora+=(--qlora)
layout=(--tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-4}"
        --expert-model-parallel-size "${EP:-16}" --num-layer-list "${NUM_LAYER_LIST:-15,15,16,15}"
        --use-distributed-optimizer
        --recompute-granularity full --recompute-method uniform --recompute-num-layers 1)
model=(--hf-config "$HF_DIR" --use-mcore-models --moe-grouped-gemm --moe-token-dispatcher-type alltoall
       --use-flash-attn --use-fused-rmsnorm --use-fused-swiglu --use-fused-rotary-pos-emb
       --moe-router-load-balancing-type noaux_tc --seq-aux --moe-aux-loss-coeff 0.001
       --mtp-num-layers 1 --mtp-loss-scaling-factor 0.3 --make-vocab-size-divisible-by 1)
training=(--micro-batch-size 1 --global-batch-size "${GBS:-64}" --seq-length "${SEQ_LEN:-4096}"
          --train-iters "${TRAIN_ITERS:-2000}" --lr "${LR:-1.0e-5}" --min-lr 1.0e-7 --lr-decay-style cosine
          --weight-decay 1e-2 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.999 --bf16 --seed 1234)
data=(--data-path "$DATA_PATH" --split "${SPLIT:-100,0,0}" --tokenizer-type PretrainedFromHF
      --tokenizer-name-or-path "$HF_DIR" --reset-attention-mask)
output=(--load "$CKPT_LOAD_DIR" --save "$CKPT_SAVE_DIR" --save-interval "${SAVE_INTERVAL:-500}" --log-interval 1
        --eval-interval "${EVAL_INTERVAL:-500}" --eval-iters "${EVAL_ITERS:-0}"
        --log-jsonl "$CKPT_SAVE_DIR/metrics.jsonl" --distributed-timeout-minutes 120)

# EXTRA_ARGS is a flag list: left unquoted on purpose, one argument per word.
# shellcheck disable=SC2206
cmd=("${launcher[@]}" -m npu_dsv3.finetune "${finetune[@]}" "${lora[@]}" "${layout[@]}" "${model[@]}"
     "${training[@]}" "${data[@]}" "${output[@]}" ${EXTRA_ARGS:-})
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "${cmd[*]}"
    exit 0
fi
exec "${cmd[@]}"
