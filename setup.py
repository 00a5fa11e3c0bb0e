"""Packaging for npu_dsv3.

The top-level ``ops/`` folder is installed as the subpackage ``npu_dsv3.ops``
(``package_dir``); in a source checkout ``npu_dsv3/__init__.py`` maps it the
same way, so ``import npu_dsv3.ops`` works installed, editable, or from source.
Subpackages are found by ``find_packages``: a folder needs an ``__init__.py``.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["npu_dsv3", "npu_dsv3.*"])
# ops/ and its subfolders, renamed under npu_dsv3.ops.
packages += ["npu_dsv3.ops"] + ["npu_dsv3.ops." + p for p in find_packages(where="ops")]

setup(
    name="npu_dsv3",
    version="0.1.0",
    description="DeepSeek-V3 training with Megatron-Core on Ascend NPU clusters (also CUDA and CPU)",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"npu_dsv3.ops": "ops"},
    # The small bundled corpus the main job preprocesses and trains on.
    package_data={"npu_dsv3.data.corpus": ["*.jsonl"]},
    install_requires=[
        # A range: Ascend users install the torch that matches their torch_npu/CANN. megatron-core
        # 0.16.1 itself requires torch >= 2.6.
        "torch>=2.6",
        # Pinned: the one megatron-core version every patch is written and tested against
        # (npu_dsv3.patching.SUPPORTED_MEGATRON_CORE must say the same).
        "megatron-core==0.16.1",
        "safetensors",
        "transformers>=5.0,<6",
        "tqdm",
        "numpy",
        # megatron.core.dist_checkpointing's own writer (torch_dist saves) measures memory with it.
        "psutil",
        # parquet input of `npu-dsv3 data preprocess`
        "pyarrow",
        # LoRA adapters are written in PEFT's format and checked against PeftModel (npu_dsv3.lora.export)
        "peft>=0.21,<0.22",
    ],
    extras_require={
        "npu": ["torch_npu"],  # choose the release matching your torch and CANN
        # bitsandbytes: the oracle of our NF4 (tests only; QLoRA never imports it)
        "test": ["pytest", "bitsandbytes"],
        "bench": ["matplotlib"],  # benchmarks/pipeline.py draws its timelines
    },
    entry_points={"console_scripts": ["npu-dsv3 = npu_dsv3.cli:main"]},
)
