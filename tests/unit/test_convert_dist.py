"""`--save-format torch_dist`: megatron.core.dist_checkpointing checkpoints, end to end."""

import json
import os
import subprocess
import sys

import pytest
import torch
from megatron.core import dist_checkpointing
from transformers import AutoModelForCausalLM

from npu_dsv3.checkpoint import mcore_dist
from npu_dsv3.checkpoint.mcore_dist import DistSource, release_dir
from npu_dsv3.cli import main
from npu_dsv3.config import load_hf_config
from npu_dsv3.model import forward_logits, load_hf, load_mcore
from npu_dsv3.tiny_model import make_hf_model, save_hf

from support.checkpoint_files import hf_tensors, release_like_hf_dir


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return release_like_hf_dir(str(tmp_path_factory.mktemp("hf")), seed=21)


@pytest.fixture(scope="module")
def dist_dir(hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dist") / "ckpt")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", out, "--save-format", "torch_dist",
                 "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "4", "--workers", "2",
                 "--no-progress"]) == 0
    return out


def test_hf2mcore_writes_a_megatron_distributed_checkpoint(hf_dir, dist_dir):
    with open(os.path.join(dist_dir, "latest_checkpointed_iteration.txt")) as f:
        assert f.read() == "release"
    release = os.path.join(dist_dir, "release")
    with open(os.path.join(release, "metadata.json")) as f:
        assert json.load(f)["sharded_backend"] == "torch_dist"
    stored = dist_checkpointing.load_tensors_metadata(release)
    # vocabulary 203 padded for TP 2 (a multiple of 256); experts stacked on a leading axis
    assert stored["embedding.word_embeddings.weight"].global_shape == (256, 72)
    config = load_hf_config(hf_dir)
    experts = stored["decoder.layers.1.mlp.experts.experts.linear_fc1.weight"]
    assert experts.global_shape == (config["n_routed_experts"], 2 * config["moe_intermediate_size"],
                                    config["hidden_size"])
    assert stored["decoder.layers.1.mlp.router.expert_bias"].dtype == torch.float32
    assert stored["decoder.layers.1.self_attention.linear_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-gemm", "per-expert"])
def test_megatron_loads_it_into_the_model_and_matches_transformers(hf_dir, dist_dir, grouped):
    model = load_mcore(dist_dir, moe_grouped_gemm=grouped)
    reference = load_hf(hf_dir, moe_grouped_gemm=grouped)
    ids = torch.randint(0, 203, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(forward_logits(model, ids), forward_logits(reference, ids))
    assert main(["verify", "--hf-dir", hf_dir, "--mcore-dir", dist_dir]) == 0


def test_round_trip_is_bit_exact_and_loads_in_transformers(hf_dir, dist_dir, tmp_path, capsys):
    out = str(tmp_path / "back")
    assert main(["convert", "mcore2hf", "--load-dir", dist_dir, "--save-dir", out, "--no-progress",
                 "--source-tensor-parallel-size", "2"]) == 0
    assert "torch_dist checkpoint" in capsys.readouterr().err  # the unused source flag is reported
    original, back = hf_tensors(hf_dir), hf_tensors(out)
    assert original.keys() == back.keys()
    for key in original:
        assert back[key].dtype == original[key].dtype and torch.equal(back[key], original[key]), key
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = torch.randint(0, 203, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, reloaded(ids).logits)


MEGATRON_SAVE = """
import sys
import torch
from megatron.core import dist_checkpointing
from npu_dsv3.model import load_hf

if __name__ == "__main__":  # megatron's writer starts helper processes
    model = load_hf(sys.argv[1], dtype=torch.bfloat16)
    dist_checkpointing.save({"model": model.sharded_state_dict()}, sys.argv[2])
"""


def test_reads_what_megatron_itself_saved(hf_dir, tmp_path):
    # A training run saves GroupedMLP weights through megatron's own writer; read them back by HF name.
    release = tmp_path / "ckpt" / "release"
    release.mkdir(parents=True)
    script = tmp_path / "save.py"
    script.write_text(MEGATRON_SAVE)
    proc = subprocess.run([sys.executable, str(script), hf_dir, str(release)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("release")
    source = DistSource(release_dir(str(tmp_path / "ckpt")), load_hf_config(hf_dir))
    original = hf_tensors(hf_dir)
    duplicates = {k for k in original if k.endswith(("layers.4.embed_tokens.weight", "shared_head.head.weight"))}
    assert set(source.names()) == original.keys() - duplicates
    for name in source.names():
        got = source.get(name)
        # load_hf casts the fp32 MTP tensors to the model's bf16; the rest is exact
        assert torch.equal(got, original[name].to(got.dtype)), name


def test_small_files_resume_and_a_damaged_file_is_rewritten(hf_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(mcore_dist, "FILE_BYTES", 64 << 10)  # many files, to exercise the bound and resume
    out = tmp_path / "ckpt"
    args = ["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", str(out), "--save-format", "torch_dist",
            "--no-progress"]
    assert main(args) == 0
    files = sorted((out / "release").glob("*.distcp"))
    assert len(files) > 5
    damaged = files[2]
    damaged.write_bytes(damaged.read_bytes()[:100])
    (out / "latest_checkpointed_iteration.txt").unlink()
    before = {f: f.stat().st_mtime_ns for f in files if f != damaged}
    assert main(args) == 2  # never overwritten silently
    assert main(args + ["--resume"]) == 0
    assert all(f.stat().st_mtime_ns == t for f, t in before.items())
    back = tmp_path / "back"
    assert main(["convert", "mcore2hf", "--load-dir", str(out), "--save-dir", str(back), "--no-progress"]) == 0
    original, restored = hf_tensors(hf_dir), hf_tensors(back)
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)


def test_reshard_from_legacy_to_torch_dist_and_back(hf_dir, dist_dir, tmp_path):
    legacy = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
              "--target-expert-parallel-size", "2", "--target-moe-grouped-gemm"]
    assert main(["convert", "reshard", "--load-dir", dist_dir, "--save-dir", str(tmp_path / "legacy"),
                 "--no-progress", *legacy]) == 0
    direct = [f.replace("--target-moe", "--moe") for f in legacy]
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "direct"),
                 "--no-progress", *direct]) == 0
    for path in sorted((tmp_path / "legacy" / "release").glob("*/model_optim_rng.pt")):
        a = torch.load(path, weights_only=True)["model"]
        b = torch.load(tmp_path / "direct" / path.relative_to(tmp_path / "legacy"), weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path
    source = [f.replace("--target-", "--source-") for f in legacy]
    assert main(["convert", "reshard", "--load-dir", str(tmp_path / "legacy"), "--save-dir", str(tmp_path / "dist"),
                 "--save-format", "torch_dist", "--target-tensor-parallel-size", "2", "--no-progress",
                 *source]) == 0
    a = DistSource(release_dir(dist_dir), load_hf_config(hf_dir))
    b = DistSource(release_dir(str(tmp_path / "dist")), load_hf_config(hf_dir))
    assert a.names() == b.names() and all(torch.equal(a.get(n), b.get(n)) for n in a.names())


def test_layouts_and_damage_give_one_clear_error(hf_dir, dist_dir, tmp_path, capsys):
    base = ["convert", "hf2mcore", "--load-dir", hf_dir, "--save-format", "torch_dist", "--no-progress"]
    assert main(base + ["--save-dir", str(tmp_path / "a"), "--noop-layers", "1", "--num-layers", "5"]) == 2
    assert "--noop-layers must be the last layers" in capsys.readouterr().err
    assert main(base + ["--save-dir", str(tmp_path / "b"), "--target-tensor-parallel-size", "3"]) == 2
    assert "--target-tensor-parallel-size" in capsys.readouterr().err
    broken = tmp_path / "broken"
    os.system(f"cp -r {dist_dir} {broken}")
    (broken / "release" / ".metadata").write_bytes(b"not a pickle")
    assert main(["convert", "mcore2hf", "--load-dir", str(broken), "--save-dir", str(tmp_path / "c")]) == 2
    assert "cannot read the torch_dist metadata" in capsys.readouterr().err


def test_a_config_that_does_not_fit_the_checkpoint_is_refused(dist_dir, tmp_path, capsys):
    other = tmp_path / "other"
    os.system(f"cp -r {dist_dir} {other}")
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (other / "config.json").write_text(json.dumps(config))
    assert main(["convert", "mcore2hf", "--load-dir", str(other), "--save-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "decoder.layers.4." in err and "missing" in err


def test_model_size_flags_select_what_is_written_and_read(hf_dir, dist_dir, tmp_path, capsys):
    out, back = str(tmp_path / "dist"), str(tmp_path / "back")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", out, "--save-format", "torch_dist",
                 "--num-layers", "3", "--first-k-dense-replace", "0", "--no-progress"]) == 0
    assert main(["convert", "mcore2hf", "--load-dir", out, "--save-dir", back, "--no-progress"]) == 0
    original, restored = hf_tensors(hf_dir), hf_tensors(back)
    # the three MoE layers 1..3 become 0..2; MTP (layer 4 of the source) becomes layer 3
    for name, tensor in restored.items():
        if name.startswith("model.layers."):
            index, rest = name[len("model.layers."):].split(".", 1)
            name = f"model.layers.{int(index) + 1}.{rest}"
        assert torch.equal(tensor, original[name]), name
    assert main(["convert", "mcore2hf", "--load-dir", dist_dir, "--save-dir", str(tmp_path / "no-mtp"),
                 "--mtp-num-layers", "0", "--no-progress"]) == 0
    assert not any(".layers.4." in name for name in hf_tensors(str(tmp_path / "no-mtp")))
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", str(tmp_path / "x"), "--save-format",
                 "torch_dist", "--moe-tp-extend-ep", "--target-expert-parallel-size", "2",
                 "--target-tensor-parallel-size", "2", "--moe-grouped-gemm"]) == 2
    assert "--moe-tp-extend-ep is written only with --save-format torch" in capsys.readouterr().err


def test_tied_embeddings_round_trip(tmp_path):
    hf = make_hf_model(seed=3, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                       tie_word_embeddings=True)
    hf_dir = save_hf(hf, str(tmp_path / "hf"), with_mtp=True)
    dist, back = str(tmp_path / "dist"), str(tmp_path / "back")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", dist, "--save-format", "torch_dist",
                 "--no-progress"]) == 0
    assert main(["convert", "mcore2hf", "--load-dir", dist, "--save-dir", back, "--no-progress"]) == 0
    original, restored = hf_tensors(hf_dir), hf_tensors(back)
    assert original.keys() == restored.keys() and all(torch.equal(original[k], restored[k]) for k in original)
    ids = torch.randint(0, 203, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(forward_logits(load_mcore(dist), ids), forward_logits(load_hf(hf_dir), ids))
