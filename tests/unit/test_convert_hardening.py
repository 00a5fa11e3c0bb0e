"""`npu-dsv3 convert`: nothing silently wrong. Bad HF tensors, damaged rank files and non-FP8 input are
refused in one line before anything is written; dtypes survive a round trip; outputs are reproducible."""

import glob
import hashlib
import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import save_file

from npu_dsv3.checkpoint import mcore_dist, writers
from npu_dsv3.checkpoint.fp8 import SCALE_SUFFIX
from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.cli import main
from npu_dsv3.model import load_hf

from support.checkpoint_files import hf_tensors, release_like_hf_dir

BIAS = "model.layers.1.mlp.gate.e_score_correction_bias"
RANK = os.path.join("release", "mp_rank_00", "model_optim_rng.pt")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return release_like_hf_dir(str(tmp_path_factory.mktemp("hf")), seed=7)


def _variant(hf_dir, directory, tensors, config_change=None) -> str:
    """``hf_dir``'s config.json and tokenizer file with ``tensors`` as the weights."""
    os.makedirs(directory)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(os.path.join(hf_dir, "tokenizer_config.json"), directory)
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    (config_change or (lambda c: None))(config)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return str(directory)


def _hf2mcore(load, save, *flags) -> int:
    return main(["convert", "hf2mcore", "--load-dir", str(load), "--save-dir", str(save), "--no-progress", *flags])


def _mcore2hf(load, save, *flags) -> int:
    return main(["convert", "mcore2hf", "--load-dir", str(load), "--save-dir", str(save), "--no-progress", *flags])


def _one_line_error(capsys) -> str:
    """The error of the last command, which must be one line (notes and summaries may come before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower()]
    assert errors == lines[-1:] and lines[-1].startswith("npu-dsv3 convert: error:"), lines
    return lines[-1]


# --------------------------------------------------------------------------- HF tensors against config.json

FORMATS = [["--save-format", "torch"], ["--save-format", "torch", "--moe-grouped-gemm"],
           ["--save-format", "torch_dist"]]
FORMAT_IDS = ["legacy", "legacy-grouped-gemm", "torch_dist"]


@pytest.mark.parametrize("name", ["model.layers.1.self_attn.kv_a_layernorm.weight",
                                  "model.layers.2.mlp.experts.5.down_proj.weight"], ids=["replicated", "expert"])
@pytest.mark.parametrize("flags", FORMATS, ids=FORMAT_IDS)
def test_a_tensor_of_the_wrong_shape_is_refused_before_anything_is_written(hf_dir, tmp_path, capsys, name, flags):
    tensors = hf_tensors(hf_dir)
    expected = tuple(tensors[name].shape)
    tensors[name] = tensors[name][..., :-1].contiguous()
    bad = _variant(hf_dir, tmp_path / "hf", tensors)
    assert _hf2mcore(bad, tmp_path / "out", "--target-expert-parallel-size", "2", *flags) == 2
    err = _one_line_error(capsys)
    assert name in err and f"expected shape {expected}" in err and f"found {tuple(tensors[name].shape)}" in err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float8_e5m2])
def test_weights_that_are_not_floating_point_are_refused(hf_dir, tmp_path, capsys, dtype):
    tensors = hf_tensors(hf_dir)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(dtype)
    bad = _variant(hf_dir, tmp_path / "hf", tensors)
    assert _hf2mcore(bad, tmp_path / "out") == 2
    assert "model.norm.weight" in _one_line_error(capsys)


def test_missing_and_unexpected_tensors_are_refused(hf_dir, tmp_path, capsys):
    tensors = hf_tensors(hf_dir)
    del tensors["model.layers.3.mlp.experts.11.up_proj.weight"]
    assert _hf2mcore(_variant(hf_dir, tmp_path / "missing", tensors), tmp_path / "a") == 2
    assert "model.layers.3.mlp.experts.11.up_proj.weight is missing" in _one_line_error(capsys)
    tensors = hf_tensors(hf_dir)
    extra = "model.layers.3.mlp.experts.12.up_proj.weight"
    tensors[extra] = tensors["model.layers.3.mlp.experts.11.up_proj.weight"] + 1
    assert _hf2mcore(_variant(hf_dir, tmp_path / "extra", tensors), tmp_path / "b", "--save-format", "torch_dist") == 2
    assert extra in _one_line_error(capsys)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def _fp8(tensors, names):
    """``names`` as DeepSeek's release stores them: float8_e4m3fn and an fp32 scale per 128 x 128 block."""
    out = dict(tensors)
    for name in names:
        rows, cols = tensors[name].shape
        scale = tensors[name].float().abs().amax() / 448.0
        out[name] = (tensors[name].float() / scale).to(torch.float8_e4m3fn)
        out[name + SCALE_SUFFIX] = torch.full((-(-rows // 128), -(-cols // 128)), float(scale))
    return out


def _fp8_config(config):
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}


def test_fp8_weights_need_a_float32_scale_of_one_per_block(hf_dir, tmp_path, capsys):
    names = ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.2.mlp.experts.1.gate_proj.weight"]
    tensors = _fp8(hf_tensors(hf_dir), names)
    assert _hf2mcore(_variant(hf_dir, tmp_path / "good", tensors, _fp8_config), tmp_path / "ok") == 0
    scale = names[1] + SCALE_SUFFIX
    for case, value in [("shape", torch.ones(2, 1)), ("dtype", tensors[scale].bfloat16()), ("missing", None)]:
        bad = dict(tensors)
        if value is None:
            del bad[scale]
        else:
            bad[scale] = value
        assert _hf2mcore(_variant(hf_dir, tmp_path / case, bad, _fp8_config), tmp_path / f"out-{case}") == 2
        err = _one_line_error(capsys)
        assert scale in err and {"shape": "expected shape (1, 1)", "dtype": "float32", "missing": "no "}[case] in err
        assert not os.path.exists(tmp_path / f"out-{case}")


def test_load_hf_runs_the_same_check(hf_dir, tmp_path, world1):
    tensors = hf_tensors(hf_dir)
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"][:-1]
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.down_proj.weight .*expected shape \(72, 100\)"):
        load_hf(_variant(hf_dir, tmp_path / "hf", tensors))


# --------------------------------------------------------------------------- damaged rank files


def _flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x5A]))


def _largest_record(path):
    return max((r for r in writers.zip_records(path) if r.index >= 0), key=lambda r: r.size)


@pytest.fixture(scope="module")
def legacy_dir(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("legacy") / "ckpt"
    assert _hf2mcore(hf_dir, out, "--moe-grouped-gemm") == 0
    return out


@pytest.mark.parametrize("manifest", [True, False], ids=["with-manifest", "without-manifest"])
def test_a_damaged_tensor_record_is_refused_by_name(legacy_dir, tmp_path, capsys, manifest):
    damaged = tmp_path / "ckpt"
    shutil.copytree(legacy_dir, damaged)
    if not manifest:
        os.remove(damaged / ".npu_dsv3_manifest.json")
    record = _largest_record(damaged / RANK)
    _flip(damaged / RANK, record.data_offset + record.size // 2)
    assert _mcore2hf(damaged, tmp_path / "hf", "--moe-grouped-gemm") == 2
    err = _one_line_error(capsys)
    assert str(damaged / RANK) in err and f"record {record.name}" in err


def test_damaged_headers_and_pickle_are_refused(legacy_dir, tmp_path, capsys):
    header = tmp_path / "header"
    shutil.copytree(legacy_dir, header)
    _flip(header / RANK, _largest_record(header / RANK).local_crc_offset)  # only the manifest sees this
    assert _mcore2hf(header, tmp_path / "hf1", "--moe-grouped-gemm") == 2
    assert str(header / RANK) in _one_line_error(capsys)
    pickled = tmp_path / "pickle"
    shutil.copytree(legacy_dir, pickled)
    os.remove(pickled / ".npu_dsv3_manifest.json")
    pkl = next(r for r in writers.zip_records(pickled / RANK) if r.name.endswith("data.pkl"))
    _flip(pickled / RANK, pkl.data_offset + pkl.size - 2)  # the STOP opcode's neighbour: still a valid pickle
    assert _mcore2hf(pickled, tmp_path / "hf2", "--moe-grouped-gemm") == 2
    assert f"record {pkl.name}" in capsys.readouterr().err


def test_a_training_save_with_shared_storage_is_checked_and_read_exactly(hf_dir, legacy_dir, tmp_path, capsys):
    """As megatron's distributed optimizer saves them: every parameter a view of one buffer, written by torch.save."""
    saved = tmp_path / "ckpt"
    shutil.copytree(legacy_dir, saved)
    os.remove(saved / ".npu_dsv3_manifest.json")
    payload = torch.load(saved / RANK, weights_only=True)
    model = payload["model"]
    buffer = torch.cat([t.reshape(-1).float() for t in model.values()]).to(torch.bfloat16)
    start = 0
    for name, tensor in model.items():  # all bf16 but the expert bias, kept as it is
        if tensor.dtype == torch.bfloat16:
            model[name] = buffer[start:start + tensor.numel()].view(tensor.shape)
            model[name].copy_(tensor)
        start += tensor.numel()
    torch.save(payload, saved / RANK)
    assert _mcore2hf(saved, tmp_path / "hf", "--moe-grouped-gemm") == 0
    original, back = hf_tensors(hf_dir), hf_tensors(tmp_path / "hf")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    record = _largest_record(saved / RANK)
    _flip(saved / RANK, record.data_offset + record.size - 3)
    assert _mcore2hf(saved, tmp_path / "hf2", "--moe-grouped-gemm") == 2
    assert f"record {record.name}" in _one_line_error(capsys)


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("fmt", ["torch", "torch_dist"])
@pytest.mark.parametrize("mtp", [True, False], ids=["mtp", "no-mtp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_round_trip_keeps_every_dtype_and_value(hf_dir, tmp_path, fmt, mtp, dtype):
    tensors = {name: t.to(dtype) for name, t in hf_tensors(hf_dir).items()}
    tensors["model.layers.2.mlp.gate.e_score_correction_bias"] = tensors[BIAS].float().clone()  # mixed, as the release
    source = _variant(hf_dir, tmp_path / "hf", tensors)
    flags = [] if mtp else ["--mtp-num-layers", "0"]
    assert _hf2mcore(source, tmp_path / "mcore", "--save-format", fmt, *flags) == 0
    assert _mcore2hf(tmp_path / "mcore", tmp_path / "back") == 0
    back = hf_tensors(tmp_path / "back")
    expected = {k: v for k, v in tensors.items() if mtp or not k.startswith("model.layers.4.")}
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_reshard_carries_the_dtypes_on(hf_dir, tmp_path):
    tensors = {name: t.bfloat16() for name, t in hf_tensors(hf_dir).items()}
    source = _variant(hf_dir, tmp_path / "hf", tensors)
    assert _hf2mcore(source, tmp_path / "a", "--target-tensor-parallel-size", "2") == 0
    assert main(["convert", "reshard", "--load-dir", str(tmp_path / "a"), "--save-dir", str(tmp_path / "b"),
                 "--source-tensor-parallel-size", "2", "--target-expert-parallel-size", "2", "--no-progress"]) == 0
    assert _mcore2hf(tmp_path / "b", tmp_path / "back", "--source-expert-parallel-size", "2") == 0
    back = hf_tensors(tmp_path / "back")
    assert back[BIAS].dtype == torch.bfloat16 and torch.equal(back[BIAS], tensors[BIAS])


# --------------------------------------------------------------------------- fp8-to-bf16 on a non-FP8 checkpoint


def test_fp8_to_bf16_refuses_a_checkpoint_without_fp8_weights(hf_dir, tmp_path, capsys):
    assert main(["convert", "fp8-to-bf16", "--input-fp8-hf-path", hf_dir, "--output-bf16-hf-path",
                 str(tmp_path / "out"), "--no-progress"]) == 2
    assert "not an FP8 checkpoint" in _one_line_error(capsys)
    assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------- reproducible outputs


def _hashes(directory) -> dict:
    paths = glob.glob(os.path.join(directory, "**"), recursive=True, include_hidden=True)
    return {os.path.relpath(p, directory): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in paths if os.path.isfile(p)}


def test_legacy_and_hf_outputs_are_byte_identical_for_any_workers(hf_dir, tmp_path):
    layout = ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2", "--moe-grouped-gemm"]
    for workers in ("1", "2"):
        assert _hf2mcore(hf_dir, tmp_path / workers, "--workers", workers, *layout) == 0
    first, second = _hashes(tmp_path / "1"), _hashes(tmp_path / "2")
    assert len(first) > 4 and first == second
    source = [flag.replace("--target-", "--source-") for flag in layout]
    for out in ("hf-a", "hf-b"):
        assert _mcore2hf(tmp_path / "1", tmp_path / out, *source) == 0
    assert _hashes(tmp_path / "hf-a") == _hashes(tmp_path / "hf-b")


def test_torch_dist_output_differs_only_in_its_save_id(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(mcore_dist, "FILE_BYTES", 20_000)  # several .distcp files, written by two threads
    for workers in ("1", "2"):
        assert _hf2mcore(hf_dir, tmp_path / workers, "--workers", workers, "--save-format", "torch_dist") == 0
    first, second = _hashes(tmp_path / "1"), _hashes(tmp_path / "2")
    assert len(glob.glob(str(tmp_path / "1" / "release" / "*.distcp"))) > 2
    assert first.keys() == second.keys()
    metadata = os.path.join("release", ".metadata")
    assert {k for k in first if first[k] != second[k]} == {metadata}
    stored = []
    for workers in ("1", "2"):
        with open(tmp_path / workers / metadata, "rb") as f:
            stored.append(pickle.load(f))
    assert stored[0].storage_meta.save_id != stored[1].storage_meta.save_id
    for meta in stored:
        meta.storage_meta = None
    assert pickle.dumps(stored[0]) == pickle.dumps(stored[1])
