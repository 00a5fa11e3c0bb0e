"""HF <-> megatron's legacy per-rank checkpoint (``mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt``).

The layout MindSpeed-LLM users load with ``--load``: one file per (tensor,
pipeline, expert) rank, each holding that rank's model chunks (``model`` or
``model0``, ``model1``, ... with virtual pipeline stages) under megatron's local
names (``decoder.layers.{i}`` counts from 0 in each chunk, noop layers included).
Each rank file is built from the HF tensors it needs and written on its own,
so memory stays at about one rank file; reading maps files (``mmap``) and
rebuilds one HF tensor at a time.
"""

import os
from typing import Dict, Iterator, Tuple

import torch

from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.checkpoint.rank_state import HFFromRanks, ParallelLayout, chunk_state_dict

TRACKER_FILE = "latest_checkpointed_iteration.txt"
RELEASE = "release"
MODEL_FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    # torch.save writes a view's whole storage: every saved tensor gets its own.
    return tensor.contiguous().clone()


def rank_file(root: str, par: ParallelLayout, tp_rank: int, pp_rank: int, ep_rank: int) -> str:
    return os.path.join(root, RELEASE, par.rank_dir(tp_rank, pp_rank, ep_rank), MODEL_FILE)


def rank_payload(config, par, get, tp_rank, pp_rank, ep_rank) -> dict:
    payload = {"checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
    for chunk in range(par.pipeline.num_chunks):
        sd = chunk_state_dict(config, par, get, tp_rank, pp_rank, ep_rank, chunk)
        payload[par.chunk_key(chunk)] = {k: _owned(v) for k, v in sd.items()}
    return payload


def load_rank(root: str, par: ParallelLayout, tp_rank: int, pp_rank: int, ep_rank: int) -> dict:
    path = rank_file(root, par, tp_rank, pp_rank, ep_rank)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: the checkpoint does not have the layout the --source-* flags describe")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"cannot read {path} ({e})") from e


def read_hf_tensors(root: str, config, par: ParallelLayout) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the whole model from a legacy checkpoint, rank files memory-mapped."""
    cache: Dict[Tuple[int, int, int], dict] = {}

    def fetch(tp_rank, pp_rank, ep_rank, chunk):
        key = (tp_rank, pp_rank, ep_rank)
        if key not in cache:
            cache[key] = load_rank(root, par, *key)
        name = par.chunk_key(chunk)
        if name not in cache[key]:
            raise CheckpointError(f"{rank_file(root, par, *key)} has no '{name}': check "
                                  "--source-pipeline-parallel-size / --num-layers-per-virtual-pipeline-stage")
        return cache[key][name]

    return HFFromRanks(config, par, fetch, lambda *key: rank_file(root, par, *key), cache.clear).hf_tensors()
