"""`npu-dsv3 convert fp8-to-bf16` and the streaming I/O under it.

The oracle is the block formula written out in a plain loop over 128x128 blocks
(fp32 product, then bf16), on a small hand-made FP8 checkpoint shaped like
DeepSeek's release: several shards with an index, ragged edge blocks, a scale
stored in another shard than its weight, tensors that must pass untouched, and
the non-weight files of an HF repository.
"""

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from npu_dsv3 import cli
from npu_dsv3.checkpoint import fp8, io
from npu_dsv3.checkpoint.fp8 import convert_fp8_to_bf16, dequantize_fp8_block
from npu_dsv3.checkpoint.hf_reader import CheckpointError

import support

FIXTURES = str(support.FIXTURES)
SHARDS = ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"]
Q_PROJ = "model.layers.0.self_attn.q_a_proj.weight"
GATE = "model.layers.0.mlp.gate_proj.weight"
UP = "model.layers.0.mlp.up_proj.weight"
DOWN = "model.layers.0.mlp.down_proj.weight"  # its scale lives in shard 2
NORM = "model.layers.0.input_layernorm.weight"
BIAS = "model.layers.0.mlp.gate.e_score_correction_bias"
OTHER_FILES = {"tokenizer.json": b'{"version": "1.0"}', "tokenizer_config.json": b'{"bos_token": "<s>"}\n',
               "generation_config.json": b'{"do_sample": true}', "modeling_deepseek.py": b"# model code\n",
               "figures/benchmark.png": bytes(range(256)) * 3}


def _fp8(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    # Spread over e4m3's range, finite (448 is its largest value).
    return (torch.randn(rows, cols, generator=g) * 60).clamp(-448, 448).to(torch.float8_e4m3fn)


def _scale(weight, seed, block=128):
    g = torch.Generator().manual_seed(seed)
    shape = (-(-weight.shape[0] // block), -(-weight.shape[1] // block))
    return torch.rand(shape, generator=g) * 2.0 ** torch.randint(-12, -2, shape, generator=g).float() + 1e-6


def make_fp8_checkpoint(path, drop_scale=None, scale_shape=None):
    """A 3-shard FP8 checkpoint in ``path``; returns {name: tensor} as written."""
    q, gate, up, down = _fp8(300, 200, 1), _fp8(256, 130, 2), _fp8(129, 257, 3), _fp8(130, 300, 4)
    shards = [
        {"model.embed_tokens.weight": torch.randn(50, 24).to(torch.bfloat16), Q_PROJ: q,
         Q_PROJ + "_scale_inv": _scale(q, 11), NORM: (torch.rand(24) + 0.5).to(torch.bfloat16)},
        {GATE: gate, GATE + "_scale_inv": _scale(gate, 12), UP: up, UP + "_scale_inv": _scale(up, 13),
         BIAS: torch.randn(8) * 0.1, DOWN + "_scale_inv": _scale(down, 14)},
        {DOWN: down, "lm_head.weight": torch.randn(50, 24).to(torch.bfloat16)},
    ]
    if scale_shape is not None:
        shards[0][Q_PROJ + "_scale_inv"] = torch.ones(scale_shape)
    os.makedirs(path, exist_ok=True)
    weight_map, written = {}, {}
    for filename, tensors in zip(SHARDS, shards):
        tensors = {k: v for k, v in tensors.items() if k != drop_scale}
        save_file(tensors, os.path.join(path, filename), metadata={"format": "pt"})
        weight_map.update({name: filename for name in tensors})
        written.update(tensors)
    total = sum(t.numel() * t.element_size() for t in written.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    shutil.copyfile(os.path.join(FIXTURES, "deepseek_v3_config.json"), os.path.join(path, "config.json"))
    for rel, data in OTHER_FILES.items():
        os.makedirs(os.path.dirname(os.path.join(path, rel)), exist_ok=True)
        with open(os.path.join(path, rel), "wb") as f:
            f.write(data)
    return written


def reference_dequant(weight, scale, block=128):
    """The formula, one block at a time."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            rows, cols = slice(bi * block, (bi + 1) * block), slice(bj * block, (bj + 1) * block)
            out[rows, cols] = weight[rows, cols].to(torch.float32) * scale[bi, bj].item()
    return out.to(torch.bfloat16)


def bit_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


def read_dir(path):
    """{relpath: bytes} of every file under path."""
    files = {}
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                files[os.path.relpath(full, path)] = f.read()
    return files


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("fp8"))
    return path, make_fp8_checkpoint(path)


@pytest.fixture(scope="module")
def clean_run(fp8_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bf16") / "out")
    summary = convert_fp8_to_bf16(fp8_dir[0], out, workers=1, progress=False)
    return out, summary


# --------------------------------------------------------------------------- dequantization


@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (1, 1), (129, 257), (256, 130)])
def test_dequantize_is_the_block_formula_bit_exactly(shape):
    weight = _fp8(*shape, seed=shape[0])
    scale = _scale(weight, seed=shape[1])
    assert bit_equal(dequantize_fp8_block(weight, scale), reference_dequant(weight, scale))


def _bit_equal_nan(a, b):
    """Bit-exact, except that NaN compares by position: fp32 -> bf16 casts are free in
    which NaN they produce (torch's vector and scalar paths differ)."""
    nan = torch.isnan(a)
    return torch.equal(nan, torch.isnan(b)) and bit_equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


def test_dequantize_every_byte_value_in_every_block():
    """All 256 patterns (NaN 0x7f/0xff, -0, subnormals 0x01..0x07, +-448) under scales that make
    products overflow to inf, underflow to bf16 subnormals and zero, and round to even."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(300 * 3)[: 300 * 700].view(300, 700)
    weight = codes.view(torch.float8_e4m3fn)
    scale = torch.tensor([[2.0 ** 126, 1.0, 2.0 ** -130, 3.0 ** -5, 1e-45, 7.0 / 3.0],
                          [-0.0, 0.1, 2.0 ** -140, 1.0 + 2.0 ** -9, float("inf"), 1e30],
                          [-2.5, 1.0 / 448.0, 2.0 ** -120, 65504.0, 1e-38, float("nan")]])
    out, expected = dequantize_fp8_block(weight, scale), reference_dequant(weight, scale)
    assert _bit_equal_nan(out, expected)
    assert torch.isinf(out).any() and torch.isnan(out).any() and (out.view(torch.int16) == -32768).any()


@pytest.mark.parametrize("shape,block", [((1, 300), 128), ((257, 1), 128), ((385, 129), 128), ((70, 50), (32, 16)),
                                         ((0, 5), 128), ((3, 0), 128)])
def test_dequantize_ragged_edges_and_other_blocks(shape, block):
    weight = _fp8(*shape, seed=7)
    rows, cols = (block, block) if isinstance(block, int) else block
    g = torch.Generator().manual_seed(8)
    scale = torch.rand(-(-shape[0] // rows), -(-shape[1] // cols), generator=g) * 1e-3
    expected = torch.empty(shape)
    for i in range(shape[0]):  # the formula, element by element
        for j in range(shape[1]):
            expected[i, j] = weight[i, j].float() * scale[i // rows, j // cols]
    assert bit_equal(dequantize_fp8_block(weight, scale, block), expected.to(torch.bfloat16))


def test_dequantize_writes_into_out_and_reads_views():
    weight = _fp8(300, 400, 9)[:, 100:]  # not contiguous
    scale = _scale(weight, 10)
    out = torch.full((300, 300), 5.0, dtype=torch.bfloat16)
    assert dequantize_fp8_block(weight, scale, out=out) is out
    assert bit_equal(out, reference_dequant(weight, scale))


def test_dequantize_rejects_a_scale_of_the_wrong_shape():
    weight = _fp8(300, 200, 0)
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        dequantize_fp8_block(weight, torch.ones(2, 2))


@pytest.mark.parametrize("shape,block", [((300, 200), 128), ((130, 7), 128), ((1, 129), 128), ((70, 50), (32, 16))])
def test_quantize_reverses_dequantize_where_nothing_rounds(shape, block):
    """Codes whose block maximum is 448 with power-of-two scales (DeepSeek's UE8M0-style scales) dequantize to bf16
    exactly, so re-quantizing gives the same codes and scales; edge blocks ragged."""
    rows, cols = (block, block) if isinstance(block, int) else block
    grid = (-(-shape[0] // rows), -(-shape[1] // cols))
    codes = _fp8(*shape, seed=11).float().clamp(-440, 440)
    for i in range(grid[0]):  # each block's largest magnitude is 448, with either sign
        codes[i * rows, ::cols] = 448.0 * (-1) ** i
    codes = codes.to(torch.float8_e4m3fn)
    scale = 2.0 ** torch.randint(-20, -2, grid, generator=torch.Generator().manual_seed(12)).float()
    again, again_scale = fp8.quantize_fp8_block(dequantize_fp8_block(codes, scale, block), block)
    assert torch.equal(again.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(again_scale, scale)


def test_quantize_is_within_e4m3_rounding_and_never_nan():
    g = torch.Generator().manual_seed(13)
    weight = torch.randn(260, 300, generator=g) * torch.logspace(-6, 2, 300)  # columns of every magnitude
    weight[:128, :128] = 0  # an all-zero block: scale 1, codes 0
    codes, scale = fp8.quantize_fp8_block(weight.to(torch.bfloat16))
    assert scale[0, 0] == 1 and not codes[:128, :128].float().any() and not codes.float().isnan().any()
    back = dequantize_fp8_block(codes, scale).float()
    blocks = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:260, :300]
    # e4m3: 3 mantissa bits (relative 2^-4), subnormals below 2^-6 (absolute 2^-10 of the scale); plus bf16's
    assert ((back - weight).abs() <= weight.abs() * (2 ** -4 + 2 ** -7) + blocks * 2 ** -10).all()
    assert (codes.float().abs().amax() == 448)


def test_the_release_fp8_names():
    """The tensors DeepSeek-V3's FP8 release stores in FP8 (those with a weight_scale_inv in its index)."""
    fp8_names = ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.0.self_attn.kv_b_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.3.mlp.experts.255.up_proj.weight", "model.layers.3.mlp.shared_experts.gate_proj.weight",
                 "model.layers.61.self_attn.o_proj.weight", "model.layers.61.mlp.experts.0.gate_proj.weight"]
    kept = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.3.mlp.gate.weight",
            "model.layers.0.self_attn.q_a_layernorm.weight", "model.layers.61.eh_proj.weight",
            "model.layers.61.shared_head.head.weight", "model.layers.61.enorm.weight"]
    assert all(fp8.is_release_fp8(n, (8, 8)) for n in fp8_names)
    assert not any(fp8.is_release_fp8(n, (8, 8)) for n in kept)
    assert not fp8.is_release_fp8("model.layers.3.mlp.gate.e_score_correction_bias", (8,))


# --------------------------------------------------------------------------- the converted checkpoint


def test_weights_are_dequantized_and_the_rest_passes_unchanged(fp8_dir, clean_run):
    src, written = fp8_dir
    out, summary = clean_run
    assert summary["converted"] == 3 and summary["skipped"] == 0
    converted = {}
    for filename in SHARDS:
        with safe_open(os.path.join(out, filename), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
        converted.update({name: (filename, t) for name, t in load_file(os.path.join(out, filename)).items()})
    expected_names = {n for n in written if not n.endswith("_scale_inv")}
    assert set(converted) == expected_names
    for name in (Q_PROJ, GATE, UP, DOWN):
        assert bit_equal(converted[name][1], reference_dequant(written[name], written[name + "_scale_inv"])), name
    for name in ("model.embed_tokens.weight", NORM, BIAS, "lm_head.weight"):  # bf16 and fp32, as stored
        tensor = converted[name][1]
        assert tensor.dtype == written[name].dtype and torch.equal(tensor, written[name]), name
    assert converted[DOWN][0] == SHARDS[2]  # a weight stays in its shard, wherever its scale was
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(os.path.join(out, SHARDS[0])).st_mode) == 0o666 & ~umask  # not safetensors' 0600

    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert index["weight_map"] == {name: file for name, (file, _t) in converted.items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for _f, t in converted.values())


def test_config_loses_quantization_and_other_files_are_identical(fp8_dir, clean_run):
    src, out = fp8_dir[0], clean_run[0]
    with open(os.path.join(src, "config.json")) as f:
        original = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    original.pop("quantization_config")
    assert config == original
    for rel, data in OTHER_FILES.items():
        with open(os.path.join(out, rel), "rb") as f:
            assert f.read() == data, rel
    assert not [n for n in os.listdir(out) if n.endswith(io.TEMP_SUFFIX)]

    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(out)
    assert hf_config.model_type == "deepseek_v3" and hf_config.hidden_size == 7168
    assert getattr(hf_config, "quantization_config", None) is None

    from npu_dsv3.config import hf_to_mcore_config_dpskv3, load_hf_config

    hf_to_mcore_config_dpskv3(load_hf_config(os.path.join(out, "config.json")))  # the FP8 config is refused


def test_manifest_digests_computed_while_writing_match_the_files(clean_run):
    out = clean_run[0]
    files = io.Manifest(out).files
    assert set(SHARDS) <= set(files)
    assert {rel: io.file_digest(os.path.join(out, rel)) for rel in files} == files


def test_two_workers_write_the_same_bytes(fp8_dir, clean_run, tmp_path):
    out = str(tmp_path / "out")
    convert_fp8_to_bf16(fp8_dir[0], out, workers=2, progress=False)
    assert read_dir(out) == read_dir(clean_run[0])


def test_a_single_file_checkpoint_stays_single_file(tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    weight = _fp8(130, 129, 5)
    scale = _scale(weight, 15)
    save_file({"w": weight, "w_scale_inv": scale, "n": torch.ones(3)}, str(src / "model.safetensors"))
    convert_fp8_to_bf16(str(src), str(out), progress=False)
    assert sorted(os.listdir(out)) == sorted([io.MANIFEST_FILE, "model.safetensors"])
    converted = load_file(str(out / "model.safetensors"))
    assert set(converted) == {"w", "n"} and bit_equal(converted["w"], reference_dequant(weight, scale))


# --------------------------------------------------------------------------- resume


def test_resume_redoes_only_missing_or_damaged_files(fp8_dir, clean_run, tmp_path):
    out = str(tmp_path / "out")
    convert_fp8_to_bf16(fp8_dir[0], out, progress=False)
    os.remove(os.path.join(out, SHARDS[0]))
    with open(os.path.join(out, SHARDS[1]), "r+b") as f:
        f.truncate(1000)
    untouched = {rel: os.stat(os.path.join(out, rel)).st_mtime_ns for rel in read_dir(out)
                 if rel not in SHARDS[:2] and rel != io.MANIFEST_FILE}

    summary = convert_fp8_to_bf16(fp8_dir[0], out, resume=True, progress=False)

    assert (summary["converted"], summary["skipped"]) == (2, 1)
    assert {rel: os.stat(os.path.join(out, rel)).st_mtime_ns for rel in untouched} == untouched
    assert read_dir(out) == read_dir(clean_run[0])


def test_a_non_empty_output_needs_resume(fp8_dir, clean_run, tmp_path):
    with pytest.raises(ValueError, match="--resume"):
        convert_fp8_to_bf16(fp8_dir[0], clean_run[0], progress=False)
    (tmp_path / "empty").mkdir()
    convert_fp8_to_bf16(fp8_dir[0], str(tmp_path / "empty"), progress=False)  # an empty dir is fine
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not written by this tool"):
        convert_fp8_to_bf16(fp8_dir[0], str(tmp_path / "other"), resume=True, progress=False)


def test_manifest_notices_same_size_corruption(tmp_path):
    manifest = io.Manifest(str(tmp_path))
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    manifest.record("a.bin")
    assert io.Manifest(str(tmp_path)).done("a.bin")
    (tmp_path / "a.bin").write_bytes(b"y" + b"x" * 99)
    reloaded = io.Manifest(str(tmp_path))
    assert not reloaded.done("a.bin")
    assert "a.bin" not in io.Manifest(str(tmp_path)).files  # forgotten on disk too


# --------------------------------------------------------------------------- bad input


def test_missing_input_or_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_fp8_to_bf16(str(tmp_path / "nope"), str(tmp_path / "out"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        convert_fp8_to_bf16(str(tmp_path / "empty"), str(tmp_path / "out"), progress=False)


def test_missing_scale_names_the_tensor(tmp_path):
    make_fp8_checkpoint(str(tmp_path / "in"), drop_scale=GATE + "_scale_inv")
    with pytest.raises(CheckpointError, match=f"{GATE} in .*{SHARDS[1]} is float8_e4m3fn but .* no {GATE}_scale_inv"):
        convert_fp8_to_bf16(str(tmp_path / "in"), str(tmp_path / "out"), progress=False)


def test_wrong_scale_shape_names_the_tensor(tmp_path):
    make_fp8_checkpoint(str(tmp_path / "in"), scale_shape=(2, 2))
    with pytest.raises(CheckpointError, match=f"{Q_PROJ} in .*{SHARDS[0]}: scale shape \\(2, 2\\)"):
        convert_fp8_to_bf16(str(tmp_path / "in"), str(tmp_path / "out"), progress=False)


def _assert_only_finished(out, finished):
    assert sorted(n for n in os.listdir(out) if n != io.MANIFEST_FILE) == sorted(finished)
    assert sorted(io.Manifest(out).files) == sorted(finished)


def test_corrupt_shard_names_the_file_and_leaves_only_finished_outputs(tmp_path):
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    make_fp8_checkpoint(src)
    with open(os.path.join(src, SHARDS[2]), "r+b") as f:  # processed after two good shards
        f.truncate(os.path.getsize(os.path.join(src, SHARDS[2])) - 10)
    with pytest.raises(CheckpointError, match=SHARDS[2]):
        convert_fp8_to_bf16(src, out, progress=False)
    _assert_only_finished(out, SHARDS[:2])


@pytest.mark.parametrize("content", [b"\x01\x00", b"\x05\x00\x00\x00\x00\x00\x00\x00{oops",
                                     b"\x40\x00\x00\x00\x00\x00\x00\x00" + b'{"w":{"dtype":"F32","shape":[4],'
                                     b'"data_offsets":[0,8]}}'.ljust(64) + bytes(8)])
def test_an_unreadable_shard_header_names_the_file(tmp_path, content):
    src = str(tmp_path / "in")
    make_fp8_checkpoint(src)
    with open(os.path.join(src, SHARDS[0]), "wb") as f:
        f.write(content)
    with pytest.raises(CheckpointError, match=f"{SHARDS[0]} is not a readable safetensors file"):
        convert_fp8_to_bf16(src, str(tmp_path / "out"), progress=False)


def test_failure_midway_through_a_shard_leaves_no_partial_file(tmp_path, monkeypatch):
    src, out = str(tmp_path / "in"), str(tmp_path / "out")
    make_fp8_checkpoint(src)
    calls = []
    real = fp8.dequantize_fp8_block

    def failing(*args, **kwargs):  # the 3rd FP8 weight is shard 2's second one
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(fp8, "dequantize_fp8_block", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert_fp8_to_bf16(src, out, progress=False)
    _assert_only_finished(out, SHARDS[:1])


def test_failure_while_writing_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError):
        with io.atomic_write(str(target)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half of the new")
            raise OSError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.bin"]
    io.atomic_save_safetensors({"x": torch.ones(3)}, str(target))
    assert torch.equal(load_file(str(target))["x"], torch.ones(3))


# --------------------------------------------------------------------------- parallel map


def _square_or_fail(x):
    if x == 3:
        raise ValueError("three is not allowed")
    return x * x


@pytest.mark.parametrize("workers", [1, 2])
def test_parallel_map_keeps_order_and_names_the_failing_item(workers):
    seen = []
    results = io.parallel_map(_square_or_fail, [5, 1, 4, 2], workers, on_result=lambda i, r: seen.append(i))
    assert results == [25, 1, 16, 4]
    assert sorted(seen) == [1, 2, 4, 5]
    with pytest.raises(ValueError, match="item-3: three is not allowed"):
        io.parallel_map(_square_or_fail, [1, 3, 2], workers, label=lambda x: f"item-{x}")


def _die(x):
    os._exit(9)  # what the kernel's OOM killer does to a worker


def test_parallel_map_reports_a_dead_worker():
    with pytest.raises(RuntimeError, match="worker process died .* fewer --workers"):
        io.parallel_map(_die, [1, 2], workers=2)


# --------------------------------------------------------------------------- command line


def test_cli_converts_and_shows_progress(fp8_dir, clean_run, tmp_path):
    out = str(tmp_path / "out")
    result = subprocess.run([sys.executable, "-m", "npu_dsv3", "convert", "fp8-to-bf16", "--input-fp8-hf-path",
                             fp8_dir[0], "--output-bf16-hf-path", out, "--workers", "2"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "fp8-to-bf16" in result.stderr and "B/s" in result.stderr  # the tqdm bar, in bytes per second
    assert read_dir(out) == read_dir(clean_run[0])


def test_cli_bad_input_is_one_line_and_exit_2(fp8_dir, clean_run, capsys):
    argv = ["convert", "fp8-to-bf16", "--input-fp8-hf-path", fp8_dir[0], "--output-bf16-hf-path", clean_run[0],
            "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("npu-dsv3 convert: error:") and "--resume" in err
    assert cli.main(argv + ["--resume"]) == 0  # everything intact: nothing redone
