"""Training checkpoints of multi-process runs (gloo, one process per rank): a run resumed from the
checkpoint of iteration N continues the uninterrupted run's lm loss and grad norm exactly, in both
formats; a torch_dist checkpoint resumes in another layout; a crash mid-save keeps the previous
checkpoint.

Two chains of runs, ITERS iterations each, checkpoints every 2:

- PP2 with dropout (so the RNG states matter): uninterrupted (torch_dist) -> resumed at 2 (saves
  legacy) -> resumed at 4 from the legacy files;
- DP2 with --use-distributed-optimizer: the same chain, where the resumed run is killed while writing
  its checkpoint of iteration 6; its torch_dist checkpoint of iteration 2 also resumes with PP2, and
  in one process (the optimizer's buffers cut differently).
"""

import pytest
import torch

from npu_dsv3.tiny_model import make_hf_model, save_hf
from npu_dsv3.training.checkpointing import iteration_dir

from support.pretrain_runs import run_pretrain, stopped_at

pytestmark = pytest.mark.slow  # several training processes each

ITERS = 6
COMMON = ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "16",
          "--train-iters", str(ITERS), "--lr", "1e-3", "--lr-warmup-iters", "1", "--log-interval", "1",
          "--eval-iters", "0"]
PP2 = ["--pipeline-model-parallel-size", "2", "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]
DP2 = ["--use-distributed-optimizer"]


def _curve(records):
    return [(r["iteration"], r["lm_loss"], r["grad_norm"]) for r in records]


def _chain(tmp, hf_dir, flags, crash_saving=None) -> dict:
    """The records of the uninterrupted run, of the run resumed at 2 and of the one resumed at 4 from
    the legacy files, and the two checkpoint roots."""
    base = ["--hf-config", hf_dir, *COMMON, *flags]
    dist, legacy = tmp / "dist", tmp / "legacy"
    straight = run_pretrain(2, [*base, "--save", str(dist), "--save-interval", "2"], tmp / "straight.jsonl")
    resumed = run_pretrain(2, [*base, "--load", str(stopped_at(dist, 2, tmp / "at2")), "--save", str(legacy),
                               "--save-interval", "2", "--ckpt-format", "torch"], tmp / "resumed.jsonl",
                           crash_saving=crash_saving)
    # A crash while saving iteration 6 leaves the root as it was after iteration 4: load it as it is.
    at4 = legacy if crash_saving else stopped_at(legacy, 4, tmp / "at4")
    again = run_pretrain(2, [*base, "--load", str(at4)], tmp / "again.jsonl")
    return {"straight": straight, "resumed": resumed, "again": again, "dist": dist, "legacy": legacy}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return save_hf(make_hf_model(seed=3, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
                   str(root))


@pytest.fixture(scope="module")
def pp2(hf_dir, tmp_path_factory):
    return _chain(tmp_path_factory.mktemp("pp2"), hf_dir, PP2)


@pytest.fixture(scope="module")
def dp2(hf_dir, tmp_path_factory):
    return _chain(tmp_path_factory.mktemp("dp2"), hf_dir, DP2, crash_saving=".iter_0000006.saving")


@pytest.mark.parametrize("chain", ["pp2", "dp2"])
def test_resume_in_either_format_continues_the_uninterrupted_run_exactly(request, chain):
    runs = request.getfixturevalue(chain)
    straight = runs["straight"]
    assert [r["iteration"] for r in straight] == list(range(1, ITERS + 1))
    assert _curve(runs["resumed"]) == _curve(straight[2:])  # from torch_dist
    assert _curve(runs["again"]) == _curve(straight[4:])  # from the legacy files


def test_legacy_files_hold_the_distributed_optimizer_state(dp2):
    rank_dir = f"{iteration_dir(str(dp2['legacy']), 4)}/mp_rank_00"
    payload = torch.load(f"{rank_dir}/model_optim_rng.pt", weights_only=True)
    assert payload["iteration"] == 4
    # Megatron-LM's distrib_optim.pt of the one optimizer: its buffers gathered from both DP ranks, the
    # parameters one after the other (zeros align each start), so all the weights are in it.
    state = torch.load(f"{rank_dir}/distrib_optim.pt", weights_only=True)
    (buffers,) = state[0].values()
    assert buffers["param"].shape == buffers["exp_avg"].shape == (buffers["numel_unpadded"],)
    # The routers' expert_bias is a buffer, moved by the router, not by the optimizer.
    weights = torch.cat([t.flatten() for k, t in payload["model"].items()
                         if "_extra_state" not in k and "expert_bias" not in k])
    main = buffers["param"][buffers["param"] != 0]
    assert torch.equal(main.sort().values, weights.sort().values)


def test_a_crash_mid_save_keeps_the_previous_checkpoint(dp2):
    legacy = dp2["legacy"]
    assert (legacy / "latest_checkpointed_iteration.txt").read_text() == "4"
    assert not (legacy / "iter_0000006").exists()
    assert (legacy / ".iter_0000006.saving").exists()  # what the next save clears


@pytest.mark.parametrize("world,flags", [(2, ["--pipeline-model-parallel-size", "2"]), (1, [])],
                         ids=["pp2", "one-process"])
def test_a_torch_dist_checkpoint_resumes_in_another_layout(dp2, hf_dir, tmp_path, world, flags):
    straight = dp2["straight"]
    start = stopped_at(dp2["dist"], 2, tmp_path / "at2")
    records = run_pretrain(world, ["--hf-config", hf_dir, *COMMON, *DP2, *flags, "--load", str(start)],
                           tmp_path / "run.jsonl")
    assert [r["iteration"] for r in records] == list(range(3, ITERS + 1))
    for ours, theirs in zip(records, straight[2:]):
        assert ours["lm_loss"] == pytest.approx(theirs["lm_loss"], rel=1e-6, abs=0)
        assert ours["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-6, abs=0)
