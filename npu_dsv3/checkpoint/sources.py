"""What the checkpoint converters share, whatever format they write: their inputs and the last step.

- the tracker: which checkpoint directory of a megatron ``--load`` / ``--save`` root a reader opens;
- the megatron config a conversion builds from config.json (``model_config``);
- an HF checkpoint as a conversion's input (``HFInput``: tensors read with ``pread``, FP8 dequantised),
  the checks run before anything is written, and the HF names by which every input is read
  (``conversion_input``);
- the HF dtype record a megatron checkpoint keeps for the way back, and ``finish_output_dir``.
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from npu_dsv3.checkpoint.fp8 import fp8_block
from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.checkpoint.rank_state import effective_hf_config, hf_tensor_shapes, source_getter
from npu_dsv3.layout import converter_flag

RELEASE = "release"
TRACKER_FILE = "latest_checkpointed_iteration.txt"


def tracker_tag(root: str) -> Optional[str]:
    """What the tracker under ``root`` holds (an iteration, or ``release``); None without one."""
    tracker = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        return f.read().strip()


def tracked_dir(root: str) -> Optional[str]:
    """The checkpoint directory ``root``'s tracker names (``release`` or ``iter_XXXXXXX``), or None
    without a tracker."""
    tag = tracker_tag(root)
    if tag is None:
        return None
    return os.path.join(root, tag if tag == RELEASE else f"iter_{int(tag):07d}")


HF_EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                  "generation_config.json")


def target_flag(command: str):
    """How ``command`` names its target layout flags in messages (MindSpeed-LLM's names): reshard has two
    sides and prefixes every flag (``--target-num-layer-list``), hf2mcore only the parallel sizes."""
    return converter_flag("target", prefix_all=command == "convert reshard")


def model_config(hf_config: dict, grouped_gemm: bool, **overrides):
    from npu_dsv3.config import hf_to_mcore_config_dpskv3
    from npu_dsv3.lora.nf4_base import NF4_KEY, is_nf4_config

    if is_nf4_config(hf_config):  # a --qlora-nf4 checkpoint: its targetable linears are NF4 buffers
        overrides.setdefault("qlora", True)
    # The FP8 release is read directly (dequantised on the fly); the model is the same.
    hf_config = {k: v for k, v in hf_config.items() if k not in ("quantization_config", NF4_KEY)}
    return hf_to_mcore_config_dpskv3(hf_config, moe_grouped_gemm=grouped_gemm, **overrides)


def check_hf_source(hf_dir: str, hf_config: dict, mtp_layers: int = None) -> None:
    """The check every reader of an HF checkpoint runs before writing anything: each tensor's shape
    against ``hf_config`` (its config.json), the dtypes, missing and unexpected tensors, from the
    shards' headers alone (``HFCheckpointReader.check``). ``mtp_layers``: the MTP layers that must be
    there (default: all config.json declares; the others are checked if present)."""
    from npu_dsv3.checkpoint.hf_reader import HFCheckpointReader

    shapes, optional = hf_tensor_shapes(model_config(hf_config, True), mtp_layers)
    HFCheckpointReader(hf_dir).check(shapes, optional, fp8_block(hf_config))


def _bf16_getter(reader, hf_config: dict):
    """``get(name)`` that dequantises DeepSeek's block-FP8 weights as they are read (``LazyHFTensor`` read
    whole)."""
    block = fp8_block(hf_config)
    return lambda name: LazyHFTensor(reader, name, reader.meta(name), block).read()


def check_mtp_copies(config, get) -> None:
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


class _HFPreadReader:
    """HF tensors by name, read with ``pread`` into memory of their own.

    safetensors' ``get_tensor`` copies out of a memory map, and every page a map
    has touched stays in the process's resident set until the file is closed: a
    rank file's conversion would show RSS growing with the HF bytes it read (page
    cache the kernel can reclaim, but counted, and it competes with the writes).
    Read this way, a tensor's memory is freed when the tensor is. The
    ``HFCheckpointReader`` still owns the index and the one-line errors.
    """

    def __init__(self, hf_dir: str):
        from npu_dsv3.checkpoint.hf_reader import HFCheckpointReader

        self.reader = HFCheckpointReader(hf_dir)
        self._files: Dict[str, Tuple[int, dict]] = {}
        self.bytes_read = 0  # tensor bytes read so far

    def _entry(self, name: str):
        from npu_dsv3.checkpoint import io

        if name not in self.reader:
            self.reader.get(name)  # raises the reader's error naming the checkpoint
        filename = self.reader.weight_map[name]
        if filename not in self._files:
            self.reader._open(filename)  # the reader's one-line error for a missing or unreadable shard
            header, data_start = io.safetensors_header(os.path.join(self.reader.path, filename))
            self._files[filename] = (data_start, header)
        data_start, header = self._files[filename]
        return os.path.join(self.reader.path, filename), data_start, header[name]

    def meta(self, name: str) -> torch.Tensor:
        """A meta tensor of ``name``'s shape and dtype: nothing is read but the shard's header."""
        from npu_dsv3.checkpoint import writers

        _, _, info = self._entry(name)
        return torch.empty(info["shape"], dtype=writers.dtype_from_safetensors(info["dtype"]), device="meta")

    def get(self, name: str) -> torch.Tensor:
        _, _, info = self._entry(name)
        return self.region(name, [(0, n) for n in info["shape"]])

    def region(self, name: str, region: Sequence[Tuple[int, int]]) -> torch.Tensor:
        """``name[r0:r1, c0:c1]`` (``region``: (start, stop) per dimension), reading only its bytes: whole
        rows in one read, a band of columns row by row."""
        from npu_dsv3.checkpoint import writers

        path, data_start, info = self._entry(name)
        dtype, shape = writers.dtype_from_safetensors(info["dtype"]), info["shape"]
        size = torch.empty(0, dtype=dtype).element_size()
        begin, end = info["data_offsets"]
        row_bytes = size * (shape[1] if len(shape) == 2 else 1)
        (r0, r1), (c0, c1) = region[0] if region else (0, 1), region[1] if len(region) == 2 else (0, 1)
        out = torch.empty((r1 - r0) * (c1 - c0) * size if len(shape) == 2 else (r1 - r0) * size, dtype=torch.uint8)
        if len(shape) < 2 or (c0, c1) == (0, shape[1]):
            reads = [(data_start + begin + r0 * row_bytes, 0, out.numel())]
        else:
            width = (c1 - c0) * size
            reads = [(data_start + begin + r * row_bytes + c0 * size, i * width, width)
                     for i, r in enumerate(range(r0, r1))]
        with open(path, "rb", buffering=0) as f:
            view = memoryview(out.numpy())
            for offset, at, count in reads:
                done = 0
                while done < count and (n := os.preadv(f.fileno(), [view[at + done: at + count]], offset + done)):
                    done += n
                if done != count or offset + count > data_start + end:
                    raise CheckpointError(f"cannot read tensor {name} from {path}: the file is truncated")
        self.bytes_read += out.numel()
        return out.view(dtype).reshape([stop - start for start, stop in region])


def _hf_meta_getter(reader: _HFPreadReader):
    """``reader``'s tensors as meta tensors of the shape and dtype ``_bf16_getter`` returns
    (FP8 weights come out BF16)."""

    def get(name: str) -> torch.Tensor:
        tensor = reader.meta(name)
        return tensor.to(torch.bfloat16) if tensor.dtype == torch.float8_e4m3fn else tensor

    return get


class LazyHFTensor:
    """An HF tensor of a checkpoint not read yet: its shape and dtype, and slices (``narrow``, ``chunk``, also
    lazy), read -- only their own bytes -- when a torch function or a tensor method first needs them. The RL
    bridge loads through these: the converters' one mapping (``rank_state.chunk_state_dict``) cuts its tensor-,
    expert- and vocabulary-parallel slices with ``chunk`` / ``narrow``, so a rank reads its slices only. A
    slice of an FP8 release weight reads the 128x128 blocks it overlaps, and is dequantized."""

    def __init__(self, reader: "_HFPreadReader", name: str, meta: torch.Tensor, block, region=None):
        self._reader, self._name, self._meta, self._block = reader, name, meta, block
        self._region = list(region or [(0, n) for n in meta.shape])
        self._value: Optional[torch.Tensor] = None  # read once, however many methods use it

    @property
    def shape(self) -> torch.Size:
        return torch.Size(stop - start for start, stop in self._region)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self._meta.dtype == torch.float8_e4m3fn else self._meta.dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def dim(self) -> int:
        return len(self._region)

    def narrow(self, dim: int, start: int, length: int) -> "LazyHFTensor":
        dim %= self.dim()
        first, stop = self._region[dim]
        if start < 0 or length < 0 or first + start + length > stop:
            raise IndexError(f"{self._name}: narrow({dim}, {start}, {length}) outside {tuple(self.shape)}")
        region = list(self._region)
        region[dim] = (first + start, first + start + length)
        return LazyHFTensor(self._reader, self._name, self._meta, self._block, region)

    def chunk(self, chunks: int, dim: int = 0) -> List["LazyHFTensor"]:
        size = -(-self.shape[dim] // chunks)  # torch.chunk's
        return [self.narrow(dim, start, min(size, self.shape[dim] - start))
                for start in range(0, self.shape[dim], max(size, 1))]

    def read(self) -> torch.Tensor:
        if self._value is None:
            self._value = self._read()
        return self._value

    def _read(self) -> torch.Tensor:
        from npu_dsv3.checkpoint.fp8 import SCALE_SUFFIX, dequantize_fp8_block

        if self._meta.dtype != torch.float8_e4m3fn:
            return self._reader.region(self._name, self._region)
        # the blocks the slice overlaps, dequantized with their scales, then the slice of them
        blocks = [(start - start % b, min(-(-stop // b) * b, n))
                  for (start, stop), b, n in zip(self._region, self._block, self._meta.shape)]
        codes = self._reader.region(self._name, blocks)
        scale = self._reader.get(self._name + SCALE_SUFFIX)
        scale = scale[blocks[0][0] // self._block[0]: -(-blocks[0][1] // self._block[0]),
                      blocks[1][0] // self._block[1]: -(-blocks[1][1] // self._block[1])]
        weight = dequantize_fp8_block(codes, scale, self._block)
        return weight[tuple(slice(start - b0, stop - b0) for (start, stop), (b0, _) in zip(self._region, blocks))]

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.read(), attr)  # a tensor method: the slice read, then the method

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def real(value):
            if isinstance(value, LazyHFTensor):
                return value.read()
            if isinstance(value, (list, tuple)):
                return type(value)(real(v) for v in value)
            return value

        return func(*real(args), **{k: real(v) for k, v in (kwargs or {}).items()})


class HFInput:
    """A conversion's input that is an HF checkpoint (BF16, FP32 or DeepSeek's FP8 release, dequantised as
    it is read). The other inputs, with the same ``directory``, ``layout`` and ``getters``, are
    ``mcore_legacy.LegacyInput`` and ``mcore_dist.DistInput``; all are picklable (a conversion's workers
    get them)."""

    layout = None  # the layout flags a legacy checkpoint was written with; an HF one has none

    def __init__(self, directory: str, nf4: bool = False):
        self.directory = directory
        self.nf4 = nf4  # --qlora-nf4: write the targetable linears in NF4 (npu_dsv3.lora.nf4_base)

    def getters(self, hf_config: dict):
        """(get, meta_get): ``get(HF name)`` reads a tensor, ``meta_get`` its shape and dtype as a meta tensor."""
        return _bf16_getter(_HFPreadReader(self.directory), hf_config), _hf_meta_getter(_HFPreadReader(self.directory))

    def lazy_getter(self, hf_config: dict):
        """``get(HF name)`` -> a ``LazyHFTensor`` (nothing read until a slice of it is used), and the reader,
        whose ``bytes_read`` counts what the slices read."""
        reader, block = _HFPreadReader(self.directory), fp8_block(hf_config)
        return (lambda name: LazyHFTensor(reader, name, reader.meta(name), block)), reader


def conversion_configs(source, flags: dict) -> Tuple[dict, dict]:
    """(the source's config.json as its flags read it, config.json of the model a conversion writes
    with ``flags``: the model-size flags applied, see ``rank_state.effective_hf_config``)."""
    from npu_dsv3.config import load_hf_config

    source_hf = load_hf_config(source.directory)
    if source.layout is not None:
        source_hf = effective_hf_config(source_hf, source.layout, select_layers=False)
    hf_config = effective_hf_config(source_hf, flags)
    if isinstance(source, HFInput):
        check_hf_source(source.directory, source_hf, hf_config["num_nextn_predict_layers"])
        if source.nf4:
            from npu_dsv3.lora.nf4_base import NF4_KEY, NF4_RECORD

            hf_config = {**hf_config, NF4_KEY: NF4_RECORD}
    return source_hf, hf_config


def conversion_input(source, source_hf: dict, hf_config: dict):
    """(get, meta_get) of a conversion's input by the HF names of the model written; ``meta_get``
    gives shapes and dtypes as meta tensors without reading data. A megatron source gives each
    tensor the dtype its HF checkpoint had, where the converter recorded it (``DTYPES_FILE``)."""
    from npu_dsv3.lora.nf4_base import is_nf4_config, quantizing_getter, quantizing_meta_getter

    get, meta_get = source.getters(source_hf)
    if not isinstance(source, HFInput):
        get, meta_get = with_hf_dtypes(get, source.directory), with_hf_dtypes(meta_get, source.directory)
    get, meta_get = source_getter(get, source_hf, hf_config), source_getter(meta_get, source_hf, hf_config)
    if is_nf4_config(hf_config) and not is_nf4_config(source_hf):  # quantized as they are read
        get, meta_get = quantizing_getter(get), quantizing_meta_getter(meta_get)
    elif is_nf4_config(source_hf):  # NF4 to NF4 (another layout or format): the quantized tensors' shapes too
        from npu_dsv3.lora.nf4_base import quantized_meta

        meta_get = quantized_meta(meta_get, hf_tensor_shapes(model_config(hf_config, True))[0])
        if not isinstance(source, HFInput):
            meta_get = with_hf_dtypes(meta_get, source.directory)
    return get, meta_get


# The dtype of every HF tensor of the model a converter wrote, beside the megatron checkpoint: megatron
# keeps some tensors in another dtype (the expert bias in fp32), and the way back restores the HF one.
DTYPES_FILE = "hf_dtypes.json"


def record_hf_dtypes(meta_get, hf_config: dict, save_dir: str) -> None:
    """Writes ``save_dir``'s ``DTYPES_FILE`` from ``meta_get`` (the HF tensors written, as meta
    tensors): the most common dtype, and each tensor whose dtype differs from it."""
    from collections import Counter

    from npu_dsv3.checkpoint import io

    shapes, optional = hf_tensor_shapes(model_config(hf_config, True))
    dtypes = {name: str(meta_get(name).dtype).replace("torch.", "") for name in shapes if name not in optional}
    default = Counter(dtypes.values()).most_common(1)[0][0]
    io.atomic_write_json({"default": default, "tensors": {n: d for n, d in dtypes.items() if d != default}},
                         os.path.join(save_dir, DTYPES_FILE), sort_keys=True)


def with_hf_dtypes(get, root: str):
    """``get(name)`` giving each tensor the dtype ``root``'s ``DTYPES_FILE`` records for it; ``get``
    itself where the checkpoint the tracker names is not a converter's (``release``) or has no record."""
    import json

    path = os.path.join(root, DTYPES_FILE)
    if not os.path.isfile(path) or os.path.basename(tracked_dir(root) or "") != RELEASE:
        return get
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        default = getattr(torch, record["default"])
        dtypes = {name: getattr(torch, dtype) for name, dtype in record["tensors"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} is not a readable dtype record ({e}); delete it to keep megatron's "
                              "dtypes") from e

    from npu_dsv3.lora.nf4_base import is_nf4_buffer

    def cast(name: str) -> torch.Tensor:
        tensor = get(name)
        if is_nf4_buffer(name):  # NF4 codes and scales have their own dtypes
            return tensor
        return tensor.to(dtypes.get(name, default))

    return cast


class WithHFDtypes:
    """A ``names()`` / ``get(name)`` source (``HFFromRanks``, ``DistSource``) with ``with_hf_dtypes``' dtypes."""

    def __init__(self, source, root: str):
        self.source, self.get = source, with_hf_dtypes(source.get, root)

    def names(self) -> List[str]:
        return self.source.names()


def copy_hf_extras(source_dir: str, save_dir: str, manifest) -> None:
    """The tokenizer and generation files of ``source_dir`` into ``save_dir``, those ``manifest`` has not
    recorded yet (kept for the way back to HF)."""
    from npu_dsv3.checkpoint import io

    for extra in HF_EXTRA_FILES:
        if os.path.isfile(os.path.join(source_dir, extra)) and not manifest.done(extra):
            io.atomic_copy(os.path.join(source_dir, extra), os.path.join(save_dir, extra))
            manifest.record(extra)


def finish_output_dir(source_dir: str, save_dir: str, manifest, hf_config: dict, meta_get) -> None:
    """The last step of writing a megatron checkpoint (either format): tokenizer files, config.json,
    the HF dtype record and, last, the tracker naming ``release`` (a directory that has it is complete)."""
    from npu_dsv3.checkpoint import io

    copy_hf_extras(source_dir, save_dir, manifest)
    io.atomic_write_json({k: v for k, v in hf_config.items() if k != "quantization_config"},
                         os.path.join(save_dir, "config.json"))
    record_hf_dtypes(meta_get, hf_config, save_dir)
    with io.atomic_write(os.path.join(save_dir, TRACKER_FILE)) as tmp:
        with open(tmp, "w") as f:
            f.write(RELEASE)


def dequantized_sources(source, shapes, config, hf_config: dict, load_dir: str):
    """(source, shapes, config.json) of an HF export of the NF4 checkpoint ``load_dir`` (``convert mcore2hf``):
    its weights dequantized, which is lossy and said so."""
    import logging

    from npu_dsv3.lora.nf4_base import NF4_KEY, Dequantized

    logging.getLogger(__name__).warning(
        f"note: {load_dir} holds NF4 weights (--qlora-nf4); the HF weights written are them dequantized, which is "
        "lossy (16 levels per 64-value block, not the original weights)")
    hf_shapes = hf_tensor_shapes(config)[0]
    dtype = shapes.get("model.norm.weight").dtype  # the checkpoint's weights' (a converter's record may recast)
    return (Dequantized(source, hf_shapes, dtype), Dequantized(shapes, hf_shapes, dtype, meta=True),
            {k: v for k, v in hf_config.items() if k != NF4_KEY})
