"""``--mla-mm-split``: MLA's q and kv up-projections as one column-parallel linear per part
(linear_qk_nope, linear_qk_rope, linear_kv_nope, linear_v), MindSpeed's flag.

Where the rest lives: the attention module ``npu_dsv3.model.attention.SplitMLASelfAttention`` (chosen by
``npu_dsv3.model.spec``), the checkpoint split ``npu_dsv3.checkpoint.sharding.HeadSplit`` and the layout
field ``ParallelLayout.mla_mm_split`` the converters use.
"""

import argparse
from typing import List

NAME = "mla-mm-split"
TESTS = ("tests/multiprocess/test_model_layouts.py, tests/unit/test_convert_layouts.py (mla-mm-split cases), "
         "tests/multiprocess/test_lora_layouts.py (with MTP)")

LAYOUT_HELP = {"mla_mm_split": "MLA up-projections as separate qk_nope/qk_rope and kv_nope/v linears"}
FLAGS = {"--mla-mm-split": "layout.mla_mm_split, config.mla_mm_split"}


def parallel_fields(args: argparse.Namespace) -> dict:
    return {"mla_mm_split": args.mla_mm_split}


def patches() -> List:
    from npu_dsv3.model import attention
    from npu_dsv3.patching import Patch

    return [Patch(name="mla-mm-split.mtp_sharded_state_dict", feature=NAME,
                  target="megatron.core.transformer.multi_token_prediction.MultiTokenPredictionBlock."
                         "sharded_state_dict",
                  replacement=attention.mtp_block_without_stale_parts, wrap=True,
                  why="--mla-mm-split with MTP: megatron's MTP block leaves the split parts' _extra_state entries, "
                  "which the attention stores under the unsplit linear's key, in the checkpoint's request")]
