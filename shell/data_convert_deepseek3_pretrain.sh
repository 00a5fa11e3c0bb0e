#!/usr/bin/env bash
# Pretraining text (jsonl / json / parquet: a file, a directory or a glob) -> the megatron indexed
# dataset a DeepSeek-V3 pretraining run reads with --data-path "${OUTPUT_PREFIX}_text_document".
#
#   INPUT=/data/enwiki TOKENIZER_DIR=/data/DeepSeek-V3 OUTPUT_PREFIX=/data/dsv3/enwiki \
#       bash shell/data_convert_deepseek3_pretrain.sh
#
# JSON_KEYS="text" (record fields, one dataset each), WORKERS=8, APPEND_EOD=1 (end each document
# with eos; needed by --reset-position-ids / --reset-attention-mask), MAX_MALFORMED_FRACTION=0
# (fail if any record is malformed; e.g. 0.001 skips and reports up to 0.1%),
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
# shellcheck source=shell/ascend_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/ascend_env.sh"

: "${INPUT:?set INPUT to a jsonl/json/parquet file, a directory or a glob}"
: "${TOKENIZER_DIR:?set TOKENIZER_DIR to the HF tokenizer directory (the model directory is fine)}"
: "${OUTPUT_PREFIX:?set OUTPUT_PREFIX, e.g. /data/dsv3/enwiki}"

# JSON_KEYS is a space-separated list: left unquoted on purpose, one argument per key.
# shellcheck disable=SC2206
cmd=(npu-dsv3 data preprocess --input "$INPUT" --tokenizer-type PretrainedFromHF
     --tokenizer-name-or-path "$TOKENIZER_DIR" --output-prefix "$OUTPUT_PREFIX"
     --handler-name GeneralPretrainHandler --json-keys ${JSON_KEYS:-text}
     --workers "${WORKERS:-8}" --max-malformed-fraction "${MAX_MALFORMED_FRACTION:-0}")
[[ "${APPEND_EOD:-1}" == 1 ]] && cmd+=(--append-eod)

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "${cmd[*]}"
    exit 0
fi
exec "${cmd[@]}"
