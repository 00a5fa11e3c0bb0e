"""`python -m npu_dsv3.pretrain` on several gloo processes: from the same starting weights and the
same global batches, every layout's lm loss and grad norm per iteration equal the single-process run."""

import subprocess
import sys

import pytest

from npu_dsv3.cli import main
from npu_dsv3.tiny_model import make_hf_model, save_hf

from support.pretrain_runs import run_pretrain

pytestmark = pytest.mark.slow  # several training processes each

ITERS = 4
COMMON = ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "16",
          "--train-iters", str(ITERS), "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0", "--finetune"]
TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
FULL_RECOMPUTE = ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
# name: (starting model fixture, world size, flags)
LAYOUTS = {
    "pp2": ("start", 2, ["--pipeline-model-parallel-size", "2"]),
    "ep2": ("start", 2, ["--expert-model-parallel-size", "2"]),
    "dp2-distributed-optimizer": ("start", 2, ["--use-distributed-optimizer"]),
    "tp2-sp": ("start", 2, TP2_SP),
    # expert TP 2: the dispatcher gathers each TP rank's uneven token count
    "tp2-ep2-sp": ("start", 4, [*TP2_SP, "--expert-model-parallel-size", "2"]),
    "tp2-sp-moe-tp-extend-ep": ("start", 2, [*TP2_SP, "--moe-tp-extend-ep"]),
    "tp2-sp-mla-mm-split": ("start", 2, [*TP2_SP, "--mla-mm-split"]),
    # 6 layers of which 2 and 5 are noop: each stage is two real layers and a noop one
    "pp2-noop-layers": ("start", 2, ["--pipeline-model-parallel-size", "2", "--num-layers", "6",
                                     "--noop-layers", "2,5"]),
    "pp2-full-recompute": ("start", 2, ["--pipeline-model-parallel-size", "2", *FULL_RECOMPUTE]),
    "selective-recompute": ("start", 1, ["--recompute-granularity", "selective", "--recompute-modules", "core_attn",
                                         "mla_up_proj", "mlp", "shared_experts", "moe_act", "layernorm",
                                         "--moe-grouped-gemm"]),
    "pp4-num-layer-list": ("deep_start", 4, ["--pipeline-model-parallel-size", "4", "--num-layer-list", "1,2,2,1"]),
    "pp2-vpp": ("start", 2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    # 3 chunks per rank; rank 0's chunk 1 and rank 1's chunk 2 hold only a noop layer (no weights to load)
    "pp2-vpp-noop-layers": ("start", 2, ["--pipeline-model-parallel-size", "2",
                                         "--num-layers-per-virtual-pipeline-stage", "1", "--num-layers", "6",
                                         "--noop-layers", "2,5"]),
    # whole experts on each TP rank, fed that rank's tokens: expert gradients summed over both
    "tp2-sp-etp1": ("start", 2, [*TP2_SP, "--expert-tensor-parallel-size", "1"]),
    # MindSpeed-LLM's A2 shape (and the demo's): TP x PP x EP with whole experts
    # stages 0 and 3 on rank 0 (embedding, head and loss), 1 and 2 on rank 1; 4 micro-batches = 2 x PP
    "pp2-dualpipev": ("start", 2, ["--pipeline-model-parallel-size", "2", "--schedules-method", "dualpipev"]),
    # EP inside TP (data parallel 1 keeps the 4 micro-batches dualpipev needs)
    "tp2-pp2-ep2-etp1-dualpipev": ("start", 4, [*TP2_SP, "--pipeline-model-parallel-size", "2", "--schedules-method",
                                                "dualpipev", "--expert-model-parallel-size", "2",
                                                "--expert-tensor-parallel-size", "1"]),
    "tp2-pp2-ep2-etp1": ("start", 4, [*TP2_SP, "--pipeline-model-parallel-size", "2", "--expert-model-parallel-size",
                                      "2", "--expert-tensor-parallel-size", "1"]),
}


def _run(world: int, flags, hf_dir, start, out) -> list:
    return run_pretrain(world, ["--hf-config", hf_dir, "--load", start, *COMMON, *flags], out)


def _start(root, num_hidden_layers: int):
    """A tiny model, its starting weights as a torch_dist checkpoint every layout loads, and the
    single-process run from them."""
    hf_dir = save_hf(make_hf_model(seed=3, num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                                   num_key_value_heads=4), str(root / "hf"))
    weights = str(root / "start")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", weights, "--save-format", "torch_dist",
                 "--target-tensor-parallel-size", "2", "--no-progress"]) == 0
    reference = _run(1, [], hf_dir, weights, root / "single.jsonl")
    return hf_dir, weights, reference


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    return _start(tmp_path_factory.mktemp("pretrain"), 4)


@pytest.fixture(scope="module")
def deep_start(tmp_path_factory):
    """Enough layers for four pipeline stages of different sizes."""
    return _start(tmp_path_factory.mktemp("pretrain6"), 6)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_the_single_process_run(request, tmp_path, name):
    model, world, flags = LAYOUTS[name]
    hf_dir, weights, reference = request.getfixturevalue(model)
    records = _run(world, flags, hf_dir, weights, tmp_path / "run.jsonl")
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    for ours, single in zip(records, reference):
        assert ours["lm_loss"] == pytest.approx(single["lm_loss"], rel=1e-6, abs=0)
        assert ours["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-6, abs=0)
        # the logged balance loss is the whole batch's, gathered from every stage and shard
        assert ours["load_balancing_loss"] == pytest.approx(single["load_balancing_loss"], rel=1e-5, abs=0)


def test_an_impossible_layout_is_one_line_naming_the_flag(start):
    hf_dir, _, _ = start
    proc = subprocess.run([sys.executable, "-m", "npu_dsv3.pretrain", "--hf-config", hf_dir, "--mock-data",
                           "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "16",
                           "--train-iters", "1", "--lr", "1e-3", "--expert-model-parallel-size", "5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "--expert-model-parallel-size" in errors[0], proc.stderr[-2000:]
