#!/usr/bin/env bash
# A megatron DeepSeek-V3 checkpoint (written by hf2mcore or by training) -> HF safetensors
# (<= 5 GB shards, index, config.json, tokenizer files) that transformers loads.
#
#   LOAD_DIR=/data/dsv3-mcore-tp2pp8ep32 SAVE_DIR=/data/DeepSeek-V3-trained bash shell/ckpt_convert_deepseek3_mcore2hf.sh
#
# Source layout (environment; defaults: the published A3 pretraining recipe): TP=2 PP=8 EP=32 ETP=1,
# NUM_LAYERS=64 NOOP_LAYERS=61,62,63, NUM_LAYER_LIST, VPP_LAYERS (layers per virtual stage),
# SCHEDULE=dualpipev, GROUPED_GEMM=1; MOE_TP_EXTEND_EP=1 and MLA_MM_SPLIT=1 (off by default; the A3
# recipe trains with --mla-mm-split) add those flags, MTP_NUM_LAYERS=0 leaves MTP out (model sizes
# default to config.json's). RESUME=1 continues an interrupted run,
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
# shellcheck source=shell/ascend_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/ascend_env.sh"

: "${LOAD_DIR:?set LOAD_DIR to the megatron checkpoint directory}"
: "${SAVE_DIR:?set SAVE_DIR to the HF directory to write}"
TP=${TP:-2}
PP=${PP:-8}
EP=${EP:-32}
ETP=${ETP:-1}
NUM_LAYERS=${NUM_LAYERS:-64}
NOOP_LAYERS=${NOOP_LAYERS-61,62,63}
SCHEDULE=${SCHEDULE-dualpipev}

cmd=(npu-dsv3 convert mcore2hf --load-dir "$LOAD_DIR" --save-dir "$SAVE_DIR"
     --source-tensor-parallel-size "$TP" --source-pipeline-parallel-size "$PP"
     --source-expert-parallel-size "$EP" --expert-tensor-parallel-size "$ETP"
     --num-layers "$NUM_LAYERS")
[[ -n "$NOOP_LAYERS" ]] && cmd+=(--noop-layers "$NOOP_LAYERS")
[[ -n "${NUM_LAYER_LIST:-}" ]] && cmd+=(--num-layer-list "$NUM_LAYER_LIST")
[[ -n "${VPP_LAYERS:-}" ]] && cmd+=(--num-layers-per-virtual-pipeline-stage "$VPP_LAYERS")
[[ -n "$SCHEDULE" ]] && cmd+=(--schedules-method "$SCHEDULE")
[[ "${GROUPED_GEMM:-1}" == 1 ]] && cmd+=(--moe-grouped-gemm)
[[ "${MOE_TP_EXTEND_EP:-0}" == 1 ]] && cmd+=(--moe-tp-extend-ep)
[[ "${MLA_MM_SPLIT:-0}" == 1 ]] && cmd+=(--mla-mm-split)
[[ -n "${MTP_NUM_LAYERS:-}" ]] && cmd+=(--mtp-num-layers "$MTP_NUM_LAYERS")
[[ "${RESUME:-0}" == 1 ]] && cmd+=(--resume)

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "${cmd[*]}"
    exit 0
fi
exec "${cmd[@]}"
