"""The flags of Ascend/MindSpeed-LLM's DeepSeek-V3 recipes, shell variables replaced by the values each recipe
sets (paths by placeholders); torch.distributed.launch's own arguments left out."""

import shlex


# examples/mcore/deepseek3/pretrain_deepseek3_671b_4k_A3_ptd.sh @ 015ce048f5e153459447556f979ccf64a9ca8e82
# (32 nodes x 16 NPUs = 512)
PRETRAIN_A3 = """
--spec mindspeed_llm.tasks.models.spec.deepseek_spec layer_spec --reset-position-ids
--gemm-gradient-accumulation-fusion --noop-layers 61,62,63 --manual-gc --manual-gc-interval 50 --no-shared-storage
--use-distributed-optimizer --use-flash-attn --use-mcore-models --tensor-model-parallel-size 2
--pipeline-model-parallel-size 8 --expert-model-parallel-size 16 --sequence-parallel --context-parallel-size 1
--context-parallel-algo ulysses_cp_algo --num-layers 64 --hidden-size 7168 --ffn-hidden-size 18432
--num-attention-heads 128 --tokenizer-type PretrainedFromHF --tokenizer-name-or-path TOKENIZER --seq-length 4096
--max-position-embeddings 163840 --micro-batch-size 1 --global-batch-size 3840 --make-vocab-size-divisible-by 1
--lr 1.0e-5 --train-iters 2000 --lr-decay-style cosine --untie-embeddings-and-output-weights --disable-bias-linear
--attention-dropout 0.0 --init-method-std 0.02 --hidden-dropout 0.0 --position-embedding-type rope
--normalization RMSNorm --use-fused-rotary-pos-emb --use-rotary-position-embeddings --use-fused-swiglu
--use-fused-rmsnorm --swiglu --no-masked-softmax-fusion --attention-softmax-in-fp32 --min-lr 1.0e-7
--weight-decay 1e-2 --lr-warmup-iters 500 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.999
--initial-loss-scale 65536 --vocab-size 129280 --padded-vocab-size 129280 --rotary-base 10000 --norm-epsilon 1e-6
--no-load-optim --no-load-rng --bf16 --distributed-timeout-minutes 120
--data-path DATA --split 100,0,0
--log-interval 1 --save-interval 2000 --eval-interval 2000 --eval-iters 0 --no-save-optim --no-save-rng
--multi-head-latent-attention --qk-rope-head-dim 64 --qk-nope-head-dim 128 --q-lora-rank 1536 --kv-lora-rank 512
--v-head-dim 128 --qk-layernorm --mla-mm-split --mla-fa-without-pad
--moe-fb-overlap --schedules-method dualpipev
--mtp-mem-efficient-logits --swap-optimizer --recompute-granularity full --recompute-method block
--recompute-num-layers 8
--rope-scaling-beta-fast 32 --rope-scaling-beta-slow 1 --rope-scaling-factor 40 --rope-scaling-mscale 1.0
--rope-scaling-mscale-all-dim 1.0 --rope-scaling-original-max-position-embeddings 4096 --rope-scaling-type yarn
--moe-grouped-gemm --moe-permutation-async-comm --moe-token-dispatcher-type alltoall_seq --first-k-dense-replace 3
--moe-layer-freq 1 --n-shared-experts 1 --num-experts 256 --moe-router-topk 8 --moe-intermediate-size 2048
--moe-ffn-hidden-size 2048 --moe-router-load-balancing-type noaux_tc --n-group 8 --topk-group 4
--routed-scaling-factor 2.5 --moe-aux-loss-coeff 0.0001 --seq-aux --norm-topk-prob --moe-router-score-function sigmoid
--moe-router-enable-expert-bias --moe-tp-extend-ep --router-gating-in-fp32
--mtp-num-layers 1 --mtp-loss-scaling-factor 0.3
--save SAVE --load LOAD --distributed-backend nccl
"""

# examples/mcore/deepseek3/pretrain_deepseek3_671b_4k_ptd.sh @ 6209b298bafa9b3298ccd59e1236b31ac403da2f
# (64 nodes x 8 NPUs = 512; megatron's names for MLA, router groups and YaRN betas)
PRETRAIN_A2 = """
--spec mindspeed_llm.tasks.models.spec.deepseek_spec layer_spec --reset-attention-mask
--gemm-gradient-accumulation-fusion --noop-layers 61,62,63 --manual-gc --manual-gc-interval 50 --no-shared-storage
--use-flash-attn --use-mcore-models --tensor-model-parallel-size 4 --pipeline-model-parallel-size 8
--expert-model-parallel-size 8 --sequence-parallel --context-parallel-size 1 --context-parallel-algo ulysses_cp_algo
--num-layers 64 --hidden-size 7168 --ffn-hidden-size 18432 --num-attention-heads 128 --tokenizer-type PretrainedFromHF
--tokenizer-name-or-path TOKENIZER --seq-length 4096 --max-position-embeddings 163840 --micro-batch-size 1
--global-batch-size 3840 --make-vocab-size-divisible-by 1 --lr 1.0e-5 --train-iters 2000 --lr-decay-style cosine
--untie-embeddings-and-output-weights --disable-bias-linear --attention-dropout 0.0 --init-method-std 0.02
--hidden-dropout 0.0 --position-embedding-type rope --normalization RMSNorm --use-fused-rotary-pos-emb
--use-rotary-position-embeddings --use-fused-swiglu --use-fused-rmsnorm --swiglu --no-masked-softmax-fusion
--attention-softmax-in-fp32 --min-lr 1.0e-7 --weight-decay 1e-2 --lr-warmup-iters 500 --clip-grad 1.0
--adam-beta1 0.9 --adam-beta2 0.999 --initial-loss-scale 65536 --vocab-size 129280 --padded-vocab-size 129280
--rotary-base 10000 --norm-epsilon 1e-6 --no-load-optim --no-load-rng --bf16 --use-ascend-coc --coc-fused-kernel
--distributed-timeout-minutes 120
--data-path DATA --split 100,0,0
--log-interval 1 --save-interval 2000 --eval-interval 2000 --eval-iters 0 --no-save-optim --no-save-rng
--multi-latent-attention --qk-pos-emb-head-dim 64 --qk-head-dim 128 --q-lora-rank 1536 --kv-lora-rank 512
--v-head-dim 128 --qk-layernorm --mla-fa-without-pad
--beta-fast 32 --beta-slow 1 --rope-scaling-factor 40 --rope-scaling-mscale 1.0 --rope-scaling-mscale-all-dim 1.0
--rope-scaling-original-max-position-embeddings 4096 --rope-scaling-type yarn
--moe-router-dtype fp32 --moe-grouped-gemm --moe-permutation-async-comm --moe-token-dispatcher-type alltoall
--moe-permute-fusion --first-k-dense-replace 3 --moe-layer-freq 1 --n-shared-experts 1 --num-experts 256
--moe-router-topk 8 --moe-ffn-hidden-size 2048 --moe-router-load-balancing-type none --moe-router-num-groups 8
--moe-router-group-topk 4 --moe-router-topk-scaling-factor 2.5 --moe-aux-loss-coeff 0.0001 --seq-aux
--norm-topk-prob --moe-router-score-function sigmoid --moe-router-enable-expert-bias --expert-tensor-parallel-size 1
--mtp-num-layers 1 --mtp-loss-scaling-factor 0.3 --mtp-mem-efficient-logits
--moe-fb-overlap --schedules-method dualpipev
--swap-optimizer --swap-optimizer-times 4 --use-distributed-optimizer --recompute-method uniform
--recompute-granularity full --recompute-num-layers 1
--distributed-backend nccl --save SAVE --load LOAD
"""

# examples/mcore/deepseek3/tune_deepseek3_671b_4k_full_A3_ptd.sh @ 015ce048f5e153459447556f979ccf64a9ca8e82
# (16 nodes x 16 NPUs = 256; --topk-group without --n-group)
TUNE_FULL_A3 = """
--spec mindspeed_llm.tasks.models.spec.deepseek_spec layer_spec --recompute-granularity full
--recompute-method uniform --recompute-num-layers 1 --use-distributed-optimizer --reuse-fp32-param --use-flash-attn
--shape-order BNSD --use-mcore-models --noop-layers 47,62,63 --tensor-model-parallel-size 2
--pipeline-model-parallel-size 16 --expert-model-parallel-size 8 --sequence-parallel --context-parallel-size 1
--context-parallel-algo ulysses_cp_algo --num-layers 64 --hidden-size 7168 --ffn-hidden-size 18432
--num-attention-heads 128 --tokenizer-type PretrainedFromHF --tokenizer-name-or-path TOKENIZER --seq-length 4096
--max-position-embeddings 163840 --make-vocab-size-divisible-by 1 --untie-embeddings-and-output-weights
--disable-bias-linear --attention-dropout 0.0 --hidden-dropout 0.0 --position-embedding-type rope
--normalization RMSNorm --use-fused-rotary-pos-emb --use-rotary-position-embeddings --use-fused-swiglu
--use-fused-rmsnorm --swiglu --no-masked-softmax-fusion --attention-softmax-in-fp32 --vocab-size 129280
--padded-vocab-size 129280 --rotary-base 10000 --norm-epsilon 1e-6 --distributed-timeout-minutes 120
--no-load-optim --no-load-rng --no-save-optim --no-save-rng --seed 1234 --load LOAD --save SAVE
--no-shared-storage --data-path DATA --split 100,0,0
--micro-batch-size 1 --global-batch-size 1024 --train-iters 2000 --lr 1.0e-5 --lr-decay-style cosine
--init-method-std 0.02 --min-lr 1.0e-7 --weight-decay 1e-2 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.999
--initial-loss-scale 65536 --bf16
--log-interval 1 --save-interval 500 --eval-interval 500 --eval-iters 0
--multi-head-latent-attention --qk-rope-head-dim 64 --qk-nope-head-dim 128 --q-lora-rank 1536 --kv-lora-rank 512
--v-head-dim 128 --qk-layernorm
--rope-scaling-beta-fast 32 --rope-scaling-beta-slow 1 --rope-scaling-factor 40 --rope-scaling-mscale 1.0
--rope-scaling-mscale-all-dim 1.0 --rope-scaling-original-max-position-embeddings 4096 --rope-scaling-type yarn
--mtp-num-layers 1 --mtp-loss-scaling-factor 0.3 --recompute-mtp-layer --recompute-mtp-norm
--moe-grouped-gemm --moe-permutation-async-comm --moe-tp-extend-ep --moe-alltoall-overlap-comm
--moe-token-dispatcher-type alltoall_seq --first-k-dense-replace 3 --moe-layer-freq 1 --n-shared-experts 1
--num-experts 256 --moe-router-topk 8 --moe-intermediate-size 2048 --moe-ffn-hidden-size 2048
--moe-router-load-balancing-type noaux_tc --topk-group 4 --routed-scaling-factor 2.5 --seq-aux
--moe-aux-loss-coeff 0.001 --norm-topk-prob --moe-router-score-function sigmoid --moe-router-enable-expert-bias
--finetune --stage sft --is-instruction-dataset --variable-seq-lengths
--distributed-backend nccl
"""

# examples/mcore/deepseek3/tune_deepseek3_671b_4k_lora_A3_ptd.sh @ 015ce048f5e153459447556f979ccf64a9ca8e82:
# the flags it adds to the full fine-tuning recipe.
TUNE_LORA_A3_EXTRA = """
--num-layer-list 15,15,16,15 --prompt-type deepseek3 --recompute-activation-function --log-throughput
--lora-r 8 --lora-alpha 16 --lora-fusion --lora-target-modules linear_qkv linear_proj linear_fc1 linear_fc2
"""


def flags(text):
    return [a for a in shlex.split(text) if a.startswith("--")]


def dry_run(recipe: str, **env):
    """(the finished process, its command split into words) of ``shell/<recipe>`` run with DRY_RUN=1 and ``env``."""
    import os
    import subprocess

    from support import SHELL

    proc = subprocess.run(["bash", str(SHELL / recipe)], env={**os.environ, "DRY_RUN": "1", **env},
                          capture_output=True, text=True, timeout=60)
    return proc, shlex.split(proc.stdout)
