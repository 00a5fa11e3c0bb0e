"""megatron-core 0.16.1 patches the DeepSeek-V3 model needs without TransformerEngine.

These hold on every backend: Ascend has no TransformerEngine and neither does a
CPU machine, so the CPU run exercises the same module structure as the NPU one.
"""

import importlib.util
import types

from npu_dsv3.ops.gmm import gmm
from npu_dsv3.patching import Patch, register

_HAVE_TE = importlib.util.find_spec("transformer_engine") is not None

register(
    Patch(
        name="mla.have_te",
        feature="model",
        target="megatron.core.transformer.multi_latent_attention.HAVE_TE",
        replacement=_HAVE_TE,
        why="megatron's TE extension module imports without TE and leaves HAVE_TE True with TELinear None, "
        "so MLA's isinstance(linear_proj, TELinear) check crashes",
    )
)

register(
    Patch(
        name="moe.te_general_gemm",
        feature="model",
        target="megatron.core.transformer.moe.moe_utils.te_general_gemm",
        replacement=None,
        create=True,
        why="the router's gating linear reads te_general_gemm, which is only defined when TE imports",
    )
)


def _gmm(a, b, batch_sizes, trans_b=False):
    """The ``grouped_gemm.ops.gmm`` signature megatron's GroupedMLP calls."""
    return gmm(a, b.transpose(1, 2) if trans_b else b, batch_sizes)


register(
    Patch(
        name="moe.grouped_gemm_ops",
        feature="model",
        target="megatron.core.transformer.moe.grouped_gemm_util.ops",
        replacement=types.SimpleNamespace(gmm=_gmm),
        why="grouped GEMM comes from npu_dsv3.ops.gmm (npu_gmm on Ascend), not the CUDA grouped_gemm package",
    )
)

register(
    Patch(
        name="moe.grouped_gemm_available",
        feature="model",
        target="megatron.core.transformer.moe.grouped_gemm_util.assert_grouped_gemm_is_available",
        replacement=lambda: None,
        why="GroupedMLP (and our GroupedExperts built on it) asserts the CUDA grouped_gemm package at init",
    )
)
