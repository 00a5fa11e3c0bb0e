"""``--moe-tp-extend-ep``: the tensor-parallel ranks of an expert-parallel rank hold different whole
experts, so the routed experts are split over EP x TP ranks and never sliced (MindSpeed's flag).

Where the rest lives: the expert placement and megatron's expert group sizes in
``npu_dsv3.model.placement`` (``tp_extended_expert_sizes``), the layout field
``ParallelLayout.tp_extend_ep`` the converters shard by (``npu_dsv3.layout``).
"""

import argparse

from npu_dsv3.argtypes import ArgsError

NAME = "tp-extend-ep"
TESTS = ("tests/multiprocess/test_model_layouts.py, tests/unit/test_convert_layouts.py, "
         "tests/multiprocess/test_pretrain_layouts.py (tp-extend-ep cases)")

LAYOUT_HELP = {"moe_tp_extend_ep": "the tensor ranks of an expert rank hold different whole experts "
                                   "(experts over EP x TP)"}
FLAGS = {"--moe-tp-extend-ep": "layout.tp_extend_ep, config.moe_tp_extend_ep (megatron's expert group: EP x TP)"}


def check_flags(args: argparse.Namespace) -> None:
    if args.moe_tp_extend_ep and args.expert_tensor_parallel_size != 1:
        raise ArgsError(f"--moe-tp-extend-ep keeps every expert whole: --expert-tensor-parallel-size must be 1, "
                        f"not {args.expert_tensor_parallel_size}")


def parallel_fields(args: argparse.Namespace) -> dict:
    if not args.moe_tp_extend_ep:
        return {"moe_tp_extend_ep": False}
    from npu_dsv3.model.placement import tp_extended_expert_sizes

    # megatron's expert group is then EP x TP ranks holding whole experts
    return {"moe_tp_extend_ep": True,
            **tp_extended_expert_sizes(args.tensor_model_parallel_size, args.expert_model_parallel_size)}
