"""dualpipev: DeepSeek's bidirectional pipeline schedule (``--schedules-method dualpipev``), with its
zero-bubble weight-gradient split and its overlapped forward/backward pairs (``--moe-fb-overlap``).

Where the rest lives: the placement (rank r holds stages r and 2P-1-r as its two chunks) in
``npu_dsv3.layout.PipelineLayout``; the executor ``npu_dsv3.schedules.dualpipev`` over the operation
plan of ``schedules.plan``; the pair overlap ``schedules.fb_overlap``; the linear backward of the W
split ``schedules.weight_grad`` over the deferral primitives of ``ops.weight_grad``; the embedding
group of rank 0's two chunks in ``training.loop.initialize``.
"""

import argparse
from typing import List

from npu_dsv3.argtypes import ArgsError

NAME = "dualpipev"
TESTS = ("tests/multiprocess/test_dualpipev_schedule.py, tests/multiprocess/test_dualpipev_training.py, "
         "tests/unit/test_schedules.py, tests/unit/test_weight_grad.py, "
         "tests/multiprocess/test_benchmark_fb_overlap.py")

LAYOUT_HELP = {"schedules_method": "dualpipev: DeepSeek's bidirectional pipeline schedule (megatron's 1F1B)"}
FLAGS = {
    "--schedules-method": "layout.pipeline.dualpipev, config.schedules_method",
    "--moe-fb-overlap": "config.moe_fb_overlap (DualPipeV's forward/backward pairs run concurrently)",
}

# megatron-core 0.16.1's modules that bound a torch.distributed collective to their own name at import.
_BOUND_COLLECTIVES = {
    "megatron.core.tensor_parallel.layers": ("dist_all_gather_func", "dist_reduce_scatter_func"),
    "megatron.core.tensor_parallel.mappings": ("dist_all_gather_func", "dist_reduce_scatter_func"),
    "megatron.core.tensor_parallel.utils": ("dist_all_gather_func",),
    "megatron.core.transformer.multi_token_prediction": ("dist_all_gather_func",),
}
_COLLECTIVES = ("all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "all_gather",
                "_all_gather_base", "_reduce_scatter_base")


def add_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument_group("dualpipev").add_argument(
        "--moe-fb-overlap", action="store_true", help="run dualpipev's forward/backward pairs concurrently")


def check_flags(args: argparse.Namespace) -> None:
    pp, m = args.pipeline_model_parallel_size, args.num_microbatches
    if args.moe_fb_overlap and args.schedules_method != NAME:
        raise ArgsError("--moe-fb-overlap overlaps the forward/backward pairs of --schedules-method dualpipev; "
                        "add it or drop --moe-fb-overlap")
    if args.schedules_method == NAME and m < 2 * pp:
        raise ArgsError(f"--schedules-method dualpipev needs at least 2 x --pipeline-model-parallel-size ({2 * pp}) "
                        f"micro-batches per step, got {m}; raise --global-batch-size or lower --micro-batch-size")


def check_model(args: argparse.Namespace, config) -> None:
    if args.schedules_method == NAME and config.tie_word_embeddings:
        raise ArgsError("--schedules-method dualpipev needs --untie-embeddings-and-output-weights (the head and "
                        "the embedding live in different chunks of rank 0)")
    if args.moe_fb_overlap and args.recompute_granularity and (config.hidden_dropout or config.attention_dropout):
        raise ArgsError("--moe-fb-overlap with recompute needs --hidden-dropout 0 and --attention-dropout 0: a "
                        "recomputing backward resets the random generator the overlapped forward's dropout draws from")


def parallel_fields(args: argparse.Namespace) -> dict:
    fields = {"schedules_method": args.schedules_method, "moe_fb_overlap": args.moe_fb_overlap}
    if args.schedules_method == NAME:
        fields["virtual_pipeline_model_parallel_size"] = 2  # rank r's stages r and 2PP-1-r
    return fields


def patches() -> List:
    from npu_dsv3.patching import Patch
    from npu_dsv3.schedules import dualpipev, fb_overlap, weight_grad

    schedule = [
        Patch(name=f"dualpipev.schedule[{site}]", feature=NAME, target=f"{site}.get_forward_backward_func",
              replacement=dualpipev.dispatching, wrap=True,
              why="--schedules-method dualpipev: megatron has no DualPipeV schedule; the model's config selects it")
        for site in ("megatron.core.pipeline_parallel.schedules", "megatron.core.pipeline_parallel")
    ]
    w_split = Patch(
        name="dualpipev.linear_weight_grad_split", feature=NAME,
        target="megatron.core.tensor_parallel.layers.LinearWithGradAccumulationAndAsyncCommunication.backward",
        replacement=weight_grad.linear_backward, wrap=True,
        why="DualPipeV's zero-bubble B steps compute the input gradient and leave the weight-gradient GEMM "
        "to a later W step; megatron's local linear has no such split")
    overlap = [
        Patch(name=f"fb-overlap.{name}", feature=NAME, target=f"torch.distributed.{name}",
              replacement=fb_overlap.taking_turns, wrap=True,
              why="--moe-fb-overlap: collectives of a pair's two threads are issued in a rank-independent "
              "order (a no-op outside an overlapped pair)")
        for name in _COLLECTIVES
    ] + [
        Patch(name=f"fb-overlap.{module.rsplit('.', 1)[-1]}.{name}", feature=NAME, target=f"{module}.{name}",
              replacement=fb_overlap.taking_turns, wrap=True,
              why="--moe-fb-overlap: the same turn-taking at megatron's own binding of the collective")
        for module, names in _BOUND_COLLECTIVES.items() for name in names
    ] + [
        Patch(name=f"fb-overlap.{module.rsplit('.', 1)[-1]}.get_global_memory_buffer", feature=NAME,
              target=f"{module}.get_global_memory_buffer", replacement=fb_overlap.lane_memory_buffer, wrap=True,
              why="--moe-fb-overlap: the backward lane gathers into its own buffer, not the forward's")
        for module in ("megatron.core.parallel_state", "megatron.core.tensor_parallel.layers",
                       "megatron.core.tensor_parallel.mappings")
    ]
    return schedule + [w_split] + overlap
