"""The streaming writers behind hf2mcore / reshard / mcore2hf: same bytes as the in-memory
reference, valid zip and safetensors files, digests from the written bytes, bounded memory."""

import os
import weakref
import zipfile
import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from npu_dsv3.checkpoint import io, writers
from npu_dsv3.checkpoint.mcore_legacy import convert_hf_to_legacy, convert_legacy_to_hf, rank_payload, rank_plan
from npu_dsv3.layout import ParallelLayout
from npu_dsv3.config import hf_to_mcore_config_dpskv3, load_hf_config
from npu_dsv3.tiny_model import cast_like_release, make_hf_model, save_hf

LAYOUTS = {
    "tp2-pp2-vpp-noop-grouped": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                     expert_model_parallel_size=2, num_layers_per_virtual_pipeline_stage=1,
                                     noop_layers="1,5", expert_tensor_parallel_size=1, moe_grouped_gemm=True),
    "tp2-etp2-per-expert": dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=2,
                                expert_model_parallel_size=3, moe_grouped_gemm=False),
    "dualpipev": dict(pipeline_model_parallel_size=2, schedules_method="dualpipev", noop_layers="2,5,6,7",
                      expert_model_parallel_size=2, moe_grouped_gemm=True),
    "tp2-ep2-tp-extend-ep-mla-mm-split": dict(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                                              moe_tp_extend_ep=True, mla_mm_split=True, moe_grouped_gemm=True),
}


def _hf(tmp_path_factory, layers: int):
    model = cast_like_release(make_hf_model(seed=3, num_hidden_layers=layers, first_k_dense_replace=1,
                                            num_attention_heads=4, num_key_value_heads=4), torch.bfloat16)
    path = save_hf(model, str(tmp_path_factory.mktemp(f"hf{layers}")), with_mtp=True)
    return path, load_file(os.path.join(path, "model.safetensors")), hf_to_mcore_config_dpskv3(load_hf_config(path))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return _hf(tmp_path_factory, 4)


def _meta(tensors):
    return lambda name: tensors[name].to("meta")


def _assert_same(a, b, where=""):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_streamed_rank_file_is_rank_payload_bit_for_bit(checkpoint, tmp_path, name):
    _, tensors, config = checkpoint
    par = ParallelLayout.from_flags(config, **LAYOUTS[name])
    for ranks in par.ranks():
        path = str(tmp_path / f"{ranks}.pt")
        skeleton, producers = rank_plan(config, par, _meta(tensors), tensors.__getitem__, *ranks)
        digest = writers.save_torch_streamed(skeleton, producers, path)
        expected = rank_payload(config, par, tensors.__getitem__, *ranks)
        _assert_same(torch.load(path, weights_only=True), expected)
        _assert_same(torch.load(path, weights_only=True, mmap=True), expected)
        with zipfile.ZipFile(path) as zf:  # CRCs are right: valid for any zip reader
            assert zf.testzip() is None
        assert digest == io.file_digest(path)


def test_streamed_writer_refuses_a_producer_of_the_wrong_size(tmp_path):
    skeleton = {"a": torch.empty(4, 3, device="meta")}
    with pytest.raises(ValueError, match="gave 44 of its 48 bytes"):
        writers.save_torch_streamed(skeleton, [lambda: iter([torch.zeros(11)])], str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="2 producers"):
        writers.save_torch_streamed(skeleton, [lambda: iter([]), lambda: iter([])], str(tmp_path / "y.pt"))


class _LiveBytes:
    """A getter that counts the bytes of the tensors it handed out that are still alive."""

    def __init__(self, tensors):
        self.tensors, self.live, self.peak = tensors, 0, 0

    def _free(self, size):
        self.live -= size

    def get(self, name):
        tensor = self.tensors[name].clone()
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(tensor, self._free, size)
        return tensor


def test_memory_of_a_streamed_rank_file_does_not_grow_with_its_layers(tmp_path_factory, tmp_path):
    peaks, sizes = [], []
    for layers in (2, 12):
        _, tensors, config = _hf(tmp_path_factory, layers)
        par = ParallelLayout.from_flags(config, expert_model_parallel_size=1)
        live = _LiveBytes(tensors)
        skeleton, producers = rank_plan(config, par, _meta(tensors), live.get, 0, 0, 0)
        path = str(tmp_path / f"{layers}.pt")
        writers.save_torch_streamed(skeleton, producers, path)
        assert live.live == 0
        peaks.append(live.peak)
        sizes.append(os.path.getsize(path))
        largest = max(t.numel() * t.element_size() for t in tensors.values())
        # Two HF tensors at most (gate and up of one expert; a layer's q_b_proj is read per part).
        assert live.peak <= 2 * largest, (live.peak, largest)
    assert sizes[1] > 3 * sizes[0] and sizes[1] > 8 * peaks[1]  # the file grew, the memory did not
    assert peaks[1] == peaks[0]


def test_header_first_safetensors_equals_save_file(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "w": torch.randn(37, 11).bfloat16(), "bias": torch.randn(5), "ids": torch.arange(7),
        "mask": torch.rand(3, 3) > 0.5, "fp8": torch.randn(4, 8).to(torch.float8_e4m3fn),
        "scalar": torch.tensor(2.5, dtype=torch.float64), "empty": torch.zeros(0, 4, dtype=torch.float16),
        "view": torch.randn(6, 10)[:, 2:5],
    }
    plan = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    path = str(tmp_path / "streamed.safetensors")
    seen = []
    digest = writers.save_safetensors_streamed(plan, iter(tensors.values()), path, metadata={"format": "pt"},
                                               on_tensor=seen.append)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "reference.safetensors"))
    reference = load_file(str(tmp_path / "reference.safetensors"))
    streamed = load_file(path)
    assert streamed.keys() == reference.keys()
    assert all(streamed[k].dtype == reference[k].dtype and torch.equal(streamed[k], reference[k]) for k in streamed)
    assert io.safetensors_header(path)[0]["__metadata__"] == {"format": "pt"}
    assert sum(seen) == io.safetensors_nbytes(path) and digest == io.file_digest(path)
    with pytest.raises(ValueError, match="planned as"):
        writers.save_safetensors_streamed(plan[:1], iter([torch.zeros(2)]), str(tmp_path / "bad.safetensors"))


def test_crc32_combine_is_zlibs():
    a, b = os.urandom(1000), os.urandom(123457)
    assert io.crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
    assert io.crc32_combine(zlib.crc32(a), zlib.crc32(b""), 0) == zlib.crc32(a)


def test_resume_detects_truncated_and_altered_outputs(checkpoint, tmp_path):
    hf_dir, tensors, _ = checkpoint
    flags = dict(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1,
                 moe_grouped_gemm=True)
    mcore, hf_back = str(tmp_path / "mcore"), str(tmp_path / "hf")
    convert_hf_to_legacy(hf_dir, mcore, flags, progress=False)
    files = sorted(os.path.relpath(os.path.join(d, n), mcore) for d, _, names in os.walk(mcore) for n in names
                   if n.endswith(".pt"))
    with open(os.path.join(mcore, files[0]), "r+b") as f:
        f.truncate(os.path.getsize(f.name) - 1)
    with open(os.path.join(mcore, files[1]), "r+b") as f:  # same size, one byte changed
        f.seek(os.path.getsize(f.name) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    assert io.Manifest(mcore).pending(files) == files[:2]
    convert_hf_to_legacy(hf_dir, mcore, flags, resume=True, progress=False)
    assert io.Manifest(mcore).pending(files) == []

    convert_legacy_to_hf(mcore, hf_back, {**flags, "moe_grouped_gemm": True}, progress=False,
                         max_shard_bytes=200_000)
    shards = sorted(n for n in os.listdir(hf_back) if n.endswith(".safetensors"))
    assert len(shards) > 2
    with open(os.path.join(hf_back, shards[1]), "r+b") as f:
        f.truncate(100)
    untouched = {n: os.stat(os.path.join(hf_back, n)).st_mtime_ns for n in shards if n != shards[1]}
    convert_legacy_to_hf(mcore, hf_back, {**flags, "moe_grouped_gemm": True}, resume=True, progress=False,
                         max_shard_bytes=200_000)
    assert all(os.stat(os.path.join(hf_back, n)).st_mtime_ns == t for n, t in untouched.items())
    back = {}
    for shard in shards:
        back.update(load_file(os.path.join(hf_back, shard)))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in back)
