"""The DeepSeek-V3 model's megatron-core patches: always on, on every backend.

megatron-core 0.16.1 assumes TransformerEngine and CUDA's grouped_gemm package for pieces of MLA and
MoE; Ascend has neither, nor has a CPU machine, so the CPU run exercises the module structure the NPU
one does. And megatron places layers uniformly; ours follow ``npu_dsv3.layout`` (``--num-layer-list``,
``--noop-layers``, dualpipev). The replacements are in ``npu_dsv3.model.patches`` and
``npu_dsv3.model.linear``.
"""

from typing import List

NAME = "model"
TESTS = "tests/unit/test_model_parity.py, tests/multiprocess/test_model_layouts.py, tests/unit/test_patching.py"
ALWAYS_ON = True

_MLA = "megatron.core.transformer.multi_latent_attention"
_GROUPED_GEMM = "megatron.core.transformer.moe.grouped_gemm_util"


def patches() -> List:
    from npu_dsv3.model import patches as model
    from npu_dsv3.model.linear import DuplicatedLinear
    from npu_dsv3.patching import Patch

    return [
        Patch(name="mla.have_te", feature=NAME, target=f"{_MLA}.HAVE_TE", replacement=model.HAVE_TE,
              why="megatron's TE extension module imports without TE and leaves HAVE_TE True with TELinear None, "
              "so MLA's isinstance(linear_proj, TELinear) check crashes"),
        Patch(name="mla.duplicated_linear", feature=NAME, target=f"{_MLA}.Linear", replacement=DuplicatedLinear,
              why="MLA accepts an unsplit down-projection only as its `Linear`, which is None without TE; ours holds "
              "the weight whole on every TP rank so the rotary key's gradient sums every rank's heads"),
        Patch(name="moe.te_general_gemm", feature=NAME,
              target="megatron.core.transformer.moe.moe_utils.te_general_gemm",
              replacement=None, create=True,
              why="the router's gating linear reads te_general_gemm, which is only defined when TE imports"),
        Patch(name="moe.grouped_gemm_ops", feature=NAME, target=f"{_GROUPED_GEMM}.ops",
              replacement=model.GROUPED_GEMM_OPS,
              why="grouped GEMM comes from npu_dsv3.ops.gmm (npu_grouped_matmul on Ascend), not the CUDA "
              "grouped_gemm package"),
        Patch(name="moe.grouped_gemm_available", feature=NAME,
              target=f"{_GROUPED_GEMM}.assert_grouped_gemm_is_available",
              replacement=model.grouped_gemm_available,
              why="GroupedMLP (and our GroupedExperts built on it) asserts the CUDA grouped_gemm package at init"),
    ] + [
        # Every module that calls it through its own name: layers add it to their position, the block
        # subtracts it to name its checkpoint entries, the MTP layer to number its decoder layer.
        Patch(name=f"pipeline.layer_offset.{module}", feature=NAME,
              target=f"megatron.core.transformer.{module}.get_transformer_layer_offset",
              replacement=model.layout_offset, wrap=True,
              why="layers are placed by npu_dsv3.layout (--num-layer-list, --noop-layers, dualpipev), "
              "not megatron's uniform split: the offset of a chunk is its count of earlier real layers")
        for module in ("transformer_layer", "transformer_block", "multi_token_prediction")
    ]
