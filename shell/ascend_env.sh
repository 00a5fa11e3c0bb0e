# Sourced by the training recipes: the Ascend environment MindSpeed-LLM's recipes set, each overridable
# (set it before running the recipe). CANN's set_env.sh is sourced when present (CANN_ENV; skipped on a
# machine without CANN, e.g. for DRY_RUN=1). With DRY_RUN=1 the values are printed to stderr.
CANN_ENV=${CANN_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
if [[ -f "$CANN_ENV" ]]; then
    # shellcheck disable=SC1090
    source "$CANN_ENV"
fi
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron's communication ordering
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-3600}
export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-3600}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}
export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    for name in CANN_ENV CUDA_DEVICE_MAX_CONNECTIONS PYTORCH_NPU_ALLOC_CONF HCCL_CONNECT_TIMEOUT HCCL_EXEC_TIMEOUT \
                TASK_QUEUE_ENABLE CPU_AFFINITY_CONF; do
        echo "$name=${!name}" >&2
    done
fi
