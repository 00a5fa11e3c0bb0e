"""`npu-dsv3 convert hf2mcore / mcore2hf` and `verify --mcore-dir`, end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from npu_dsv3.checkpoint.fp8 import SCALE_SUFFIX
from npu_dsv3.cli import main

from support import SHELL
from support.checkpoint_files import hf_tensors, release_like_hf_dir

LAYOUT = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
          "--target-expert-parallel-size", "2", "--moe-grouped-gemm", "--num-layer-list", "1,3"]
SOURCE = [flag.replace("--target-", "--source-") for flag in LAYOUT]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return release_like_hf_dir(str(tmp_path_factory.mktemp("hf")), seed=12)


@pytest.fixture(scope="module")
def mcore_dir(hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mcore") / "ckpt")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", out, "--workers", "2",
                 "--no-progress", *LAYOUT]) == 0
    return out


def test_hf2mcore_writes_the_training_layout(mcore_dir):
    with open(os.path.join(mcore_dir, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "release"
    ranks = sorted(os.listdir(os.path.join(mcore_dir, "release")))
    assert ranks == [f"mp_rank_{t:02d}_{p:03d}_{e:03d}" for t in range(2) for p in range(2) for e in range(2)]
    payload = torch.load(os.path.join(mcore_dir, "release", "mp_rank_01_001_001", "model_optim_rng.pt"),
                         weights_only=True)
    model = payload["model"]
    # stage 1 holds layers 1..3 (local 0..2), the head and MTP; EP rank 1 holds experts 6..11
    assert "decoder.layers.2.mlp.experts.weight1" in model and "decoder.layers.3.input_layernorm.weight" not in model
    assert "output_layer.weight" in model and "mtp.layers.0.eh_proj.weight" in model
    assert model["decoder.layers.0.mlp.router.expert_bias"].dtype == torch.float32


def test_round_trip_through_the_cli_is_bit_exact_and_loads_in_transformers(hf_dir, mcore_dir, tmp_path):
    out = str(tmp_path / "back")
    assert main(["convert", "mcore2hf", "--load-dir", mcore_dir, "--save-dir", out, "--no-progress", *SOURCE]) == 0
    original, back = hf_tensors(hf_dir), hf_tensors(out)
    assert original.keys() == back.keys()
    for key in original:
        assert back[key].dtype == original[key].dtype and torch.equal(back[key], original[key]), key
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert set(index["weight_map"]) == set(original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 203, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, reloaded(ids).logits)


def test_verify_mcore_dir_matches_transformers(hf_dir, mcore_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "npu_dsv3", "verify", "--hf-dir", hf_dir, "--mcore-dir", mcore_dir,
         "--seq-length", "16", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
         "--expert-model-parallel-size", "2", "--moe-grouped-gemm", "--num-layer-list", "1,3"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["passed"] and result["mcore_dir"] == mcore_dir


def _quantize_fp8(hf_dir, out_dir, block=128):
    """DeepSeek's release format from a BF16 checkpoint: 2-D linear weights as float8 + block scales."""
    os.makedirs(out_dir)
    tensors = {}
    for name, tensor in hf_tensors(hf_dir).items():
        if tensor.dim() == 2 and "proj" in name:
            rows, cols = tensor.shape
            blocks = tensor.float().abs().amax().clamp(min=1e-12) / 448.0
            scale = torch.full((-(-rows // block), -(-cols // block)), float(blocks))
            tensors[name] = (tensor.float() / blocks).to(torch.float8_e4m3fn)
            tensors[name + SCALE_SUFFIX] = scale
        else:
            tensors[name] = tensor
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [block, block]}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f)


@pytest.mark.parametrize("nf4", [False, True], ids=["bf16", "qlora-nf4"])
def test_fp8_release_converts_directly_like_the_bf16_cast(hf_dir, tmp_path, nf4):
    """Also to QLoRA's NF4 base: the release's weights dequantized as read, then quantized to NF4."""
    fp8 = str(tmp_path / "fp8")
    _quantize_fp8(hf_dir, fp8)
    flags = ["--target-expert-parallel-size", "2", "--moe-grouped-gemm", "--no-progress", *(["--qlora-nf4"] * nf4)]
    assert main(["convert", "hf2mcore", "--load-dir", fp8, "--save-dir", str(tmp_path / "direct"), *flags]) == 0
    assert main(["convert", "fp8-to-bf16", "--input-fp8-hf-path", fp8, "--output-bf16-hf-path",
                 str(tmp_path / "bf16"), "--no-progress"]) == 0
    assert main(["convert", "hf2mcore", "--load-dir", str(tmp_path / "bf16"), "--save-dir", str(tmp_path / "cast"),
                 *flags]) == 0
    for rank in ("mp_rank_00_000", "mp_rank_00_001"):
        a = torch.load(tmp_path / "direct" / "release" / rank / "model_optim_rng.pt", weights_only=True)["model"]
        b = torch.load(tmp_path / "cast" / "release" / rank / "model_optim_rng.pt", weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert nf4 == any(k.endswith("_nf4") for k in a)
    with open(tmp_path / "direct" / "config.json") as f:
        written = json.load(f)
        assert "quantization_config" not in written and nf4 == ("npu_dsv3_nf4" in written)


def test_resume_rewrites_only_what_is_missing(hf_dir, tmp_path):
    out = tmp_path / "ckpt"
    args = ["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", str(out), "--no-progress", *LAYOUT]
    assert main(args) == 0
    files = sorted((out / "release").glob("*/model_optim_rng.pt"))
    os.remove(files[0])
    with open(files[1], "r+b") as f:
        f.truncate(100)
    before = {p: p.stat().st_mtime_ns for p in files[2:]}
    assert main(args) == 2  # an existing checkpoint is never overwritten silently
    assert main(args + ["--resume"]) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert torch.load(files[1], weights_only=True)["model"]


def test_bad_input_is_one_clear_error(hf_dir, tmp_path, capsys):
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "a"),
                 "--target-tensor-parallel-size", "3"]) == 2
    assert "--target-tensor-parallel-size" in capsys.readouterr().err
    assert main(["convert", "mcore2hf", "--load-dir", str(tmp_path / "missing"), "--save-dir",
                 str(tmp_path / "b")]) == 2
    assert "missing does not exist" in capsys.readouterr().err


def test_mtp_copies_that_differ_are_refused(hf_dir, tmp_path, capsys):
    changed = str(tmp_path / "hf")
    os.makedirs(changed)
    tensors = hf_tensors(hf_dir)
    tensors["model.layers.4.embed_tokens.weight"] = tensors["model.layers.4.embed_tokens.weight"] + 1
    save_file(tensors, os.path.join(changed, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(hf_dir, "config.json")) as src, open(os.path.join(changed, "config.json"), "w") as dst:
        dst.write(src.read())
    assert main(["convert", "hf2mcore", "--load-dir", changed, "--save-dir", str(tmp_path / "out")]) == 2
    assert "model.layers.4.embed_tokens.weight differs" in capsys.readouterr().err


def test_recipes_round_trip(hf_dir, tmp_path):
    shell = str(SHELL)
    env = {**os.environ, "LOAD_DIR": hf_dir, "SAVE_DIR": str(tmp_path / "mcore"), "TP": "2", "PP": "2", "EP": "2",
           "ETP": "2", "NUM_LAYERS": "6", "NOOP_LAYERS": "0,5", "VPP_LAYERS": "1", "SCHEDULE": "", "WORKERS": "2"}
    dry = subprocess.run(["bash", os.path.join(shell, "ckpt_convert_deepseek3_hf2mcore.sh")],
                         env={**env, "DRY_RUN": "1"}, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0 and "--num-layers-per-virtual-pipeline-stage 1" in dry.stdout
    for script, load, save in (("hf2mcore", hf_dir, tmp_path / "mcore"), ("mcore2hf", tmp_path / "mcore", tmp_path / "hf")):
        proc = subprocess.run(["bash", os.path.join(shell, f"ckpt_convert_deepseek3_{script}.sh")],
                              env={**env, "LOAD_DIR": str(load), "SAVE_DIR": str(save)},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
    original, back = hf_tensors(hf_dir), hf_tensors(tmp_path / "hf")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)


def test_reshard_between_layouts_equals_converting_from_hf(hf_dir, mcore_dir, tmp_path):
    target = ["--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "2",
              "--target-expert-parallel-size", "3", "--target-num-layers-per-virtual-pipeline-stage", "1",
              "--target-noop-layers", "0,5"]
    source = ["--source-tensor-parallel-size", "2", "--source-pipeline-parallel-size", "2",
              "--source-expert-parallel-size", "2", "--source-moe-grouped-gemm", "--source-num-layer-list", "1,3"]
    assert main(["convert", "reshard", "--load-dir", mcore_dir, "--save-dir", str(tmp_path / "b"),
                 "--no-progress", "--workers", "2", *source, *target]) == 0
    direct = [flag.replace("--target-num-layers-per", "--num-layers-per").replace("--target-noop", "--noop")
              for flag in target]
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "direct"),
                 "--no-progress", *direct]) == 0
    resharded = sorted((tmp_path / "b" / "release").glob("*/model_optim_rng.pt"))
    assert len(resharded) == 6
    for path in resharded:
        a = torch.load(path, weights_only=True)
        b = torch.load(tmp_path / "direct" / path.relative_to(tmp_path / "b"), weights_only=True)
        for chunk in ("model0", "model1", "model2"):
            assert a[chunk].keys() == b[chunk].keys()
            assert all(torch.equal(a[chunk][k], b[chunk][k]) for k in a[chunk]), (path, chunk)


def test_model_size_flags_and_split_layouts_end_to_end(hf_dir, tmp_path):
    # The last three (MoE) layers, no MTP, experts over EP x TP and MLA's up-projections split.
    out, back = str(tmp_path / "mcore"), str(tmp_path / "back")
    layout = ["--moe-grouped-gemm", "--moe-tp-extend-ep", "--mla-mm-split"]
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", out, "--no-progress",
                 "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2", "--num-layers", "3",
                 "--first-k-dense-replace", "0", "--mtp-num-layers", "0", *layout]) == 0
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert (config["num_hidden_layers"], config["first_k_dense_replace"], config["num_nextn_predict_layers"]) == (3, 0, 0)
    assert main(["convert", "mcore2hf", "--load-dir", out, "--save-dir", back, "--no-progress",
                 "--source-tensor-parallel-size", "2", "--source-expert-parallel-size", "2", *layout]) == 0
    original, restored = hf_tensors(hf_dir), hf_tensors(back)
    expected = {}
    for name, tensor in original.items():
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            if int(index) in (1, 2, 3):
                expected[f"model.layers.{int(index) - 1}.{rest}"] = tensor
        else:
            expected[name] = tensor
    assert restored.keys() == expected.keys()
    assert all(torch.equal(restored[k], expected[k]) for k in expected)
    AutoModelForCausalLM.from_pretrained(back)  # transformers builds the three-layer model from it
    assert main(["verify", "--hf-dir", back, "--mcore-dir", out, "--tensor-model-parallel-size", "2",
                 "--expert-model-parallel-size", "2", *layout]) == 0
