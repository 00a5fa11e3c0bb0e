"""Training on megatron-core: model wrapping, optimizer, one step of the schedule."""

from npu_dsv3.training.step import build_optimizer, train_step, wrap_model

__all__ = ["build_optimizer", "train_step", "wrap_model"]
