"""`python -m npu_dsv3.pretrain` on several gloo processes: from the same starting weights and the
same global batches, every layout's lm loss and grad norm per iteration equal the single-process run."""

import json
import os
import socket
import subprocess
import sys

import pytest

from npu_dsv3.cli import main
from npu_dsv3.tiny_model import make_hf_model, save_hf

ITERS = 3
COMMON = ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "16",
          "--train-iters", str(ITERS), "--lr", "1e-3", "--log-interval", "1", "--finetune"]
LAYOUTS = {
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "ep2": (2, ["--expert-model-parallel-size", "2"]),
    "dp2-distributed-optimizer": (2, ["--use-distributed-optimizer"]),
    "tp2-sp": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world: int, flags, hf_dir, start, out) -> list:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "npu_dsv3.pretrain", "--hf-config", hf_dir, "--load", start,
            "--log-jsonl", str(out), *COMMON, *flags]
    procs = [subprocess.Popen(argv, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    results = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny model and its starting weights as a torch_dist checkpoint every layout loads."""
    root = tmp_path_factory.mktemp("pretrain")
    hf_dir = save_hf(make_hf_model(seed=3, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
                     str(root / "hf"))
    weights = str(root / "start")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", weights, "--save-format", "torch_dist",
                 "--target-tensor-parallel-size", "2", "--no-progress"]) == 0
    reference = _run(1, [], hf_dir, weights, root / "single.jsonl")
    return hf_dir, weights, reference


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_the_single_process_run(start, tmp_path, name):
    hf_dir, weights, reference = start
    world, flags = LAYOUTS[name]
    records = _run(world, flags, hf_dir, weights, tmp_path / "run.jsonl")
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    for ours, single in zip(records, reference):
        assert ours["lm_loss"] == pytest.approx(single["lm_loss"], rel=1e-6, abs=0)
        assert ours["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-6, abs=0)


def test_an_impossible_layout_is_one_line_naming_the_flag(start):
    hf_dir, _, _ = start
    proc = subprocess.run([sys.executable, "-m", "npu_dsv3.pretrain", "--hf-config", hf_dir, "--mock-data",
                           "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "16",
                           "--train-iters", "1", "--lr", "1e-3", "--expert-model-parallel-size", "5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "--expert-model-parallel-size" in errors[0], proc.stderr[-2000:]


def test_interleaved_pipeline_is_refused_until_it_matches(start):
    hf_dir, _, _ = start
    proc = subprocess.run([sys.executable, "-m", "npu_dsv3.pretrain", "--hf-config", hf_dir, "--mock-data",
                           "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "16",
                           "--train-iters", "1", "--lr", "1e-3", "--pipeline-model-parallel-size", "2",
                           "--num-layers-per-virtual-pipeline-stage", "1"],
                          env={**os.environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(_free_port())}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--num-layers-per-virtual-pipeline-stage" in proc.stderr, proc.stderr[-2000:]
