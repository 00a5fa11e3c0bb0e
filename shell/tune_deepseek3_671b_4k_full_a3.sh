#!/usr/bin/env bash
# DeepSeek-V3 671B full-parameter supervised fine-tuning, 4K sequences, on Atlas A3 (910C)
# (MindSpeed-LLM's tune_deepseek3_671b_4k_full_ptd.sh): 16 nodes x 16 NPUs = 256 by default.
# Run on every node:
#
#   NNODES=16 NODE_RANK=<this node> MASTER_ADDR=<node 0> HF_DIR=/data/DeepSeek-V3-bf16 \
#   DATA_PATH=/data/dsv3/alpaca CKPT_LOAD_DIR=/ckpt/dsv3-tp2pp16ep8 CKPT_SAVE_DIR=/ckpt/dsv3-sft \
#   bash shell/tune_deepseek3_671b_4k_full_a3.sh
#
# HF_DIR: the HF model directory; its config.json gives the model shape and its tokenizer the chat
# template's tokens. CKPT_LOAD_DIR: the weights, written by shell/ckpt_convert_deepseek3_hf2mcore.sh with
# this layout (TP=2 PP=16 EP=8 NOOP_LAYERS=47,62,63 SCHEDULE= MOE_TP_EXTEND_EP=1). DATA_PATH: the prefix
# shell/data_convert_deepseek3_instruction.sh wrote. Layout (environment): TP=2 PP=16 EP=8, experts split
# over EP x TP (--moe-tp-extend-ep), layers padded to 64 with noop layers 47,62,63, full recompute of every
# layer, the distributed optimizer. PACKED=1 (the instruction recipe's default, PACK=1): each packed
# sample attends only to itself (--reset-attention-mask); PACKED=0: unpacked samples, each micro-batch
# padded to its longest (--variable-seq-lengths).
# Also: NPUS_PER_NODE=16 MASTER_PORT=6000 GBS=1024 SEQ_LEN=4096 TRAIN_ITERS=2000 LR=1.0e-5
# SAVE_INTERVAL=500, SPLIT=100,0,0 with EVAL_ITERS=0 (give the validation split a share, e.g.
# SPLIT=98,2,0 EVAL_ITERS=10 EVAL_INTERVAL=100, to evaluate), EXTRA_ARGS (appended flags),
# DRY_RUN=1 prints the command.
set -euo pipefail
# shellcheck source=shell/ascend_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/ascend_env.sh"

: "${HF_DIR:?set HF_DIR to the HF DeepSeek-V3 directory (config.json and tokenizer)}"
: "${DATA_PATH:?set DATA_PATH to the instruction data prefix (shell/data_convert_deepseek3_instruction.sh)}"
: "${CKPT_LOAD_DIR:?set CKPT_LOAD_DIR to the converted checkpoint fine-tuning starts from}"
: "${CKPT_SAVE_DIR:?set CKPT_SAVE_DIR to where checkpoints are written}"
NPUS_PER_NODE=${NPUS_PER_NODE:-16}
NNODES=${NNODES:-16}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
TP=${TP:-2}
PP=${PP:-16}
EP=${EP:-8}

launcher=(torchrun --nproc-per-node "$NPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
          --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
finetune=(--stage sft --is-instruction-dataset --prompt-type deepseek3 --finetune)
layout=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP"
        --sequence-parallel --moe-tp-extend-ep --num-layers 64 --noop-layers 47,62,63
        --use-distributed-optimizer --recompute-granularity full --recompute-method uniform --recompute-num-layers 1)
model=(--hf-config "$HF_DIR" --use-mcore-models --moe-grouped-gemm --moe-token-dispatcher-type alltoall
       --use-flash-attn --use-fused-rmsnorm --use-fused-swiglu --use-fused-rotary-pos-emb
       --moe-router-load-balancing-type noaux_tc --seq-aux --moe-aux-loss-coeff 0.001
       --mtp-num-layers 1 --mtp-loss-scaling-factor 0.3 --make-vocab-size-divisible-by 1)
training=(--micro-batch-size 1 --global-batch-size "${GBS:-1024}" --seq-length "${SEQ_LEN:-4096}"
          --train-iters "${TRAIN_ITERS:-2000}" --lr "${LR:-1.0e-5}" --min-lr 1.0e-7 --lr-decay-style cosine
          --weight-decay 1e-2 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.999 --bf16 --seed 1234)
data=(--data-path "$DATA_PATH" --split "${SPLIT:-100,0,0}" --tokenizer-type PretrainedFromHF
      --tokenizer-name-or-path "$HF_DIR")
if [[ "${PACKED:-1}" == 1 ]]; then
    data+=(--reset-attention-mask)
else
    data+=(--variable-seq-lengths)
fi
output=(--load "$CKPT_LOAD_DIR" --no-load-optim --no-load-rng --save "$CKPT_SAVE_DIR" --no-save-optim
        --no-save-rng --save-interval "${SAVE_INTERVAL:-500}" --log-interval 1
        --eval-interval "${EVAL_INTERVAL:-500}" --eval-iters "${EVAL_ITERS:-0}"
        --log-jsonl "$CKPT_SAVE_DIR/metrics.jsonl" --distributed-timeout-minutes 120)

# EXTRA_ARGS is a flag list: left unquoted on purpose, one argument per word.
# shellcheck disable=SC2206
cmd=("${launcher[@]}" -m npu_dsv3.finetune "${finetune[@]}" "${layout[@]}" "${model[@]}" "${training[@]}"
     "${data[@]}" "${output[@]}" ${EXTRA_ARGS:-})
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "${cmd[*]}"
    exit 0
fi
exec "${cmd[@]}"
