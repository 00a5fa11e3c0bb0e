#!/usr/bin/env bash
# DeepSeek-V3 671B pretraining, 4K sequences, on Atlas A2 (910B): 64 nodes x 8 NPUs = 512 by default.
# Run on every node:
#
#   NNODES=64 NODE_RANK=<this node> MASTER_ADDR=<node 0> HF_DIR=/data/DeepSeek-V3-bf16 \
#   DATA_PATH=/data/dsv3/enwiki_text_document CKPT_SAVE_DIR=/ckpt/dsv3 \
#   bash shell/pretrain_deepseek3_671b_4k_a2.sh
#
# HF_DIR: the HF model directory; its config.json gives the model shape and its tokenizer the
# vocabulary (the weights come from CKPT_LOAD_DIR, written by shell/ckpt_convert_deepseek3_hf2mcore.sh
# with this layout). Layout (environment): TP=4 PP=8 EP=8 with whole experts (ETP 1), layers
# padded to 64 with noop layers 61,62,63, full recompute of every layer (uniform, 1 at a time), the
# distributed optimizer; documents restart attention and positions (--reset-attention-mask).
# Also: NPUS_PER_NODE=8 MASTER_PORT=6000 GBS=3840 SEQ_LEN=4096 TRAIN_ITERS=2000 LR=1.0e-5
# CKPT_LOAD_DIR (absent: random initialisation), EXTRA_ARGS (appended flags), DRY_RUN=1 prints the command.
set -euo pipefail
# shellcheck source=shell/ascend_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/ascend_env.sh"

: "${HF_DIR:?set HF_DIR to the HF DeepSeek-V3 directory (config.json and tokenizer)}"
: "${DATA_PATH:?set DATA_PATH to the preprocessed data prefix (shell/data_convert_deepseek3_pretrain.sh)}"
: "${CKPT_SAVE_DIR:?set CKPT_SAVE_DIR to where checkpoints are written}"
NPUS_PER_NODE=${NPUS_PER_NODE:-8}
NNODES=${NNODES:-64}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
TP=${TP:-4}
PP=${PP:-8}
EP=${EP:-8}

launcher=(torchrun --nproc-per-node "$NPUS_PER_NODE" --nnodes "$NNODES" --node-rank "$NODE_RANK"
          --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
layout=(--tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --expert-model-parallel-size "$EP"
        --sequence-parallel --expert-tensor-parallel-size 1 --num-layers 64 --noop-layers 61,62,63
        --use-distributed-optimizer --recompute-granularity full --recompute-method uniform --recompute-num-layers 1)
model=(--hf-config "$HF_DIR" --use-mcore-models --moe-grouped-gemm --moe-token-dispatcher-type alltoall
       --use-flash-attn --mla-fa-without-pad --use-fused-rmsnorm --use-fused-swiglu --use-fused-rotary-pos-emb
       --moe-router-load-balancing-type noaux_tc --seq-aux --moe-aux-loss-coeff 0.0001
       --mtp-num-layers 1 --mtp-loss-scaling-factor 0.3 --make-vocab-size-divisible-by 1)
training=(--micro-batch-size 1 --global-batch-size "${GBS:-3840}" --seq-length "${SEQ_LEN:-4096}"
          --train-iters "${TRAIN_ITERS:-2000}" --lr "${LR:-1.0e-5}" --min-lr 1.0e-7 --lr-decay-style cosine
          --lr-warmup-iters 500 --weight-decay 1e-2 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.999
          --initial-loss-scale 65536 --bf16 --seed 1234)
data=(--data-path "$DATA_PATH" --split 100,0,0 --tokenizer-type PretrainedFromHF --tokenizer-name-or-path "$HF_DIR"
      --reset-position-ids --reset-attention-mask)
output=(--save "$CKPT_SAVE_DIR" --save-interval 2000 --log-interval 1 --eval-interval 2000 --eval-iters 0
        --log-jsonl "$CKPT_SAVE_DIR/metrics.jsonl" --distributed-timeout-minutes 120)
[[ -n "${CKPT_LOAD_DIR:-}" ]] && output+=(--load "$CKPT_LOAD_DIR" --finetune)

cmd=("${launcher[@]}" -m npu_dsv3.pretrain "${layout[@]}" "${model[@]}" "${training[@]}" "${data[@]}"
     "${output[@]}" ${EXTRA_ARGS:-})
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "${cmd[*]}"
    exit 0
fi
exec "${cmd[@]}"
