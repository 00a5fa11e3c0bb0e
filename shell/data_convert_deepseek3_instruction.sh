#!/usr/bin/env bash
# Instruction data (Alpaca- or ShareGPT-style jsonl / json / parquet) -> the packed megatron datasets
# a DeepSeek-V3 fine-tuning run reads with --data-path "$OUTPUT_PREFIX":
# ${OUTPUT_PREFIX}_packed_{input_ids,labels,attention_mask}_document.bin/.idx, rendered with the
# DeepSeek-V3 chat template, the prompt masked out of the labels (-100).
#
#   INPUT=/data/alpaca TOKENIZER_DIR=/data/DeepSeek-V3 OUTPUT_PREFIX=/data/dsv3/alpaca \
#       bash shell/data_convert_deepseek3_instruction.sh
#
# HANDLER=AlpacaStyleInstructionHandler (or SharegptStyleInstructionHandler), SEQ_LENGTH=4096
# (longer samples are dropped and counted), PACK=1 (pack samples into SEQ_LENGTH sequences; train
# with --reset-attention-mask so each sample attends only to itself), MAP_KEYS='{"prompt": "question"}'
# renames fields, WORKERS=8, MAX_MALFORMED_FRACTION=0 (fail on any malformed record),
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
# shellcheck source=shell/ascend_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/ascend_env.sh"

: "${INPUT:?set INPUT to a jsonl/json/parquet file, a directory or a glob}"
: "${TOKENIZER_DIR:?set TOKENIZER_DIR to the HF tokenizer directory (the model directory is fine)}"
: "${OUTPUT_PREFIX:?set OUTPUT_PREFIX, e.g. /data/dsv3/alpaca}"

cmd=(npu-dsv3 data preprocess --input "$INPUT" --tokenizer-type PretrainedFromHF
     --tokenizer-name-or-path "$TOKENIZER_DIR" --output-prefix "$OUTPUT_PREFIX"
     --handler-name "${HANDLER:-AlpacaStyleInstructionHandler}" --prompt-type deepseek3
     --seq-length "${SEQ_LENGTH:-4096}" --workers "${WORKERS:-8}"
     --max-malformed-fraction "${MAX_MALFORMED_FRACTION:-0}")
[[ "${PACK:-1}" == 1 ]] && cmd+=(--pack)
[[ -n "${MAP_KEYS:-}" ]] && cmd+=(--map-keys "$MAP_KEYS")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "${cmd[*]}"
    exit 0
fi
exec "${cmd[@]}"
