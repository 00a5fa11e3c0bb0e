"""Checkpoint I/O: HF safetensors directories and megatron-core checkpoints."""
