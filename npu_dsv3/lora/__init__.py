"""LoRA for DeepSeek-V3 on megatron-core: target names (``targets``), the model transform (``layers``) and
the HF / PEFT side (``export``). The flags, checks and config fields are ``npu_dsv3.features.lora``."""
