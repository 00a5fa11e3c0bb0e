"""Training checkpoints: save and resume exactly.

``save_checkpoint`` writes ``<save>/iter_XXXXXXX`` with the model chunks, the
optimizer state, the LR scheduler, the RNG states, the iteration and the run's
arguments, in one of two formats:

- ``torch_dist`` (default): ``megatron.core.dist_checkpointing``, which a run of
  another TP / PP / EP / DP layout loads: megatron reshards the weights and the
  optimizer state (the latter into the same kind of optimizers only, see
  ``_check_optimizer_kinds``);
- ``torch``: the legacy per-rank files MindSpeed-LLM users have,
  ``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt`` and, with
  ``--use-distributed-optimizer``, Megatron-LM's ``distrib_optim.pt`` beside it
  (each data-parallel group's optimizer shards gathered on its first rank),
  loadable by the same tensor / pipeline / expert layout.

The RNG states are per rank: they are restored only into the layout that saved
them (in another one a rank runs other layers and experts, so it keeps its own
seeded streams).

A checkpoint is written under a temporary name and renamed once every rank has
finished, and only then does ``latest_checkpointed_iteration.txt`` move to it:
a crash mid-save leaves the previous checkpoint and the tracker as they were.
Training moves the tracker one step later still (``publish=False``, then
``publish_checkpoint``), once the next step's loss is finite on every rank, so it
never names weights whose next forward is NaN / inf.

The files are written by torch's DCP writer threads inside the training
processes (megatron's default writer forks helper processes, which needs
``psutil`` and a ``__main__`` guard in every launcher). Everything is read back
through the allow-list of ``npu_dsv3.checkpoint.safe_load``: the arguments and
RNG states are stored as plain numbers, strings and tensors.
"""

import contextlib
import functools
import logging
import os
import random
import shutil
from typing import Dict, List, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject

from npu_dsv3.checkpoint import io
from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.checkpoint.mcore_dist import FORMAT, in_process_save_strategy, release_dir
from npu_dsv3.checkpoint.safe_load import load_torch
from npu_dsv3.checkpoint.sources import TRACKER_FILE, tracked_dir
from npu_dsv3.layout import rank_dir_name
from npu_dsv3.lora.export import ADAPTER_CONFIG
from npu_dsv3.lora.sources import MODEL_KEYS
from npu_dsv3.lora.targets import is_lora_param

_log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 3.0
DISTRIB_OPTIM_FILE = "distrib_optim.pt"  # Megatron-LM's name, beside each rank's model_optim_rng.pt
# The distributed optimizer's torch_dist state in model space, one tensor per parameter and state
# like the plain optimizer's, so any TP / PP / EP / DP layout loads it (megatron-core 0.16's default,
# fully_sharded_model_space, does not save at all: it makes flattened ShardedTensors, which 0.16
# refuses). The buffers are gathered on each data-parallel group's first rank through gloo, in host
# memory.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "distrib_optim_fully_reshardable_mem_efficient": True}


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


# Which tensors of the model a save or load covers: everything, the LoRA adapters only
# (--lora-ckpt-filter, --lora-load), or everything but them (a base checkpoint under a LoRA model).
ALL, LORA, BASE = "all", "lora", "base"
LORA_FILE = "lora_config.json"  # beside a LoRA run's checkpoints: r, alpha, dropout, targets, fusion


def _part(weights: dict, part: str) -> dict:
    if part == ALL:
        return weights
    return {k: v for k, v in weights.items() if is_lora_param(k) == (part == LORA)}


def _model_state(model_chunks, part: str = ALL) -> dict:
    # A pipeline stage holding MTP but not the embedding ties its copy of the embedding to the first
    # stage's through this group (GPTModel.sharded_state_dict reads it).
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    if len(model_chunks) == 1:
        return {"model": _part(_unwrap(model_chunks[0]).sharded_state_dict(metadata=metadata), part)}
    return {f"model{i}": _part(_unwrap(c).sharded_state_dict(metadata=metadata), part)
            for i, c in enumerate(model_chunks)}


def _model_sharded(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("model")}


def _rng_object(state) -> ShardedObject:
    # One entry per rank: data-parallel ranks draw dropout differently, so each keeps its own.
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _layout() -> Dict[str, int]:
    """The parallel sizes that decide which layers, experts and RNG streams a rank has."""
    return {"world": dist.get_world_size(), "tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "vpp": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
            "ep": parallel_state.get_expert_model_parallel_world_size(),
            "etp": parallel_state.get_expert_tensor_parallel_world_size()}


def _sharded_state(model_chunks, optimizer, scheduler, iteration: int, args: dict, rng: bool, optim: bool,
                   loading: bool = False, part: str = ALL):
    state = _model_state(model_chunks, part)
    if optim and optimizer is not None:
        # Loading: megatron first gives a fresh optimizer the state entries the checkpoint fills.
        state["optimizer"] = optimizer.sharded_state_dict(_model_sharded(state), is_loading=loading,
                                                          metadata=OPTIMIZER_METADATA)
        state["optimizers"] = _optimizer_kinds(optimizer)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    if rng:
        state["rng_state"] = _rng_object(_rng_state())
    state.update(iteration=iteration, checkpoint_version=CHECKPOINT_VERSION, args=args,
                 has_optimizer=optim and optimizer is not None, has_rng=rng, layout=_layout())
    return state


def _legacy_file(directory: str) -> str:
    name = rank_dir_name(parallel_state.get_tensor_model_parallel_rank(),
                         parallel_state.get_pipeline_model_parallel_rank(),
                         parallel_state.get_expert_model_parallel_rank(),
                         parallel_state.get_pipeline_model_parallel_world_size(),
                         parallel_state.get_expert_model_parallel_world_size())
    return os.path.join(directory, name, "model_optim_rng.pt")


def _chain(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return optimizer is not None and any(isinstance(o, DistributedOptimizer) for o in _chain(optimizer))


def _writes(path: str) -> bool:
    """Whether this rank writes the legacy rank file ``path``: the lowest of the ranks that share it.

    Those ranks are data-parallel replicas holding the same weights, and the lowest is also the first
    rank of each of its data-parallel groups, the one the distributed optimizer gathers its state on.
    (Megatron-LM writes from expert-data-parallel rank 0, which leaves the files of tensor-parallel
    ranks > 0 unwritten when the experts are not tensor-parallel.)"""
    paths = [None] * dist.get_world_size()
    dist.all_gather_object(paths, path)
    return paths.index(path) == dist.get_rank()


def _param_state(optimizer):
    """Megatron-LM's ``distrib_optim.pt``: each distributed optimizer's parameter, exp_avg and exp_avg_sq
    buffers gathered on its first data-parallel rank (None on the others), one entry per chained
    optimizer, or the entry itself for a single one. Every rank calls it (it gathers)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chain = _chain(optimizer)
    states = [o.get_parameter_state_dp_zero() if isinstance(o, DistributedOptimizer) else None for o in chain]
    return states[0] if len(chain) == 1 else states


@torch.no_grad()  # with fp32 weights the optimizer's main parameters are views of the model's
def _load_param_state(optimizer, directory: str) -> None:
    """The inverse of ``_param_state``: the first rank of each data-parallel group reads the file
    (tensors only, through ``safe_load``'s allow-list) and megatron scatters the buffers over the group."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chain = _chain(optimizer)
    stored = None
    for i, inner in enumerate(chain):
        if not isinstance(inner, DistributedOptimizer):
            continue
        state = None
        if inner.data_parallel_group.rank() == 0:
            if stored is None:
                stored = load_torch(os.path.join(directory, DISTRIB_OPTIM_FILE), map_location="cpu")
            state = stored if len(chain) == 1 else stored[i]
        inner.load_parameter_state_from_dp_zero(state)


def _zero_distributed_optimizer_state(optimizer) -> None:
    """Megatron's distributed optimizer describes what to load from the state it holds, and with torch's
    Adam (no TransformerEngine / Apex) a fresh one holds none and fails: give it zeros to load over."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in _chain(optimizer):
        if isinstance(inner, DistributedOptimizer) and not inner.optimizer.state:
            for group in inner.optimizer.param_groups:
                for p in group["params"]:
                    inner.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                                "exp_avg_sq": torch.zeros_like(p)}


@contextlib.contextmanager
def _loading_torch_adam(optimizer):
    """Two things megatron 0.16's distributed optimizer gets wrong when loading into torch's Adam (used
    without TransformerEngine / Apex), which keeps a per-parameter "step" tensor:

    - it sets each parameter's state from the loaded tensors key by key, "step" included, which
      checkpoints keep in param_groups (KeyError 'step'): here a key the tensors lack keeps its value;
    - it gives every parameter the same "step" tensor, which Adam then advances once per parameter
      each iteration: afterwards each parameter gets its own."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = [o for o in _chain(optimizer) if isinstance(o, DistributedOptimizer)]
    for inner in patched:
        inner._set_main_param_and_optimizer_states = functools.partial(_set_keeping_missing, inner)
    try:
        yield
    finally:
        for inner in patched:
            del inner._set_main_param_and_optimizer_states
            for state in inner.optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].clone()


def _set_keeping_missing(inner, model_param, tensors) -> None:
    held = inner._get_main_param_and_optimizer_states(model_param)
    kept = {k: held[k] for k in held.keys() - tensors.keys()}
    type(inner)._set_main_param_and_optimizer_states(inner, model_param, {**tensors, **kept})


def _check_legacy_optimizer(optimizer, directory: str) -> None:
    # The file tells, as in Megatron-LM's checkpoints, which record nothing else about it.
    saved_distributed = os.path.isfile(os.path.join(directory, DISTRIB_OPTIM_FILE))
    if saved_distributed != _is_distributed(optimizer):
        saved, now = ("with", "without") if saved_distributed else ("without", "with")
        raise CheckpointError(f"{directory} was saved {saved} --use-distributed-optimizer and this run is {now} "
                              "it: its optimizer state loads only into the same optimizer (pass --no-load-optim "
                              "to load the weights only)")


def _save_legacy(staging: str, model_chunks, optimizer, scheduler, iteration: int, args: dict, rng: bool,
                 optim: bool, part: str = ALL) -> None:
    path = _legacy_file(staging)
    optim = optim and optimizer is not None
    param_state = _param_state(optimizer) if optim and _is_distributed(optimizer) else None
    if not _writes(path):
        return
    payload = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "args": args,
               "rng_state": _rng_state() if rng else None,
               "opt_param_scheduler": scheduler.state_dict() if scheduler else None,
               "optimizer": optimizer.state_dict() if optim else None}
    for i, chunk in enumerate(model_chunks):
        payload["model" if len(model_chunks) == 1 else f"model{i}"] = _part(_unwrap(chunk).state_dict(), part)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(payload, path)
    if param_state is not None:
        torch.save(param_state, os.path.join(os.path.dirname(path), DISTRIB_OPTIM_FILE))


def save_checkpoint(root: str, iteration: int, model_chunks: List, optimizer, scheduler,
                    args: Optional[dict] = None, ckpt_format: str = FORMAT, workers: int = 2,
                    save_optim: bool = True, save_rng: bool = True, hf_config: Optional[dict] = None,
                    tokenizer_dir: Optional[str] = None, publish: bool = True, lora_only: bool = False,
                    lora: Optional[dict] = None, qlora_dequantize: bool = False) -> str:
    """Every rank calls this; returns the checkpoint directory once the tracker names it.
    ``lora_only`` (``--lora-ckpt-filter``): the model's LoRA adapters only (the optimizer holds nothing else);
    ``lora``: the adapters' description (rank, alpha, targets), written beside as ``LORA_FILE``.
    ``qlora_dequantize`` (``--qlora-save-dequantize``): a QLoRA model's NF4 base saved dequantized, as the
    unquantized model's weights.
    ``save_optim`` / ``save_rng`` False: ``--no-save-optim`` / ``--no-save-rng``. ``hf_config``
    (and the tokenizer files of ``tokenizer_dir``) go beside the checkpoints, where ``npu-dsv3
    convert mcore2hf`` and ``verify --mcore-dir`` read the model's description. ``publish`` False:
    the directory is complete but the tracker stays where it was until ``publish_checkpoint``."""
    final = iteration_dir(root, iteration)
    staging = os.path.join(root, f".iter_{iteration:07d}.saving")
    if dist.get_rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # what a crashed save left
        os.makedirs(staging)
    dist.barrier()
    try:
        with _dequantized(model_chunks, qlora_dequantize):
            if ckpt_format == FORMAT:
                state = _sharded_state(model_chunks, optimizer, scheduler, iteration, dict(args or {}),
                                       rng=save_rng, optim=save_optim, part=LORA if lora_only else ALL)
                dist_checkpointing.save(state, staging, sharded_strategy=in_process_save_strategy(workers),
                                        validate_access_integrity=True)
            elif ckpt_format == "torch":
                _save_legacy(staging, model_chunks, optimizer, scheduler, iteration, dict(args or {}),
                             rng=save_rng, optim=save_optim, part=LORA if lora_only else ALL)
            else:
                raise ValueError(f"--ckpt-format {ckpt_format}: use torch_dist or torch")
        dist.barrier()
        if dist.get_rank() == 0:
            _sync_tree(staging)
    except OSError:
        # A save this rank could not write (a full disk, permissions) leaves nothing half-written. A crashed
        # peer is not handled here: its staging directory stays until the next save of this iteration.
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if dist.get_rank() == 0:
        if os.path.exists(final):  # saving the same iteration again: the new one replaces it whole
            shutil.rmtree(final)
        os.replace(staging, final)
        if hf_config is not None:
            _describe_model(root, hf_config, tokenizer_dir)
        if lora is not None:
            io.atomic_write_json(lora, os.path.join(root, LORA_FILE), sort_keys=True)
    if publish:
        publish_checkpoint(root, iteration)
    else:
        dist.barrier()
    return final


@contextlib.contextmanager
def _dequantized(model_chunks, dequantize: bool):
    """``--qlora-save-dequantize``: the chunks as the unquantized model while the save reads them."""
    with contextlib.ExitStack() as stack:
        if dequantize:
            from npu_dsv3.lora.nf4_base import dequantized

            for chunk in model_chunks:
                stack.enter_context(dequantized(_unwrap(chunk)))
        yield


def publish_checkpoint(root: str, iteration: int) -> None:
    """Every rank calls this: the tracker under ``root`` names the saved ``iteration`` from now on."""
    if dist.get_rank() == 0:
        with io.atomic_write(os.path.join(root, TRACKER_FILE)) as tmp:
            with open(tmp, "w") as f:
                f.write(str(iteration))
    dist.barrier()


def discard_checkpoint(root: str, iteration: int) -> None:
    """Removes the unpublished checkpoint of ``iteration`` (rank 0 does; the tracker never named it)."""
    if dist.get_rank() == 0:
        shutil.rmtree(iteration_dir(root, iteration), ignore_errors=True)


def _describe_model(root: str, hf_config: dict, tokenizer_dir: Optional[str]) -> None:
    from npu_dsv3.checkpoint.sources import HF_EXTRA_FILES

    io.atomic_write_json(hf_config, os.path.join(root, "config.json"))
    for name in HF_EXTRA_FILES if tokenizer_dir and os.path.isdir(tokenizer_dir) else ():
        if os.path.isfile(os.path.join(tokenizer_dir, name)):
            io.atomic_copy(os.path.join(tokenizer_dir, name), os.path.join(root, name))


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


class Resumed(NamedTuple):
    iteration: int
    """The iteration to continue from (0 with ``finetune``)."""
    args: dict
    """The flags the checkpoint was saved with ({} when it records none)."""


def load_checkpoint(root: str, model_chunks: List, optimizer=None, scheduler=None, finetune: bool = False,
                    load_optim: bool = True, load_rng: bool = True) -> int:
    """Loads the latest checkpoint under ``root`` (either format) into this run; returns the iteration
    to continue from (0 with ``finetune``, which loads the weights only)."""
    return resume_checkpoint(root, model_chunks, optimizer, scheduler, finetune, load_optim, load_rng).iteration


def resume_checkpoint(root: str, model_chunks: List, optimizer=None, scheduler=None, finetune: bool = False,
                      load_optim: bool = True, load_rng: bool = True, lora_load: Optional[str] = None) -> Resumed:
    """``load_checkpoint``, also returning the flags the checkpoint was saved with.

    A LoRA model (``npu_dsv3.lora``): with ``lora_load`` the base weights come from ``root`` and the
    adapters, with the iteration, optimizer, scheduler and RNG states, from ``lora_load`` (a checkpoint
    saved with or without ``--lora-ckpt-filter``). Without it, a ``root`` that holds adapters resumes
    them; one that holds none (a base model) gives the base weights and fresh adapters, from iteration 0.
    """
    if model_chunks and _unwrap(model_chunks[0]).config.qlora:
        from npu_dsv3.lora.nf4_base import check_nf4_buffers

        try:
            resumed = _resume(root, model_chunks, optimizer, scheduler, finetune, load_optim, load_rng, lora_load)
        except CheckpointError as e:
            if "_nf4" not in str(e):
                raise
            raise CheckpointError(f"--qlora: --load {root} holds no NF4 weights; convert the HF model with "
                                  f"`npu-dsv3 convert hf2mcore --qlora-nf4` and load that ({e})") from e
        for chunk in model_chunks:
            check_nf4_buffers(_unwrap(chunk), root)
        return resumed
    return _resume(root, model_chunks, optimizer, scheduler, finetune, load_optim, load_rng, lora_load)


def _resume(root, model_chunks, optimizer, scheduler, finetune, load_optim, load_rng, lora_load) -> Resumed:
    lora_model = any(is_lora_param(name) for chunk in model_chunks for name, _ in _unwrap(chunk).named_parameters())
    if lora_load is not None and os.path.isfile(os.path.join(lora_load, ADAPTER_CONFIG)):
        _load(root, "--load", model_chunks, None, None, True, False, False, BASE, True)
        _load_peft(lora_load, model_chunks)
        return Resumed(0, {})
    if lora_load is not None:
        _load(root, "--load", model_chunks, None, None, True, False, False, BASE, True)
        return _load(lora_load, "--lora-load", model_chunks, optimizer, scheduler, finetune, load_optim, load_rng,
                     LORA, True)
    return _load(root, "--load", model_chunks, optimizer, scheduler, finetune, load_optim, load_rng, ALL, lora_model)


def _load_peft(directory: str, model_chunks) -> None:
    """A PEFT adapter directory as this run's starting adapters (fresh optimizer, iteration 0)."""
    from npu_dsv3.lora.export import read_peft_adapter
    from npu_dsv3.lora.layers import shard_adapters

    config = _unwrap(model_chunks[0]).config
    adapters, peft = read_peft_adapter(directory, config.num_layers)
    if (peft["r"], float(peft["lora_alpha"])) != (config.lora_rank, config.lora_alpha):
        raise CheckpointError(f"--lora-load {directory}: the adapter has r {peft['r']} and alpha {peft['lora_alpha']}, "
                              f"this run --lora-r {config.lora_rank} --lora-alpha {config.lora_alpha:g}: pass its values")
    for chunk in model_chunks:
        try:
            shard_adapters(_unwrap(chunk), adapters)
        except ValueError as e:
            raise CheckpointError(f"--lora-load {directory}: {e}") from None


def _load(root: str, flag: str, model_chunks, optimizer, scheduler, finetune: bool, load_optim: bool,
          load_rng: bool, part: str, lora_model: bool) -> Resumed:
    """One checkpoint's ``part`` of the model (see ``_stored_part``)."""
    directory = latest_checkpoint(root)
    if directory is None:
        raise CheckpointError(f"{flag} {root}: no {TRACKER_FILE} there")
    load_rng = load_rng and not finetune
    load_optim = load_optim and not finetune and optimizer is not None
    if release_dir(root) is None:
        return _load_legacy(directory, flag, model_chunks, optimizer, scheduler, finetune, load_optim, load_rng,
                            part, lora_model)
    stored = dist_checkpointing.load_common_state_dict(directory)
    part = _stored_part(part, list(dist_checkpointing.load_tensors_metadata(directory)), directory, flag, lora_model)
    if part == BASE:  # a base under a LoRA model: weights only, and the run starts over
        finetune, load_optim, load_rng = True, False, False
    # What the checkpoint holds: a converted one has the weights only.
    load_optim = load_optim and stored.get("has_optimizer", False)
    load_rng = load_rng and stored.get("has_rng", False) and _same_layout(stored.get("layout"))
    if load_optim:
        _check_optimizer_kinds(stored.get("optimizers"), optimizer, directory)
        _zero_distributed_optimizer_state(optimizer)
    sharded = _sharded_state(model_chunks, optimizer, scheduler, 0, {}, rng=load_rng, optim=load_optim,
                             loading=True, part=part)
    for key in ("iteration", "checkpoint_version", "args", "opt_param_scheduler", "has_optimizer", "has_rng",
                "layout", "optimizers"):
        sharded.pop(key, None)
    state = dist_checkpointing.load(sharded, directory)
    for i, chunk in enumerate(model_chunks):
        # A chunk without weights (noop layers only) has no entry in what the load returns.
        _unwrap(chunk).load_state_dict(state.get("model" if len(model_chunks) == 1 else f"model{i}", {}),
                                       strict=part == ALL)
    if load_optim:
        with _loading_torch_adam(optimizer):
            optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and not finetune and "opt_param_scheduler" in stored:
        scheduler.load_state_dict(stored["opt_param_scheduler"])
    if load_rng:
        _set_rng_state(state["rng_state"])
    return _resumed(stored, finetune)


def _stored_part(part: str, names, directory: str, flag: str, lora_model: bool) -> str:
    """The part of the model to load from a checkpoint holding tensors ``names``. ALL under a LoRA model
    becomes BASE when the checkpoint holds no adapters (a base model); adapters alone cannot stand for a
    whole model, and a model without LoRA cannot take them."""
    names = [n for n in names if n.startswith(MODEL_KEYS)]  # not the optimizer's or the RNG's entries
    has_lora = any(is_lora_param(n) for n in names)
    has_base = any(not is_lora_param(n) and not n.endswith("_extra_state") for n in names)
    if part == LORA and not has_lora:
        raise CheckpointError(f"{flag} {directory} holds no LoRA adapters: it is not a LoRA checkpoint")
    if part != LORA and not has_base:
        raise CheckpointError(f"{flag} {directory} holds only LoRA adapters (--lora-ckpt-filter): give the base "
                              "model with --load and this with --lora-load")
    if has_lora and not lora_model:
        raise CheckpointError(f"{flag} {directory} holds LoRA adapters: train it with the --lora-* flags it was "
                              "saved with, or merge them first (npu-dsv3 convert mcore2hf --lora-load)")
    return BASE if part == ALL and lora_model and not has_lora else part


def _resumed(stored: dict, finetune: bool) -> Resumed:
    saved = stored.get("args") or {}
    # Megatron-LM / MindSpeed-LLM store their flags as an argparse Namespace.
    return Resumed(0 if finetune else int(stored.get("iteration", 0)),
                   dict(saved if isinstance(saved, dict) else vars(saved)))


def _optimizer_kinds(optimizer) -> List[str]:
    return [type(o).__name__ for o in _chain(optimizer)]


def _check_optimizer_kinds(saved: Optional[List[str]], optimizer, directory: str) -> None:
    """megatron keys the optimizer state by the optimizers of the run: plain or distributed, fp32 or
    mixed precision, and one for all parameters or (expert-parallel size > 1) a second one for the
    experts. The state loads only into the same ones; any TP / PP / EP / DP sizes otherwise."""
    now = _optimizer_kinds(optimizer)
    if saved is not None and saved != now:
        differ = [i for i in range(max(len(saved), len(now))) if saved[i:i + 1] != now[i:i + 1]]
        saved_kinds = ", ".join(saved[i] if i < len(saved) else "none" for i in differ)
        now_kinds = ", ".join(now[i] if i < len(now) else "none" for i in differ)
        raise CheckpointError(f"{directory} holds the state of {saved_kinds} optimizer(s) where this run has "
                              f"{now_kinds} (they differ with --use-distributed-optimizer, --bf16 / --fp16, and "
                              "between --expert-model-parallel-size 1 and > 1): pass --no-load-optim to load the "
                              "weights only")


def _same_layout(saved: Optional[dict]) -> bool:
    now = _layout()
    if saved == now:
        return True
    if dist.get_rank() == 0:
        saved = saved or {}
        differ = ", ".join(f"{k} {saved.get(k, 'unrecorded')} (this run {now.get(k, 'none')})"
                           for k in sorted(saved.keys() | now.keys()) if saved.get(k) != now.get(k))
        _log.warning(f"note: the checkpoint was saved with other parallel sizes: {differ}; its RNG states are not "
                     "loaded")
    return False


def _load_rank_weights(model, weights: dict, path: str, part: str = ALL) -> None:
    """A rank file's weights (``part`` of them), or one line naming the first tensor that does not fit this
    run's model."""
    own = _part(model.state_dict(), part)
    for name, tensor in own.items():
        if name.endswith("_extra_state"):
            continue
        if name not in weights:
            raise CheckpointError(f"{path} lacks {name}: it holds another model or layout than these flags give "
                                  "(--num-layers, --noop-layers, --mtp-num-layers, the parallel sizes)")
        if weights[name].shape != tensor.shape:
            raise CheckpointError(f"{path}: {name} is {tuple(weights[name].shape)}, this run's model has "
                                  f"{tuple(tensor.shape)}: it was written for another layout (compare "
                                  "--tensor-model-parallel-size / --expert-tensor-parallel-size / --moe-tp-extend-ep "
                                  "/ --mla-mm-split with the conversion's)")
    unused = sorted(k for k in _part(weights, part) if k not in own and not k.endswith("_extra_state"))
    if unused:
        raise CheckpointError(f"{path} holds {unused[0]} (and {len(unused) - 1} more) that this run's model lacks: "
                              "it holds another model or layout than these flags give")
    model.load_state_dict(_part(weights, part), strict=part == ALL)


def _load_legacy(directory: str, flag: str, model_chunks, optimizer, scheduler, finetune, load_optim, load_rng,
                 part: str, lora_model: bool) -> Resumed:
    path = _legacy_file(directory)
    if not os.path.isfile(path):
        fix = ("save the adapters as torch_dist, which any layout loads" if part == LORA
               else "convert it with `npu-dsv3 convert reshard`")
        raise CheckpointError(f"{flag} {directory}: {path} is missing: it was saved with another tensor / pipeline / "
                              f"expert parallel layout ({fix})")
    payload = load_torch(path, map_location="cpu")
    models = [payload.get("model" if len(model_chunks) == 1 else f"model{i}") or {} for i in range(len(model_chunks))]
    part = _stored_part(part, [k for weights in models for k in weights], directory, flag, lora_model)
    if part == BASE:  # a base under a LoRA model: weights only, and the run starts over
        finetune, load_optim, load_rng = True, False, False
    for chunk, weights in zip(model_chunks, models):
        _load_rank_weights(_unwrap(chunk), weights, path, part)
    if load_optim and payload.get("optimizer") is not None:
        _check_legacy_optimizer(optimizer, os.path.dirname(path))
        with _loading_torch_adam(optimizer):
            optimizer.load_state_dict(payload["optimizer"])
            if _is_distributed(optimizer):
                _load_param_state(optimizer, os.path.dirname(path))
    if scheduler is not None and not finetune and payload.get("opt_param_scheduler") is not None:
        scheduler.load_state_dict(payload["opt_param_scheduler"])
    if load_rng and payload.get("rng_state") is not None:
        _set_rng_state(payload["rng_state"])
    return _resumed(payload, finetune)
