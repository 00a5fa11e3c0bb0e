"""Converted checkpoints load into the parallel model exactly as training loads them (several gloo
processes), each rank's logits match transformers', and what that run saves converts back to HF."""

import json
import os
import shutil
import subprocess
import sys

import torch

from npu_dsv3.cli import main
from npu_dsv3.tiny_model import make_hf_model, save_hf

from support import MP_LOAD_CONVERTED, free_port, process_env
from support.checkpoint_files import hf_tensors

SCRIPT = str(MP_LOAD_CONVERTED)


def test_tp2_ep2_ranks_load_legacy_and_torch_dist_checkpoints(tmp_path):
    hf = make_hf_model(seed=4, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4)
    hf_dir = save_hf(hf, str(tmp_path / "hf"))
    legacy, dist = str(tmp_path / "legacy"), str(tmp_path / "dist")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", legacy, "--no-progress",
                 "--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2",
                 "--expert-tensor-parallel-size", "1", "--moe-grouped-gemm"]) == 0
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", dist, "--no-progress",
                 "--save-format", "torch_dist", "--target-tensor-parallel-size", "2"]) == 0
    # world 2 = TP 2, and the same two ranks form the EP 2 group (expert TP 1): rank r holds
    # tensor rank r and expert rank r, i.e. file mp_rank_0r_00r.
    env = {**process_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    saved = tmp_path / "saved"
    (saved / "release").mkdir(parents=True)
    procs = [subprocess.Popen([sys.executable, SCRIPT, hf_dir, legacy, "--dist-dir", dist,
                               "--save-dir", str(saved / "release"), "--tp", "2", "--ep", "2"],
                              env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["legacy"] < 1e-5 and r["dist"] < 1e-5, r
    # What the TP2 x EP2 run saved (every tensor in TP or EP chunks) converts back to the same HF tensors.
    (saved / "latest_checkpointed_iteration.txt").write_text("release")
    shutil.copy(os.path.join(hf_dir, "config.json"), saved / "config.json")
    assert main(["convert", "mcore2hf", "--load-dir", str(saved), "--save-dir", str(tmp_path / "back"),
                 "--no-progress"]) == 0
    original, back = hf_tensors(hf_dir), hf_tensors(tmp_path / "back")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
