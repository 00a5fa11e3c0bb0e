"""Device ops, installed as ``npu_dsv3.ops``.

Each op has a torch_npu path (taken for tensors on an NPU) and a portable torch
path for CUDA and CPU with the same semantics; see each module's docstring.
"""

from npu_dsv3.ops.attention import mla_attention, reference_attention
from npu_dsv3.ops.gmm import gmm
from npu_dsv3.ops.nf4 import NF4, nf4_dequantize, nf4_quantize
from npu_dsv3.ops.permute import permute, unpermute
from npu_dsv3.ops.rms_norm import rms_norm
from npu_dsv3.ops.rotary import apply_rotary
from npu_dsv3.ops.swiglu import swiglu

__all__ = ["NF4", "apply_rotary", "gmm", "mla_attention", "nf4_dequantize", "nf4_quantize", "permute", "reference_attention", "rms_norm", "swiglu", "unpermute"]
