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


def legacy_source(root: str, config, par: ParallelLayout) -> HFFromRanks:
    """HF tensors by name from a legacy checkpoint, rank files memory-mapped on first use."""
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

    return HFFromRanks(config, par, fetch, lambda *key: rank_file(root, par, *key))


def read_hf_tensors(root: str, config, par: ParallelLayout) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, tensor) of the whole model from a legacy checkpoint, in checkpoint order."""
    return legacy_source(root, config, par).hf_tensors()


# --------------------------------------------------------------------------- conversion jobs

MAX_SHARD_BYTES = 5 * 10**9
HF_EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                  "generation_config.json")


def _model_config(hf_config: dict, grouped_gemm: bool):
    from npu_dsv3.config import hf_to_mcore_config_dpskv3

    # The FP8 release is read directly (dequantised on the fly); the model is the same.
    hf_config = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    return hf_to_mcore_config_dpskv3(hf_config, moe_grouped_gemm=grouped_gemm)


def _bf16_getter(reader, hf_config: dict):
    """``get(name)`` that dequantises DeepSeek's block-FP8 weights as they are read."""
    from npu_dsv3.checkpoint.fp8 import SCALE_SUFFIX, dequantize_fp8_block

    block = tuple((hf_config.get("quantization_config") or {}).get("weight_block_size") or (128, 128))

    def get(name: str) -> torch.Tensor:
        tensor = reader.get(name)
        if tensor.dtype == torch.float8_e4m3fn:
            return dequantize_fp8_block(tensor, reader.get(name + SCALE_SUFFIX), block)
        return tensor

    return get


def _check_mtp_copies(config, get) -> None:
    """The MTP layer's embedding and head are stored again in HF checkpoints; megatron shares the
    main ones. Refuse copies that differ rather than drop them silently."""
    for depth in range(config.mtp_num_layers or 0):
        prefix = f"model.layers.{config.num_layers + depth}."
        for copy, main in (("embed_tokens.weight", "model.embed_tokens.weight"),
                           ("shared_head.head.weight", "lm_head.weight")):
            try:
                duplicate = get(prefix + copy)
            except CheckpointError:
                continue  # not stored: nothing to lose
            if config.tie_word_embeddings and main == "lm_head.weight":
                main = "model.embed_tokens.weight"
            if not torch.equal(duplicate, get(main)):
                raise CheckpointError(f"{prefix}{copy} differs from {main}; megatron's MTP shares the main "
                                      "tensor, so converting would lose it")


def _source_getter(source: tuple, hf_config: dict):
    """``get(HF name)`` for a conversion's input: ("hf", dir) or ("mcore", dir, layout flags)."""
    from npu_dsv3.checkpoint.hf_reader import HFCheckpointReader

    if source[0] == "hf":
        return _bf16_getter(HFCheckpointReader(source[1]), hf_config)
    _, load_dir, flags = source
    config = _model_config(hf_config, flags.get("moe_grouped_gemm", True))
    return legacy_source(load_dir, config, ParallelLayout.from_flags(config, **flags)).get


def _write_rank(job) -> dict:
    """One rank file (runs in a worker); returns its digest for the manifest."""
    from npu_dsv3.checkpoint import io

    source, save_dir, hf_config, flags, ranks = job
    config = _model_config(hf_config, flags.get("moe_grouped_gemm", True))
    par = ParallelLayout.from_flags(config, **flags)
    path = rank_file(save_dir, par, *ranks)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = rank_payload(config, par, _source_getter(source, hf_config), *ranks)
    with io.atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return io.file_digest(path)


def _write_layout(source: tuple, save_dir: str, flags: dict, command: str, workers: int, resume: bool,
                  progress: bool) -> dict:
    """Every rank file of the layout ``flags`` give, from ``source``; config.json, tokenizer
    files and, last, the tracker (a directory that has it is complete)."""
    import time

    from npu_dsv3.checkpoint import io
    from npu_dsv3.config import load_hf_config

    start = time.monotonic()
    source_dir = source[1]
    hf_config = load_hf_config(source_dir)
    config = _model_config(hf_config, flags.get("moe_grouped_gemm", True))
    par = ParallelLayout.from_flags(config, **flags)
    if source[0] == "hf":
        _check_mtp_copies(config, _source_getter(source, hf_config))
    job = {"command": command, "input": os.path.realpath(source_dir), "layout": flags}
    manifest = io.prepare_output_dir(save_dir, resume, job)
    rel = {ranks: os.path.relpath(rank_file(save_dir, par, *ranks), save_dir) for ranks in par.ranks()}
    todo = set(manifest.pending(list(rel.values()), workers))
    jobs = [(source, save_dir, hf_config, flags, ranks) for ranks, path in rel.items() if path in todo]
    with io.progress(None, command.split()[-1], enabled=progress) as bar:

        def finished(job, digest):
            manifest.record(rel[job[-1]], digest)
            bar.update(digest["size"])

        io.parallel_map(_write_rank, jobs, workers, on_result=finished,
                        label=lambda job: rank_file(save_dir, par, *job[-1]))
    for extra in HF_EXTRA_FILES:  # kept for the way back to HF
        if os.path.isfile(os.path.join(source_dir, extra)) and not manifest.done(extra):
            io.atomic_copy(os.path.join(source_dir, extra), os.path.join(save_dir, extra))
            manifest.record(extra)
    hf_out = {k: v for k, v in hf_config.items() if k != "quantization_config"}
    io.atomic_write_json(hf_out, os.path.join(save_dir, "config.json"))
    with io.atomic_write(os.path.join(save_dir, TRACKER_FILE)) as tmp:
        with open(tmp, "w") as f:
            f.write(RELEASE)
    return {"rank_files": len(rel), "written": len(jobs), "seconds": time.monotonic() - start}


def convert_hf_to_legacy(hf_dir: str, save_dir: str, flags: dict, workers: int = 1, resume: bool = False,
                         progress: bool = True) -> dict:
    """HF (BF16, FP32 or DeepSeek's FP8 release) -> legacy per-rank checkpoint in the layout ``flags`` give.

    Writes ``release/mp_rank_*/model_optim_rng.pt`` (one worker per rank file)
    and the HF ``config.json`` beside them (the model config for the way back).
    """
    return _write_layout(("hf", hf_dir), save_dir, flags, "convert hf2mcore", workers, resume, progress)


def reshard_legacy(load_dir: str, save_dir: str, source_flags: dict, target_flags: dict, workers: int = 1,
                   resume: bool = False, progress: bool = True) -> dict:
    """Legacy checkpoint in layout A -> layout B directly: each target rank file takes the
    pieces it needs from the memory-mapped source rank files, never a whole HF model."""
    return _write_layout(("mcore", load_dir, source_flags), save_dir, target_flags, "convert reshard", workers,
                         resume, progress)


def convert_legacy_to_hf(load_dir: str, save_dir: str, flags: dict, resume: bool = False, progress: bool = True,
                         max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Legacy per-rank checkpoint -> HF safetensors shards (<= ``max_shard_bytes``) + index + config.json.

    Tensors are rebuilt one at a time from memory-mapped rank files and flushed
    to a shard when it is full. Shard contents are deterministic, so ``resume``
    keeps intact finished shards. MTP's embedding and head copies are written
    as HF checkpoints store them.
    """
    import time

    from npu_dsv3.checkpoint import io
    from npu_dsv3.config import load_hf_config

    start = time.monotonic()
    hf_config = load_hf_config(load_dir)
    config = _model_config(hf_config, flags.get("moe_grouped_gemm", True))
    par = ParallelLayout.from_flags(config, **flags)
    manifest = io.prepare_output_dir(save_dir, resume, {"command": "convert mcore2hf",
                                                        "input": os.path.realpath(load_dir), "layout": flags})
    weight_map, shard, shard_bytes, total = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        if not manifest.done(name):
            io.atomic_save_safetensors({k: v.contiguous() for k, v in shard.items()}, os.path.join(save_dir, name),
                                       metadata={"format": "pt"})
            manifest.record(name)
        weight_map.update({k: name for k in shard})
        bar.update(shard_bytes)
        shard, shard_bytes = {}, 0

    source = legacy_source(load_dir, config, par)
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"

    def tensors():
        for name in source.names():
            yield name, source.get(name)
            if name.endswith("shared_head.norm.weight"):
                # HF checkpoints store the MTP layer's embedding and head again; own copies,
                # since safetensors refuses tensors that share memory.
                prefix = name[: -len("shared_head.norm.weight")]
                yield prefix + "embed_tokens.weight", source.get("model.embed_tokens.weight").clone()
                yield prefix + "shared_head.head.weight", source.get(head).clone()

    with io.progress(None, "mcore2hf", enabled=progress) as bar:
        for name, tensor in tensors():
            size = tensor.numel() * tensor.element_size()
            if shard and shard_bytes + size > max_shard_bytes:
                flush()
            shard[name] = tensor
            shard_bytes += size
            total += size
        if shard:
            flush()
    for extra in HF_EXTRA_FILES:
        if os.path.isfile(os.path.join(load_dir, extra)) and not manifest.done(extra):
            io.atomic_copy(os.path.join(load_dir, extra), os.path.join(save_dir, extra))
            manifest.record(extra)
    io.atomic_write_json(hf_config, os.path.join(save_dir, "config.json"))
    # The index last: a directory that has one has all its shards.
    io.atomic_write_json({"metadata": {"total_size": total}, "weight_map": weight_map},
                         os.path.join(save_dir, "model.safetensors.index.json"), sort_keys=True)
    return {"shards": len(set(weight_map.values())), "bytes": total, "seconds": time.monotonic() - start}
