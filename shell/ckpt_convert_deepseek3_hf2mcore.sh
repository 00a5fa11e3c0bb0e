#!/usr/bin/env bash
# HF DeepSeek-V3 (BF16, or DeepSeek's FP8 release read directly) -> the megatron checkpoint
# a training run with the same layout loads with --load.
#
#   LOAD_DIR=/data/DeepSeek-V3 SAVE_DIR=/data/dsv3-mcore-tp2pp8ep32 bash shell/ckpt_convert_deepseek3_hf2mcore.sh
#
# Layout (environment; defaults: the published A3 pretraining recipe): TP=2 PP=8 EP=32 ETP=1,
# NUM_LAYERS=64 NOOP_LAYERS=61,62,63, NUM_LAYER_LIST, VPP_LAYERS (layers per virtual stage),
# SCHEDULE=dualpipev, GROUPED_GEMM=1; MOE_TP_EXTEND_EP=1 and MLA_MM_SPLIT=1 (off by default; the A3
# recipe trains with --mla-mm-split) add those flags, MTP_NUM_LAYERS=0 leaves MTP out,
# FIRST_K_DENSE_REPLACE keeps fewer dense layers (model sizes default to config.json's).
# SAVE_FORMAT=torch (default: per-rank mp_rank_* files of exactly this layout) or torch_dist
# (megatron dist_checkpointing: one copy of each tensor, loadable by any layout with this TP).
# QLORA_NF4=1 writes QLoRA's base: every targetable linear in NF4 (--qlora-nf4; either format, grouped GEMM).
# WORKERS=8, RESUME=1 continues an interrupted run, DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
# shellcheck source=shell/ascend_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/ascend_env.sh"

: "${LOAD_DIR:?set LOAD_DIR to the HF checkpoint directory}"
: "${SAVE_DIR:?set SAVE_DIR to the megatron checkpoint directory to write}"
TP=${TP:-2}
PP=${PP:-8}
EP=${EP:-32}
ETP=${ETP:-1}
NUM_LAYERS=${NUM_LAYERS:-64}
NOOP_LAYERS=${NOOP_LAYERS-61,62,63}
SCHEDULE=${SCHEDULE-dualpipev}
WORKERS=${WORKERS:-8}

cmd=(npu-dsv3 convert hf2mcore --load-dir "$LOAD_DIR" --save-dir "$SAVE_DIR"
     --target-tensor-parallel-size "$TP" --target-pipeline-parallel-size "$PP"
     --target-expert-parallel-size "$EP" --expert-tensor-parallel-size "$ETP"
     --num-layers "$NUM_LAYERS" --workers "$WORKERS" --save-format "${SAVE_FORMAT:-torch}")
[[ -n "$NOOP_LAYERS" ]] && cmd+=(--noop-layers "$NOOP_LAYERS")
[[ -n "${NUM_LAYER_LIST:-}" ]] && cmd+=(--num-layer-list "$NUM_LAYER_LIST")
[[ -n "${VPP_LAYERS:-}" ]] && cmd+=(--num-layers-per-virtual-pipeline-stage "$VPP_LAYERS")
[[ -n "$SCHEDULE" ]] && cmd+=(--schedules-method "$SCHEDULE")
[[ "${GROUPED_GEMM:-1}" == 1 ]] && cmd+=(--moe-grouped-gemm)
[[ "${MOE_TP_EXTEND_EP:-0}" == 1 ]] && cmd+=(--moe-tp-extend-ep)
[[ "${MLA_MM_SPLIT:-0}" == 1 ]] && cmd+=(--mla-mm-split)
[[ -n "${MTP_NUM_LAYERS:-}" ]] && cmd+=(--mtp-num-layers "$MTP_NUM_LAYERS")
[[ -n "${FIRST_K_DENSE_REPLACE:-}" ]] && cmd+=(--first-k-dense-replace "$FIRST_K_DENSE_REPLACE")
[[ "${QLORA_NF4:-0}" == 1 ]] && cmd+=(--qlora-nf4)
[[ "${RESUME:-0}" == 1 ]] && cmd+=(--resume)

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "${cmd[*]}"
    exit 0
fi
exec "${cmd[@]}"
