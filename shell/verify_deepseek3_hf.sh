#!/usr/bin/env bash
# Check that npu_dsv3's Megatron-Core DeepSeek-V3 gives transformers' logits on an
# HF checkpoint (world size 1). Prints one JSON line; exit 0 = passed, 1 = failed.
#
#   HF_DIR=/data/DeepSeek-V3-bf16 bash shell/verify_deepseek3_hf.sh
#
# Settings (environment): HF_DIR (required), DEVICE=cpu|npu|cuda (cpu),
# DTYPE=fp32|bf16 (fp32), SEQ_LENGTH (64), TOLERANCE (1e-4), DRY_RUN=1 prints the
# command instead of running it.
set -euo pipefail
# shellcheck source=shell/ascend_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/ascend_env.sh"

: "${HF_DIR:?set HF_DIR to the HF DeepSeek-V3 directory (config.json + safetensors)}"
DEVICE=${DEVICE:-cpu}
DTYPE=${DTYPE:-fp32}
SEQ_LENGTH=${SEQ_LENGTH:-64}
TOLERANCE=${TOLERANCE:-1e-4}
CANN_ENV=${CANN_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}

cmd=(npu-dsv3 verify --hf-dir "$HF_DIR" --device "$DEVICE" --dtype "$DTYPE"
     --seq-length "$SEQ_LENGTH" --tolerance "$TOLERANCE")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "${cmd[*]}"
    exit 0
fi
if [[ "$DEVICE" == npu && -f "$CANN_ENV" ]]; then
    # shellcheck disable=SC1090
    source "$CANN_ENV"
fi
exec "${cmd[@]}"
