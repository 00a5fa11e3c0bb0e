#!/usr/bin/env bash
# LoRA adapters of a training run -> HF: merged into the base weights (W + alpha / r x B A, in fp32, streamed
# like mcore2hf), or with SAVE_LORA_TO_HF=1 a PEFT adapter directory (adapter_config.json,
# adapter_model.safetensors) that peft.PeftModel.from_pretrained loads on transformers' DeepseekV3ForCausalLM.
#
#   LOAD_DIR=/ckpt/dsv3-tp1pp4ep16 LORA_LOAD=/ckpt/dsv3-lora SAVE_DIR=/data/DeepSeek-V3-lora-merged \
#   bash shell/ckpt_convert_deepseek3_merge_lora2hf.sh
#   LOAD_DIR=/ckpt/dsv3-lora SAVE_LORA_TO_HF=1 SAVE_DIR=/data/dsv3-lora-adapter \
#   bash shell/ckpt_convert_deepseek3_merge_lora2hf.sh
#
# LOAD_DIR: the base checkpoint (either format, the layout it records), or for SAVE_LORA_TO_HF=1 the LoRA
# checkpoint; LORA_LOAD: the LoRA checkpoint (either format, any layout; its lora_config.json gives r,
# alpha and the targets); LORA_R / LORA_ALPHA, when set, must match it. RESUME=1 continues an interrupted
# merge, DRY_RUN=1 prints the command.
set -euo pipefail
# shellcheck source=shell/ascend_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/ascend_env.sh"

: "${LOAD_DIR:?set LOAD_DIR to the base checkpoint (or the LoRA checkpoint with SAVE_LORA_TO_HF=1)}"
: "${SAVE_DIR:?set SAVE_DIR to the directory to write}"

cmd=(npu-dsv3 convert mcore2hf --load-dir "$LOAD_DIR" --save-dir "$SAVE_DIR")
[[ -n "${LORA_LOAD:-}" ]] && cmd+=(--lora-load "$LORA_LOAD")
[[ -n "${LORA_R:-}" ]] && cmd+=(--lora-r "$LORA_R")
[[ -n "${LORA_ALPHA:-}" ]] && cmd+=(--lora-alpha "$LORA_ALPHA")
[[ "${SAVE_LORA_TO_HF:-0}" == 1 ]] && cmd+=(--save-lora-to-hf)
[[ "${RESUME:-0}" == 1 ]] && cmd+=(--resume)
if [[ "${SAVE_LORA_TO_HF:-0}" != 1 && -z "${LORA_LOAD:-}" ]]; then
    echo "set LORA_LOAD to the LoRA checkpoint to merge (or SAVE_LORA_TO_HF=1 to export LOAD_DIR's adapters)" >&2
    exit 2
fi

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "${cmd[*]}"
    exit 0
fi
exec "${cmd[@]}"
