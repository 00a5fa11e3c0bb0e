"""Training checkpoints: save and resume exactly, in megatron's distributed format.

``save_checkpoint`` writes ``<save>/iter_XXXXXXX`` through
``megatron.core.dist_checkpointing`` (model chunks, optimizer state, LR
scheduler, every rank's RNG states, the iteration and the run's arguments), so a
run of another layout loads it (megatron reshards). It is written under a
temporary name and renamed once every rank has finished, and only then does
``latest_checkpointed_iteration.txt`` move to it: a crash mid-save leaves the
previous checkpoint and the tracker as they were.

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
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from npu_dsv3.checkpoint import io
from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.checkpoint.mcore_dist import FORMAT, TRACKER_FILE, in_process_save_strategy, release_dir

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


def save_checkpoint(root: str, iteration: int, model_chunks: List, optimizer, scheduler,
                    args: Optional[dict] = None, workers: int = 2) -> str:
    """Every rank calls this; returns the checkpoint directory once the tracker names it."""
    final = iteration_dir(root, iteration)
    staging = os.path.join(root, f".iter_{iteration:07d}.saving")
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # what a crashed save left
        os.makedirs(staging)
    dist.barrier()
    state = _sharded_state(model_chunks, optimizer, scheduler, iteration, dict(args or {}), rng=True, optim=True)
    dist_checkpointing.save(state, staging, sharded_strategy=in_process_save_strategy(workers),
                            validate_access_integrity=True)
    dist.barrier()
    if dist.get_rank() == 0:
        if os.path.exists(final):  # saving the same iteration again: the new one replaces it whole
            shutil.rmtree(final)
        os.replace(staging, final)
        with io.atomic_write(os.path.join(root, TRACKER_FILE)) as tmp:
            with open(tmp, "w") as f:
                f.write(str(iteration))
    dist.barrier()
    return final


def latest_checkpoint(root: str) -> Optional[str]:
    """The torch_dist directory the tracker names, or None when ``root`` has no checkpoint."""
    if not os.path.isfile(os.path.join(root, TRACKER_FILE)):
        return None
    directory = release_dir(root)
    if directory is None:
        raise CheckpointError(f"{root}/{TRACKER_FILE} names no {FORMAT} checkpoint there "
                              "(a legacy per-rank one is converted with `npu-dsv3 convert reshard --save-format "
                              "torch_dist`)")
    return directory


def load_checkpoint(root: str, model_chunks: List, optimizer=None, scheduler=None, finetune: bool = False,
                    load_optim: bool = True, load_rng: bool = True) -> int:
    """Loads the latest checkpoint under ``root`` into this run's layout; returns the iteration to
    continue from (0 with ``finetune``, which loads the weights only)."""
    directory = latest_checkpoint(root)
    if directory is None:
        raise CheckpointError(f"--load {root}: no {TRACKER_FILE} there")
    load_optim = load_optim and not finetune and optimizer is not None
    load_rng = load_rng and not finetune
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

