"""Training checkpoints: save and resume exactly.

``save_checkpoint`` writes ``<save>/iter_XXXXXXX`` with the model chunks, the
optimizer state, the LR scheduler, the RNG states, the iteration and the run's
arguments, in one of two formats:

- ``torch_dist`` (default): ``megatron.core.dist_checkpointing``, which a run of
  another layout loads (megatron reshards);
- ``torch``: the legacy per-rank files MindSpeed-LLM users have,
  ``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``, loadable by the same layout.

A checkpoint is written under a temporary name and renamed once every rank has
finished, and only then does ``latest_checkpointed_iteration.txt`` move to it:
a crash mid-save leaves the previous checkpoint and the tracker as they were.

The files are written by torch's DCP writer threads inside the training
processes (megatron's default writer forks helper processes, which needs
``psutil`` and a ``__main__`` guard in every launcher). Everything is read back
with ``weights_only=True``: the arguments and RNG states are stored as plain
numbers, strings and tensors.
"""

import os
import random
import shutil
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from npu_dsv3.checkpoint import io
from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.checkpoint.mcore_dist import (FORMAT, TRACKER_FILE, in_process_save_strategy, release_dir,
                                            tracked_dir)
from npu_dsv3.checkpoint.rank_state import rank_dir_name

CHECKPOINT_VERSION = 3.0


def iteration_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def _rng_state() -> Dict[str, object]:
    """This rank's RNG states as tensors and numbers (loadable with ``weights_only=True``)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "random": [version, list(state), gauss],
        "np_random": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "tracker": {k: v.cpu() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()},
    }


def _set_rng_state(state: Dict[str, object]) -> None:
    version, values, gauss = state["random"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["np_random"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _unwrap(chunk):
    return getattr(chunk, "module", chunk)


def _model_state(model_chunks) -> dict:
    if len(model_chunks) == 1:
        return {"model": _unwrap(model_chunks[0]).sharded_state_dict()}
    return {f"model{i}": _unwrap(c).sharded_state_dict() for i, c in enumerate(model_chunks)}


def _model_sharded(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("model")}


def _rng_object(state) -> ShardedObject:
    # One entry per rank: data-parallel ranks draw dropout differently, so each keeps its own.
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _sharded_state(model_chunks, optimizer, scheduler, iteration: int, args: dict, rng: bool, optim: bool,
                   loading: bool = False):
    state = _model_state(model_chunks)
    if optim and optimizer is not None:
        # Loading: megatron first gives a fresh optimizer the state entries the checkpoint fills.
        state["optimizer"] = optimizer.sharded_state_dict(_model_sharded(state), is_loading=loading)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if rng:
        state["rng_state"] = _rng_object(_rng_state())
    state.update(iteration=iteration, checkpoint_version=CHECKPOINT_VERSION, args=args,
                 has_optimizer=optim and optimizer is not None, has_rng=rng)
    return state


def _legacy_file(directory: str) -> str:
    name = rank_dir_name(parallel_state.get_tensor_model_parallel_rank(),
                         parallel_state.get_pipeline_model_parallel_rank(),
                         parallel_state.get_expert_model_parallel_rank(),
                         parallel_state.get_pipeline_model_parallel_world_size(),
                         parallel_state.get_expert_model_parallel_world_size())
    return os.path.join(directory, name, "model_optim_rng.pt")


def _check_legacy_optimizer(optimizer) -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(inner, DistributedOptimizer):
            raise ValueError("--ckpt-format torch cannot hold the state of --use-distributed-optimizer (it is "
                             "sharded over data-parallel ranks); use --ckpt-format torch_dist")


def _save_legacy(staging: str, model_chunks, optimizer, scheduler, iteration: int, args: dict) -> None:
    _check_legacy_optimizer(optimizer)
    # One file per (tensor, pipeline, expert) rank, written by its first data-parallel replica.
    if parallel_state.get_data_parallel_rank() != 0:
        return
    payload = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "args": args,
               "rng_state": _rng_state(), "opt_param_scheduler": scheduler.state_dict() if scheduler else None,
               "optimizer": optimizer.state_dict() if optimizer is not None else None}
    for i, chunk in enumerate(model_chunks):
        payload["model" if len(model_chunks) == 1 else f"model{i}"] = _unwrap(chunk).state_dict()
    path = _legacy_file(staging)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(payload, path)


def save_checkpoint(root: str, iteration: int, model_chunks: List, optimizer, scheduler,
                    args: Optional[dict] = None, ckpt_format: str = FORMAT, workers: int = 2) -> str:
    """Every rank calls this; returns the checkpoint directory once the tracker names it."""
    final = iteration_dir(root, iteration)
    staging = os.path.join(root, f".iter_{iteration:07d}.saving")
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # what a crashed save left
        os.makedirs(staging)
    dist.barrier()
    if ckpt_format == FORMAT:
        state = _sharded_state(model_chunks, optimizer, scheduler, iteration, dict(args or {}), rng=True, optim=True)
        dist_checkpointing.save(state, staging, sharded_strategy=in_process_save_strategy(workers),
                                validate_access_integrity=True)
    elif ckpt_format == "torch":
        _save_legacy(staging, model_chunks, optimizer, scheduler, iteration, dict(args or {}))
    else:
        raise ValueError(f"--ckpt-format {ckpt_format}: use torch_dist or torch")
    dist.barrier()
    if dist.get_rank() == 0:
        _sync_tree(staging)
        if os.path.exists(final):  # saving the same iteration again: the new one replaces it whole
            shutil.rmtree(final)
        os.replace(staging, final)
        with io.atomic_write(os.path.join(root, TRACKER_FILE)) as tmp:
            with open(tmp, "w") as f:
                f.write(str(iteration))
    dist.barrier()
    return final


def _sync_tree(directory: str) -> None:
    """Every file of a finished save on disk before the rename makes it the checkpoint."""
    for dirpath, _, names in os.walk(directory):
        for name in names:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def latest_checkpoint(root: str) -> Optional[str]:
    """The directory the tracker under ``root`` names, or None when ``root`` has no checkpoint."""
    directory = tracked_dir(root)
    if directory is not None and not os.path.isdir(directory):
        raise CheckpointError(f"{os.path.join(root, TRACKER_FILE)} names {directory}, which does not exist")
    return directory


def load_checkpoint(root: str, model_chunks: List, optimizer=None, scheduler=None, finetune: bool = False,
                    load_optim: bool = True, load_rng: bool = True) -> int:
    """Loads the latest checkpoint under ``root`` (either format) into this run; returns the iteration
    to continue from (0 with ``finetune``, which loads the weights only)."""
    directory = latest_checkpoint(root)
    if directory is None:
        raise CheckpointError(f"--load {root}: no {TRACKER_FILE} there")
    load_rng = load_rng and not finetune
    load_optim = load_optim and not finetune and optimizer is not None
    if release_dir(root) is None:
        return _load_legacy(directory, model_chunks, optimizer, scheduler, finetune, load_optim, load_rng)
    stored = dist_checkpointing.load_common_state_dict(directory)
    # What the checkpoint holds: a converted one has the weights only.
    load_optim = load_optim and stored.get("has_optimizer", False)
    load_rng = load_rng and stored.get("has_rng", False)
    sharded = _sharded_state(model_chunks, optimizer, scheduler, 0, {}, rng=load_rng, optim=load_optim,
                             loading=True)
    for key in ("iteration", "checkpoint_version", "args", "opt_param_scheduler", "has_optimizer", "has_rng"):
        sharded.pop(key, None)
    state = dist_checkpointing.load(sharded, directory)
    for name, chunk in zip(sorted(k for k in state if k.startswith("model")), model_chunks):
        _unwrap(chunk).load_state_dict(state[name])
    if load_optim:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and not finetune and "opt_param_scheduler" in stored:
        scheduler.load_state_dict(stored["opt_param_scheduler"])
    if load_rng:
        _set_rng_state(state["rng_state"])
    return 0 if finetune else int(stored.get("iteration", 0))


def _load_legacy(directory: str, model_chunks, optimizer, scheduler, finetune, load_optim, load_rng) -> int:
    path = _legacy_file(directory)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {directory} was saved with another tensor / pipeline / expert "
                              "parallel layout (convert it with `npu-dsv3 convert reshard`)")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(payload["model" if len(model_chunks) == 1 else f"model{i}"])
    if load_optim and payload.get("optimizer") is not None:
        _check_legacy_optimizer(optimizer)
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and not finetune and payload.get("opt_param_scheduler") is not None:
        scheduler.load_state_dict(payload["opt_param_scheduler"])
    if load_rng and payload.get("rng_state") is not None:
        _set_rng_state(payload["rng_state"])
    return 0 if finetune else int(payload.get("iteration", 0))
