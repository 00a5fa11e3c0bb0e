"""Command-line flags of ``python -m npu_dsv3.pretrain`` / ``npu_dsv3.finetune`` and their start-up checks.

The flags carry the Megatron / MindSpeed-LLM names the DeepSeek-V3 recipes use
(Ascend/MindSpeed-LLM, examples/mcore/deepseek3/*.sh). ``FLAG_TABLE`` is the
one place that decides, for every flag, where it lands (a model-config field, a
pipeline-layout field, a trainer setting on the parsed namespace, an
architecture fact npu_dsv3 always uses) or why it is refused; a refused flag
is an error, never dropped. A feature's flags, their checks and the config
fields they set are in its module under ``npu_dsv3.features``; this module
declares and checks the rest and calls the features' hooks.

``parse_args(argv, world_size, mode)`` parses and checks everything, the model
included, so an impossible run fails before any process group exists, with one
message naming the flags to change (``ArgsError``, a ValueError).
``build_configs(args)`` returns the megatron model config, the parallel
sizes, the pipeline/expert layout and the optimizer config.
"""

import argparse
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Sequence

import torch

from npu_dsv3 import features
from npu_dsv3.argtypes import ArgsError, Unsupported, output_dir_problem, positive_int
from npu_dsv3.arguments_model import (FLAGS_ONLY_HIDDEN_DROPOUT, MODEL_FLAGS, add_model_args, flag_name,
                                      hf_config_from_args)
from npu_dsv3.layout import LayoutError, ParallelLayout, add_layout_flags, layout_from_args, training_flag

if TYPE_CHECKING:  # megatron is heavy: imported where the configs are built
    from megatron.core.optimizer import OptimizerConfig

    from npu_dsv3.config import DeepSeekV3TransformerConfig

__all__ = ["ArgsError", "TrainArgs", "ParallelSizes", "Configs", "FLAG_TABLE", "Unsupported",
           "build_parser", "parse_args", "build_configs"]

MODES = ("pretrain", "finetune")
DEEPSEEK_SPEC = ("mindspeed_llm.tasks.models.spec.deepseek_spec", "layer_spec")


# --------------------------------------------------------------------------- the table

_PERF_ONLY = "a MindSpeed performance switch that npu_dsv3 does not implement; drop it (results are the same without)"

# flag -> where it lands ("config.<field>", "layout.<field>", "args.<name>", "fixed: ...") or why it is refused.
# Every DeepSeek-V3 recipe flag of Ascend/MindSpeed-LLM examples/mcore/deepseek3 is here or in the FLAGS of one
# feature module (npu_dsv3.features); FLAG_TABLE is the two together.
OWN_FLAGS = {
    # model shape (npu_dsv3.arguments_model; --hf-config supplies them)
    "--hf-config": "args.hf_config: HF config.json the model-shape flags default to",
    **{flag: f"HF {m.hf_key} -> config" if m.hf_key else f"config.{m.dest}"
       for m in MODEL_FLAGS for flag in m.flags},
    "--num-layers": "HF num_hidden_layers (minus --noop-layers) -> config.num_layers; layout.pipeline.num_layers",
    "--untie-embeddings-and-output-weights": "HF tie_word_embeddings = False -> config.tie_word_embeddings",
    # parallelism and layout
    "--tensor-model-parallel-size": "config.tensor_model_parallel_size, layout.tp",
    "--pipeline-model-parallel-size": "config.pipeline_model_parallel_size, layout.pipeline.pp",
    "--expert-model-parallel-size": "config.expert_model_parallel_size, layout.ep",
    "--expert-tensor-parallel-size": "config.expert_tensor_parallel_size, layout.etp (1 or TP)",
    "--context-parallel-size": "config.context_parallel_size (1 only)",
    "--context-parallel-algo": "args.context_parallel_algo (no effect at context parallel size 1)",
    "--num-layers-per-virtual-pipeline-stage":
        "layout.pipeline.vpp_layers, config.virtual_pipeline_model_parallel_size",
    "--num-layer-list": "layout.pipeline.num_layer_list",
    "--noop-layers": "layout.pipeline.noop_layers",
    "--sequence-parallel": "config.sequence_parallel",
    "--use-distributed-optimizer": "optimizer.use_distributed_optimizer",
    # MoE / MTP settings that are not shape
    "--moe-token-dispatcher-type": "config.moe_token_dispatcher_type (alltoall_seq = alltoall)",
    "--moe-router-load-balancing-type": "config.moe_router_load_balancing_type (noaux_tc = expert bias, no aux loss)",
    "--moe-aux-loss-coeff": "config.moe_aux_loss_coeff",
    "--moe-router-bias-update-rate": "config.moe_router_bias_update_rate",
    "--moe-router-dtype": "config.moe_router_dtype",
    "--router-gating-in-fp32": "config.moe_router_dtype = fp32",
    "--moe-router-pre-softmax": "config.moe_router_pre_softmax",
    "--mtp-loss-scaling-factor": "config.mtp_loss_scaling_factor",
    "--attention-softmax-in-fp32": "config.attention_softmax_in_fp32",
    # training
    "--micro-batch-size": "args.micro_batch_size", "--global-batch-size": "args.global_batch_size",
    "--seq-length": "args.seq_length", "--train-iters": "args.train_iters",
    "--lr": "optimizer.lr", "--min-lr": "optimizer.min_lr", "--lr-decay-style": "args.lr_decay_style",
    "--lr-decay-iters": "args.lr_decay_iters", "--lr-warmup-iters": "args.lr_warmup_iters",
    "--weight-decay": "optimizer.weight_decay", "--clip-grad": "optimizer.clip_grad",
    "--optimizer": "optimizer.optimizer", "--sgd-momentum": "optimizer.sgd_momentum",
    "--adam-beta1": "optimizer.adam_beta1", "--adam-beta2": "optimizer.adam_beta2", "--adam-eps": "optimizer.adam_eps",
    "--bf16": "config/optimizer bf16, params_dtype", "--fp16": "config/optimizer fp16, params_dtype",
    "--initial-loss-scale": "optimizer.initial_loss_scale (fp16 only)", "--seed": "args.seed",
    # checkpoints
    "--load": "args.load", "--save": "args.save", "--save-interval": "args.save_interval",
    "--finetune": "args.finetune", "--no-load-optim": "args.load_optim", "--no-load-rng": "args.load_rng",
    "--no-save-optim": "args.save_optim", "--no-save-rng": "args.save_rng", "--ckpt-format": "args.ckpt_format",
    # data and tokenizer
    "--data-path": "args.data_path", "--split": "args.split", "--mock-data": "args.mock_data",
    "--tokenizer-type": "args.tokenizer_type", "--tokenizer-name-or-path": "args.tokenizer_name_or_path",
    "--make-vocab-size-divisible-by": "args.padded_vocab_size", "--padded-vocab-size": "args.padded_vocab_size",
    "--reset-position-ids": "args.reset_position_ids", "--reset-attention-mask": "args.reset_attention_mask",
    "--no-shared-storage": "args.shared_storage", "--data-cache-path": "args.data_cache_path",
    # fine-tuning (mode finetune)
    "--stage": "args.stage", "--is-instruction-dataset": "args.is_instruction_dataset",
    "--variable-seq-lengths": "args.variable_seq_lengths", "--prompt-type": "args.prompt_type",
    # logging, evaluation, runtime
    "--log-interval": "args.log_interval", "--eval-interval": "args.eval_interval", "--eval-iters": "args.eval_iters",
    "--log-throughput": "args.log_throughput", "--log-jsonl": "args.log_jsonl",
    "--distributed-backend": "args.distributed_backend",
    "--distributed-timeout-minutes": "args.distributed_timeout_minutes",
    "--manual-gc": "args.manual_gc", "--manual-gc-interval": "args.manual_gc_interval",
    # what DeepSeek-V3's architecture fixes: accepted, and the only choice npu_dsv3 builds
    "--use-mcore-models": "fixed: megatron-core GPTModel",
    "--multi-head-latent-attention": "fixed: MLA", "--multi-latent-attention": "fixed: MLA",
    "--qk-layernorm": "fixed: MLA's q/kv latent norms", "--swiglu": "fixed: SwiGLU MLPs",
    "--disable-bias-linear": "fixed: no linear biases", "--use-rotary-position-embeddings": "fixed: RoPE",
    "--position-embedding-type": "fixed: rope", "--normalization": "fixed: RMSNorm",
    "--no-masked-softmax-fusion": "fixed: attention never uses megatron's fused masked softmax",
    "--spec": "fixed: npu_dsv3.model.spec (MindSpeed-LLM's deepseek_spec layer_spec)",
    # refused
    "--moe-permutation-async-comm": Unsupported(_PERF_ONLY),
    "--moe-alltoall-overlap-comm": Unsupported(_PERF_ONLY),
    "--swap-optimizer": Unsupported("swapping optimizer state to host memory is not implemented; use "
                                    "--use-distributed-optimizer and more data-parallel ranks"),
    "--swap-optimizer-times": Unsupported("belongs to --swap-optimizer, which is not implemented"),
    "--mtp-mem-efficient-logits": Unsupported("MindSpeed's chunked MTP logits are not implemented; the MTP loss "
                                              "is megatron-core's"),
    "--use-ascend-coc": Unsupported("Ascend compute-communication overlap (MindSpeed CoC kernels) is not implemented"),
    "--coc-fused-kernel": Unsupported("belongs to --use-ascend-coc, which is not implemented"),
    "--reuse-fp32-param": Unsupported("MindSpeed's fp32 parameter reuse inside the distributed optimizer is not "
                                      "implemented; megatron-core's distributed optimizer is used"),
    "--gemm-gradient-accumulation-fusion": Unsupported(
        "needs a fused weight-gradient GEMM that accumulates into main_grad (MindSpeed's npu_groupmatmul_add_fp32, "
        "apex's CUDA fused_weight_gradient_mlp_cuda); npu_dsv3.ops has none"),
    "--shape-order": Unsupported("npu_dsv3.ops.mla_attention chooses the attention layout (BSND, or TND for "
                                 "packed sequences) itself"),
}


def _merged(own: dict, feature_rows: dict) -> dict:
    both = sorted(set(own) & set(feature_rows))
    if both:
        raise ValueError(f"{', '.join(both)}: declared both in npu_dsv3.arguments and by a feature module")
    return {**own, **feature_rows}


FLAG_TABLE = _merged(OWN_FLAGS, features.flag_table())

_FIXED_SWITCHES = ("--use-mcore-models", "--multi-head-latent-attention", "--multi-latent-attention",
                   "--qk-layernorm", "--swiglu", "--disable-bias-linear", "--use-rotary-position-embeddings",
                   "--no-masked-softmax-fusion")
_FINETUNE_ONLY = ("stage", "is_instruction_dataset", "variable_seq_lengths", "prompt_type")


# --------------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    """argparse that raises ArgsError instead of exiting, so the entry point prints one line."""

    def error(self, message):
        raise ArgsError(message)


class TrainArgs(argparse.Namespace):
    """The parsed flags, plus what the checks derive: ``mode``, ``world_size``, ``data_parallel_size``,
    ``num_microbatches``, ``expert_tensor_parallel_size`` (resolved), ``padded_vocab_size``,
    ``hf`` (the model's HF config dict) and ``notes`` (adjustments the entry point should print)."""


class _Refuse(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is not supported: {FLAG_TABLE[option_string].reason}")


def _int_list(text: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_parallel_args(parser) -> None:
    # The layout flags (npu_dsv3.layout.LAYOUT_DEFAULTS) default to None, "not given": a legacy --load
    # checkpoint supplies the ones it records, the table the rest (_resolve_layout).
    g = parser.add_argument_group("parallelism and layout (default: what a legacy --load checkpoint records, "
                                  "else the value shown)")
    add_layout_flags(g, {
        **features.layout_help(),
        "tensor_model_parallel_size": "tensor-parallel size (1)",
        "pipeline_model_parallel_size": "pipeline-parallel size (1)",
        "expert_model_parallel_size": "expert-parallel size (1)",
        "expert_tensor_parallel_size": "tensor-parallel size of the routed experts, 1 or the tensor-parallel size "
                                       "(the tensor-parallel size, megatron's default; 1 with --moe-tp-extend-ep)",
        "num_layers_per_virtual_pipeline_stage": "layers per virtual pipeline stage: the interleaved schedule (none)",
        "num_layer_list": "layers on each pipeline stage, noop layers included (an even split)",
        "noop_layers": "global indices of identity layers that pad --num-layers (none)",
    }, list_type=_int_list)
    g.add_argument("--context-parallel-size", type=positive_int, default=1, help="context-parallel size (1 only)")
    g.add_argument("--context-parallel-algo", default="ulysses_cp_algo",
                   choices=["ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo"],
                   help="MindSpeed's context-parallel algorithm; no effect at context-parallel size 1")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split activations over the tensor-parallel ranks along the sequence")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state over the data-parallel ranks (megatron's distributed optimizer)")


def _add_moe_training_args(parser) -> None:
    g = parser.add_argument_group("MoE and MTP")
    g.add_argument("--moe-token-dispatcher-type", default=None,
                   choices=["alltoall", "alltoall_seq", "allgather", "flex"],
                   help="default alltoall; alltoall_seq (MindSpeed) is megatron-core's alltoall")
    g.add_argument("--moe-router-load-balancing-type", default=None,
                   choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "none", "noaux_tc", "sinkhorn"],
                   help="expert balancing: an aux loss (global, per sequence), none, or noaux_tc (expert bias)")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=None,
                   help="weight of the balance loss (1e-4 with --hf-config, else 0)")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=None,
                   help="step of the aux-loss-free expert bias update (megatron's 1e-3)")
    g.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default=None,
                   help="dtype of the router's logits and probabilities (the model's dtype)")
    g.add_argument("--router-gating-in-fp32", action="store_true", help="MindSpeed's --moe-router-dtype fp32")
    g.add_argument("--moe-router-pre-softmax", action="store_true", default=None,
                   help="softmax over all experts before the top-k (softmax scoring)")
    g.add_argument("--mtp-loss-scaling-factor", type=float, default=None,
                   help="weight of the multi-token-prediction loss (megatron's 0.1)")
    g.add_argument("--attention-softmax-in-fp32", action="store_true",
                   help="attention softmax in fp32 under --bf16 / --fp16")


def _add_training_args(parser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=positive_int, default=None,
                   help="sequences per micro-batch on each data-parallel rank (required)")
    g.add_argument("--global-batch-size", type=positive_int, default=None,
                   help="default: micro batch x data-parallel size")
    g.add_argument("--seq-length", type=positive_int, default=None, help="tokens per sequence (required)")
    g.add_argument("--train-iters", type=positive_int, default=None,
                   help="iterations (optimizer steps) the run ends at (required)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (required)")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate the decay ends at (default %(default)s)")
    g.add_argument("--lr-decay-style", default="linear",
                   choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   help="learning-rate decay after the warmup (default %(default)s)")
    g.add_argument("--lr-decay-iters", type=positive_int, default=None, help="default: --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0,
                   help="iterations of linear warmup from 0 to --lr (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="decoupled weight decay (default %(default)s)")
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="clip the global gradient norm to this; 0: no clipping (default %(default)s)")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                   help="adam (AdamW) or sgd (default %(default)s)")
    g.add_argument("--sgd-momentum", type=float, default=0.9, help="--optimizer sgd's momentum (default %(default)s)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam's beta1 (default %(default)s)")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Adam's beta2 (default %(default)s)")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam's epsilon (default %(default)s)")
    g.add_argument("--bf16", action="store_true", help="bf16 weights and compute, fp32 main weights (else fp32)")
    g.add_argument("--fp16", action="store_true", help="fp16 weights and compute with loss scaling (else fp32)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32,
                   help="--fp16's first dynamic loss scale (default 2^32)")
    g.add_argument("--seed", type=int, default=1234,
                   help="seed of the initialisation, dropout and mock data (default %(default)s)")


def _add_checkpoint_args(parser) -> None:
    g = parser.add_argument_group("checkpoints")
    g.add_argument("--load", default=None, metavar="DIR",
                   help="checkpoint to resume from (a training save or a converted checkpoint)")
    g.add_argument("--save", default=None, metavar="DIR", help="where checkpoints are written (none)")
    g.add_argument("--save-interval", type=positive_int, default=None,
                   help="save every N iterations (default: at the end only)")
    g.add_argument("--finetune", action="store_true",
                   help="load only the model weights from --load and start at iteration 0")
    g.add_argument("--no-load-optim", dest="load_optim", action="store_false",
                   help="do not load the optimizer state from --load")
    g.add_argument("--no-load-rng", dest="load_rng", action="store_false",
                   help="do not load the random generators' states from --load")
    g.add_argument("--no-save-optim", dest="save_optim", action="store_false",
                   help="save the weights without the optimizer state")
    g.add_argument("--no-save-rng", dest="save_rng", action="store_false",
                   help="save without the random generators' states")
    g.add_argument("--ckpt-format", choices=["torch_dist", "torch"], default="torch_dist",
                   help="torch_dist: megatron dist_checkpointing (any layout loads it); torch: the legacy per-rank "
                        "mp_rank_* files")


def _add_data_args(parser) -> None:
    g = parser.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="+", default=None, help="PREFIX or WEIGHT PREFIX WEIGHT PREFIX ...")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens instead of --data-path")
    g.add_argument("--tokenizer-type", choices=["PretrainedFromHF", "NullTokenizer"], default=None,
                   help="default with --mock-data: NullTokenizer")
    g.add_argument("--tokenizer-name-or-path", default=None, metavar="PATH",
                   help="local HF tokenizer directory (PretrainedFromHF)")
    g.add_argument("--make-vocab-size-divisible-by", type=positive_int, default=128,
                   help="pad the embedding rows to a multiple of this x tensor-parallel size (default %(default)s)")
    g.add_argument("--padded-vocab-size", type=positive_int, default=None,
                   help="embedding rows (default: vocab size rounded up to the divisor x tensor-parallel size)")
    g.add_argument("--reset-position-ids", action="store_true", help="positions restart after each EOD (packing)")
    g.add_argument("--reset-attention-mask", action="store_true", help="no attention across EOD (packing)")
    g.add_argument("--no-shared-storage", dest="shared_storage", action="store_false",
                   help="nodes do not share a file system: every node builds its own data index cache")
    g.add_argument("--data-cache-path", default=None, metavar="DIR",
                   help="where megatron's GPTDataset keeps its index caches (default: beside each --data-path "
                        "prefix, which must then be writable)")
    f = parser.add_argument_group("fine-tuning (npu_dsv3.finetune)")
    f.add_argument("--stage", choices=["sft"], default=None, help="fine-tuning stage: sft (supervised)")
    f.add_argument("--is-instruction-dataset", action="store_true", default=None,
                   help="--data-path holds instruction samples (npu-dsv3 data preprocess with an instruction handler)")
    f.add_argument("--variable-seq-lengths", action="store_true", default=None,
                   help="pad each batch to its longest sample instead of --seq-length")
    f.add_argument("--prompt-type", default=None, help="chat template of the instruction data (deepseek3)")


def _add_runtime_args(parser) -> None:
    g = parser.add_argument_group("logging, evaluation and runtime")
    g.add_argument("--log-interval", type=positive_int, default=100,
                   help="print a progress line every N iterations (default %(default)s)")
    g.add_argument("--eval-interval", type=positive_int, default=1000,
                   help="evaluate every N iterations (default %(default)s)")
    g.add_argument("--eval-iters", type=int, default=100,
                   help="validation batches per evaluation; 0: no evaluation (default %(default)s)")
    g.add_argument("--log-throughput", action="store_true",
                   help="accepted for recipe compatibility: the progress lines always show TFLOP/s and tokens/s")
    g.add_argument("--log-jsonl", default=None, metavar="PATH", help="one JSON object of metrics per iteration")
    g.add_argument("--distributed-backend", choices=["nccl", "hccl", "gloo"], default=None,
                   help="default: the device's (hccl on Ascend, nccl on CUDA, gloo on CPU)")
    g.add_argument("--distributed-timeout-minutes", type=positive_int, default=10,
                   help="collective operations time out after this (default %(default)s)")
    g.add_argument("--manual-gc", action="store_true",
                   help="accepted for recipe compatibility; Python's garbage collector runs as usual")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="accepted for recipe compatibility with --manual-gc (default %(default)s)")


def _add_fixed_and_refused(parser) -> None:
    g = parser.add_argument_group("fixed by DeepSeek-V3 (accepted for recipe compatibility)")
    for flag in _FIXED_SWITCHES:
        g.add_argument(flag, action="store_true", help=FLAG_TABLE[flag])
    g.add_argument("--position-embedding-type", choices=["rope"], default=None,
                   help=FLAG_TABLE["--position-embedding-type"])
    g.add_argument("--normalization", choices=["RMSNorm"], default=None, help=FLAG_TABLE["--normalization"])
    g.add_argument("--spec", nargs=2, default=None, metavar=("MODULE", "NAME"), help=FLAG_TABLE["--spec"])
    r = parser.add_argument_group("refused (see npu_dsv3.arguments.FLAG_TABLE)")
    for flag, where in FLAG_TABLE.items():
        if isinstance(where, Unsupported):
            r.add_argument(flag, action=_Refuse, nargs="*", help=f"not supported: {where.reason}")


def build_parser(mode: str = "pretrain") -> argparse.ArgumentParser:
    # allow_abbrev=False: a prefix of a flag must not silently stand for it (megatron does the same).
    parser = _Parser(prog=f"python -m npu_dsv3.{mode}", allow_abbrev=False,
                     description=f"DeepSeek-V3 {mode} on Megatron-Core with Megatron / MindSpeed-LLM flag names.")
    add_model_args(parser)
    _add_parallel_args(parser)
    _add_moe_training_args(parser)
    features.add_flags(parser)
    _add_training_args(parser)
    _add_checkpoint_args(parser)
    _add_data_args(parser)
    _add_runtime_args(parser)
    _add_fixed_and_refused(parser)
    return parser


# --------------------------------------------------------------------------- checks without the model


def parse_args(argv: Sequence[str], world_size: int, mode: str = "pretrain") -> TrainArgs:
    """Parse and check every flag (the model's sizes included) for a run of ``world_size`` processes."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    args = build_parser(mode).parse_args(list(argv), namespace=TrainArgs())
    args.__dict__.pop("_alias_given", None)
    args.mode, args.world_size, args.notes = mode, world_size, []
    for check in (_check_mode, _check_precision, _check_required, _check_data, _check_eval, _check_checkpoint,
                  _check_fixed):
        check(args)
    taken_note = _resolve_layout(args)
    try:
        for check in (_check_parallel, _check_batches, _check_schedules, features.check_flags, _check_moe, _check_lr,
                      _check_optimizer):
            check(args)
        args.hf = _model_hf_config(args)
        build_configs(args)  # the model-dependent checks: heads, experts, layers against the layout
    except ArgsError as e:
        if taken_note is None:
            raise
        raise ArgsError(f"{e} ({taken_note})") from None  # the user may not know where a value came from
    return args


def _resolve_layout(args) -> Optional[str]:
    """Fills the layout flags not given: from what a legacy --load checkpoint records, else the defaults.
    Returns the note saying which came from the checkpoint (also queued in ``args.notes``), or None."""
    recorded, source = None, f"--load {args.load}"
    if args.load:
        from npu_dsv3.checkpoint.layout_record import recorded_layout

        recorded = recorded_layout(args.load)
    try:
        layout, note = layout_from_args(args, recorded, source)
    except LayoutError as e:
        raise ArgsError(str(e)) from None
    vars(args).update(layout)
    if note is not None:
        args.notes.append(note)
    return note


def _check_mode(args) -> None:
    if args.mode == "pretrain":
        given = [f"--{d.replace('_', '-')}" for d in _FINETUNE_ONLY if getattr(args, d) is not None]
        if given:
            raise ArgsError(f"{', '.join(given)}: fine-tuning flags; run python -m npu_dsv3.finetune")
        return
    # python -m npu_dsv3.finetune is megatron's --finetune: weights from --load, fresh optimizer and iteration 0
    args.finetune = True
    if args.prompt_type is not None and not args.is_instruction_dataset:
        raise ArgsError("--prompt-type formats instruction data; it needs --is-instruction-dataset")
    _check_instruction_flags(args)


def _check_instruction_flags(args) -> None:
    from npu_dsv3.data.chat_template import PROMPT_TYPES

    if not args.is_instruction_dataset:
        given = [flag for flag, value in (("--stage", args.stage),
                                          ("--variable-seq-lengths", args.variable_seq_lengths)) if value]
        if given:
            raise ArgsError(f"{', '.join(given)}: fine-tuning on instruction data needs --is-instruction-dataset "
                            "(--data-path: the prefix npu-dsv3 data preprocess wrote with an instruction handler)")
        return
    if args.prompt_type is not None and args.prompt_type not in PROMPT_TYPES:
        raise ArgsError(f"--prompt-type {args.prompt_type}: npu_dsv3's chat templates are {', '.join(PROMPT_TYPES)}")
    if args.reset_position_ids and not args.reset_attention_mask:
        # MLA's RoPE takes its positions from the packed-sequence boundaries, not from position ids.
        raise ArgsError("--reset-position-ids restarts positions per packed sample only together with "
                        "--reset-attention-mask (each sample attends to itself); add it")
    if args.variable_seq_lengths and args.moe_token_dispatcher_type == "allgather":
        raise ArgsError("--variable-seq-lengths needs the alltoall token dispatcher (megatron's allgather "
                        "dispatcher assumes one sequence length): drop --moe-token-dispatcher-type allgather")


def _check_eval(args) -> None:
    if args.eval_iters < 0:
        raise ArgsError(f"--eval-iters must be >= 0 (0: no evaluation), got {args.eval_iters}")
    if args.eval_iters and not args.mock_data:
        weights = [float(w) for w in args.split.replace(" ", "").split(",")]
        if len(weights) < 2 or weights[1] == 0:
            raise ArgsError(f"--eval-iters {args.eval_iters} evaluates on the validation split, and --split "
                            f"{args.split} gives it nothing: give it a share (e.g. --split 98,2,0) or --eval-iters 0")


def _check_precision(args) -> None:
    if args.bf16 and args.fp16:
        raise ArgsError("--bf16 and --fp16 exclude each other; give one")
    args.params_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def _check_required(args) -> None:
    missing = [flag for flag, value in (("--micro-batch-size", args.micro_batch_size),
                                        ("--seq-length", args.seq_length), ("--train-iters", args.train_iters),
                                        ("--lr", args.lr)) if value is None]
    if missing:
        raise ArgsError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")


def _check_data(args) -> None:
    if bool(args.mock_data) == bool(args.data_path):
        raise ArgsError("give exactly one of --data-path and --mock-data")
    parts = args.split.replace(" ", "").split(",")
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ArgsError(f"--split {args.split!r} must be up to three non-negative numbers, e.g. 100,0,0")
    if args.tokenizer_type is None:
        if not args.mock_data:
            raise ArgsError("--data-path needs --tokenizer-type PretrainedFromHF --tokenizer-name-or-path PATH")
        args.tokenizer_type = "NullTokenizer"
    if args.tokenizer_type == "PretrainedFromHF" and not args.tokenizer_name_or_path:
        raise ArgsError("--tokenizer-type PretrainedFromHF needs --tokenizer-name-or-path")
    if args.tokenizer_type == "NullTokenizer" and args.tokenizer_name_or_path:
        raise ArgsError("--tokenizer-name-or-path is read only by --tokenizer-type PretrainedFromHF")
    if args.is_instruction_dataset and (args.mock_data or args.tokenizer_type != "PretrainedFromHF"):
        raise ArgsError("--is-instruction-dataset needs --data-path and --tokenizer-type PretrainedFromHF "
                        "(its chat template)")
    _check_output_dir("--data-cache-path", args.data_cache_path)


def _check_output_dir(flag: str, value: Optional[str], directory: Optional[str] = None) -> None:
    """``value`` (a directory, or a file in ``directory``) can be written, or one line naming ``flag``."""
    # Before the model is built: a run must not spend its compute and then fail at its first write.
    problem = value and output_dir_problem(directory or value)
    if problem:
        raise ArgsError(f"{flag} {value}: {problem}; give a path this run can write")


def _check_checkpoint(args) -> None:
    if args.finetune and not args.load:
        what = "python -m npu_dsv3.finetune" if args.mode == "finetune" else "--finetune"
        raise ArgsError(f"{what} starts from a checkpoint: give --load DIR")
    if args.save_interval is not None and not args.save:
        raise ArgsError("--save-interval needs --save DIR")
    _check_output_dir("--save", args.save)
    if args.log_jsonl:
        _check_output_dir("--log-jsonl", args.log_jsonl, os.path.dirname(os.path.abspath(args.log_jsonl)))


def _check_fixed(args) -> None:
    if args.spec is not None and tuple(args.spec) != DEEPSEEK_SPEC:
        raise ArgsError(f"--spec {' '.join(args.spec)}: npu_dsv3 builds DeepSeek-V3's own layers; only "
                        f"--spec {' '.join(DEEPSEEK_SPEC)} is accepted")


def _check_parallel(args) -> None:
    tp, pp, cp, ep = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                      args.context_parallel_size, args.expert_model_parallel_size)
    if cp > 1:
        raise ArgsError(f"--context-parallel-size {cp}: context parallelism needs an attention that exchanges keys "
                        "and values across ranks, which npu_dsv3's MLA attention does not; use 1")
    if args.world_size % (tp * pp * cp):
        raise ArgsError(f"world size {args.world_size} is not divisible by --tensor-model-parallel-size {tp} x "
                        f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp}")
    args.data_parallel_size = args.world_size // (tp * pp * cp)
    expert_ranks = ep * (tp if args.moe_tp_extend_ep else args.expert_tensor_parallel_size)
    if args.world_size % (expert_ranks * pp):
        what = ("--expert-model-parallel-size x --tensor-model-parallel-size (--moe-tp-extend-ep)"
                if args.moe_tp_extend_ep else "--expert-model-parallel-size x --expert-tensor-parallel-size")
        raise ArgsError(f"world size {args.world_size} is not divisible by {what} ({expert_ranks}) x "
                        f"--pipeline-model-parallel-size {pp}")
    _check_sequence_parallel(args)


def _check_sequence_parallel(args) -> None:
    tp = args.tensor_model_parallel_size
    if args.sequence_parallel and tp == 1:
        # Megatron-LM's training rule: sequence parallelism is switched off without tensor parallelism.
        args.sequence_parallel = False
        args.notes.append("--sequence-parallel has no effect at --tensor-model-parallel-size 1 and is off "
                          "(as in Megatron-LM)")
    if args.sequence_parallel and args.seq_length % tp:
        raise ArgsError(f"--sequence-parallel splits --seq-length {args.seq_length} over "
                        f"--tensor-model-parallel-size {tp}; it must divide")


def _check_batches(args) -> None:
    mbs, dp = args.micro_batch_size, args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = mbs * dp
    if args.global_batch_size % (mbs * dp):
        raise ArgsError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size {mbs} "
                        f"x data-parallel size {dp} (world size {args.world_size} / (TP x PP x CP))")
    args.num_microbatches = args.global_batch_size // (mbs * dp)


def _check_schedules(args) -> None:
    pp, m = args.pipeline_model_parallel_size, args.num_microbatches
    if args.num_layers_per_virtual_pipeline_stage is not None:
        if pp < 2:
            raise ArgsError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2")
        if m % pp:
            raise ArgsError(f"the interleaved schedule (--num-layers-per-virtual-pipeline-stage) needs the "
                            f"{m} micro-batches per step (--global-batch-size / (--micro-batch-size x data-parallel "
                            f"size)) to be a multiple of --pipeline-model-parallel-size {pp}")


def _check_moe(args) -> None:
    if args.moe_token_dispatcher_type == "flex":
        raise ArgsError("--moe-token-dispatcher-type flex needs DeepEP / HybridEP (CUDA only); use alltoall")
    if args.moe_router_load_balancing_type == "sinkhorn":
        raise ArgsError("--moe-router-load-balancing-type sinkhorn replaces DeepSeek-V3's group-limited top-k "
                        "routing; use seq_aux_loss, aux_loss, global_aux_loss, none or noaux_tc")
    if args.seq_aux and args.moe_router_load_balancing_type == "global_aux_loss":
        raise ArgsError("--seq-aux asks for the sequence-wise loss, --moe-router-load-balancing-type "
                        "global_aux_loss for the global one; give one")
    if args.moe_token_dispatcher_type == "alltoall_seq":
        args.notes.append("--moe-token-dispatcher-type alltoall_seq runs megatron-core's alltoall dispatcher "
                          "(the same exchange; megatron-core 0.16 has no separate alltoall_seq)")


def _check_lr(args) -> None:
    if args.min_lr > args.lr:
        raise ArgsError(f"--min-lr {args.min_lr} is above --lr {args.lr}")
    decay = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters > decay:
        raise ArgsError(f"--lr-warmup-iters {args.lr_warmup_iters} exceeds the {decay} decay iterations "
                        "(--lr-decay-iters, default --train-iters)")


def _check_optimizer(args) -> None:
    if args.optimizer == "sgd" and args.use_distributed_optimizer:
        raise ArgsError("--use-distributed-optimizer runs --optimizer adam only (megatron-core's distributed "
                        "optimizer shards Adam's state); drop one of the two")


def _model_hf_config(args) -> dict:
    from npu_dsv3.config import load_hf_config

    base = None
    if args.hf_config is not None:
        try:
            base = load_hf_config(args.hf_config)
        except (OSError, ValueError) as e:
            raise ArgsError(f"--hf-config: {e}") from None
    elif args.moe_router_group_topk is not None and args.moe_router_num_groups is None:
        # MindSpeed-LLM recipes give --topk-group alone: one group per expert-parallel rank
        # (device-limited routing, as megatron's moe_router_topk_limited_devices did).
        args.moe_router_num_groups = args.expert_model_parallel_size
        args.notes.append(f"{flag_name('moe_router_num_groups')} defaults to --expert-model-parallel-size "
                          f"({args.expert_model_parallel_size}): one expert group per expert-parallel rank")
    try:
        return hf_config_from_args(args, base, len(args.noop_layers or ()), args.seq_length)
    except ValueError as e:
        raise ArgsError(str(e)) from None


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ParallelSizes:
    """The sizes as the flags give them; with --moe-tp-extend-ep megatron's expert group
    (``config.expert_model_parallel_size``) is ``ep x tp``."""

    world_size: int
    tp: int
    pp: int
    ep: int
    etp: int
    cp: int
    dp: int
    num_microbatches: int
    vpp: Optional[int]
    """Model chunks per pipeline rank of the interleaved schedule (None without it)."""


class Configs(NamedTuple):
    model: "DeepSeekV3TransformerConfig"
    parallel: ParallelSizes
    layout: ParallelLayout
    optimizer: "OptimizerConfig"


def build_configs(args: TrainArgs) -> Configs:
    """The megatron configs of a run ``parse_args`` accepted; the model-dependent checks live here."""
    # The layout checks (heads, experts, layers over the parallel sizes) run on the model without
    # its parallel sizes first, so they, not megatron's field-named asserts, report a bad size.
    layout = _layout(args, _model_config(args, parallel=False))
    config = _model_config(args)
    _check_model_against_flags(args, config)
    args.padded_vocab_size = _padded_vocab(args, config.vocab_size)
    sizes = ParallelSizes(
        world_size=args.world_size, tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
        ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size, cp=args.context_parallel_size,
        dp=args.data_parallel_size, num_microbatches=args.num_microbatches,
        vpp=layout.pipeline.num_chunks if layout.pipeline.vpp_layers else None,
    )
    return Configs(config, sizes, layout, _optimizer_config(args))


def _model_config(args, parallel: bool = True):
    from npu_dsv3.config import hf_to_mcore_config_dpskv3

    _check_router_groups(args.hf)
    overrides = {**_config_overrides(args), **(_parallel_overrides(args) if parallel else {})}
    try:
        return hf_to_mcore_config_dpskv3(args.hf, **overrides)
    except (ValueError, AssertionError) as e:
        raise ArgsError(f"the model flags do not make a valid DeepSeek-V3 config: {e}") from None


def _check_router_groups(hf: dict) -> None:
    groups, topk_group, experts = hf.get("n_group") or 1, hf.get("topk_group") or 1, hf["n_routed_experts"]
    if hf.get("topk_method") == "greedy" or groups <= 1:
        if topk_group > 1:
            raise ArgsError(f"{flag_name('moe_router_group_topk')} {topk_group} needs "
                            f"{flag_name('moe_router_num_groups')} > 1")
        return
    if experts % groups:
        raise ArgsError(f"{flag_name('num_experts')} {experts} is not divisible by "
                        f"{flag_name('moe_router_num_groups')} {groups}")
    if not 1 <= topk_group <= groups:
        raise ArgsError(f"{flag_name('moe_router_group_topk')} {topk_group} must be between 1 and "
                        f"{flag_name('moe_router_num_groups')} {groups}")
    if hf["num_experts_per_tok"] > topk_group * (experts // groups):
        raise ArgsError(f"{flag_name('moe_router_topk')} {hf['num_experts_per_tok']} exceeds the "
                        f"{topk_group * (experts // groups)} experts of the {topk_group} groups a token may use")


def _config_overrides(args) -> dict:
    """Config fields the flags set directly; everything shape-like went through ``args.hf``."""
    dtype = args.params_dtype
    out = dict(
        params_dtype=dtype, pipeline_dtype=dtype, bf16=args.bf16, fp16=args.fp16,
        hidden_dropout=_hidden_dropout(args),
        attention_softmax_in_fp32=args.attention_softmax_in_fp32,
        moe_token_dispatcher_type="allgather" if args.moe_token_dispatcher_type == "allgather" else "alltoall",
        **features.config_fields(args),
    )
    optional = dict(moe_aux_loss_coeff=args.moe_aux_loss_coeff,
                    moe_router_bias_update_rate=args.moe_router_bias_update_rate,
                    moe_router_dtype=args.moe_router_dtype or ("fp32" if args.router_gating_in_fp32 else None),
                    moe_router_pre_softmax=args.moe_router_pre_softmax,
                    mtp_loss_scaling_factor=args.mtp_loss_scaling_factor,
                    moe_router_load_balancing_type=_load_balancing(args))
    out.update({k: v for k, v in optional.items() if v is not None})
    if args.hf_config is None:
        out.setdefault("moe_aux_loss_coeff", 0.0)  # megatron's default, as for every flags-only setting
    return out


def _parallel_overrides(args) -> dict:
    """megatron's parallel sizes and our placement fields (read by ``npu_dsv3.model.placement``)."""
    out = dict(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        num_layer_list=args.num_layer_list, noop_layers=args.noop_layers,
    )
    out.update(features.parallel_fields(args))  # after the sizes: --moe-tp-extend-ep changes the expert ones
    if args.num_layers_per_virtual_pipeline_stage is not None:
        out["virtual_pipeline_model_parallel_size"] = _vpp_chunks(args)
    return out


def _hidden_dropout(args) -> float:
    if args.hidden_dropout is not None:
        return args.hidden_dropout
    return 0.0 if args.hf_config is not None else FLAGS_ONLY_HIDDEN_DROPOUT


def _vpp_chunks(args) -> int:
    noop = len(args.noop_layers or ())
    layers = args.num_layers if args.num_layers is not None else args.hf["num_hidden_layers"] + noop
    return max(1, layers // (args.pipeline_model_parallel_size * args.num_layers_per_virtual_pipeline_stage))


def _load_balancing(args) -> Optional[str]:
    """megatron's moe_router_load_balancing_type for the flags; None keeps the HF-derived one.

    MindSpeed's --seq-aux turns the balance loss sequence-wise whatever the type says
    (recipes pair it with noaux_tc or none); noaux_tc itself is the expert bias
    (``arguments_model._topk_method``) with no aux loss.
    """
    kind = args.moe_router_load_balancing_type
    if args.seq_aux:
        return "seq_aux_loss"
    if kind == "noaux_tc":
        return "none"
    if kind is None and args.hf_config is None:
        return "aux_loss"  # megatron's default
    return kind


def _layout(args, config):
    try:
        return ParallelLayout.from_flags(
            config, tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            expert_tensor_parallel_size=args.expert_tensor_parallel_size,
            num_layers_per_virtual_pipeline_stage=args.num_layers_per_virtual_pipeline_stage,
            num_layer_list=args.num_layer_list, noop_layers=args.noop_layers,
            schedules_method=args.schedules_method, num_layers=args.num_layers,
            moe_grouped_gemm=args.moe_grouped_gemm, moe_tp_extend_ep=args.moe_tp_extend_ep,
            mla_mm_split=args.mla_mm_split, flag=training_flag)
    except LayoutError as e:
        raise ArgsError(str(e)) from None


def _check_model_against_flags(args, config) -> None:
    if config.num_moe_experts and args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        # megatron-core's MoE layer raises this only at the first training forward, naming no flag.
        raise ArgsError(f"a MoE model with --tensor-model-parallel-size {args.tensor_model_parallel_size} needs "
                        "--sequence-parallel (megatron-core's MoE layer trains only on sequence-split tokens)")
    features.check_model(args, config)


def _padded_vocab(args, vocab_size: int) -> int:
    from npu_dsv3.config import padded_vocab_size

    tp = args.tensor_model_parallel_size
    padded = args.padded_vocab_size
    if padded is None:
        return padded_vocab_size(vocab_size, tp, args.make_vocab_size_divisible_by)
    if padded < vocab_size or padded % tp:
        raise ArgsError(f"--padded-vocab-size {padded} must be >= the vocabulary ({vocab_size}) and divisible by "
                        f"--tensor-model-parallel-size {tp}")
    return padded


def _optimizer_config(args):
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        sgd_momentum=args.sgd_momentum, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        bf16=args.bf16, fp16=args.fp16, params_dtype=args.params_dtype, initial_loss_scale=args.initial_loss_scale,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )

