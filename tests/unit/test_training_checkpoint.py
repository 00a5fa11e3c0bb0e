"""Training checkpoints: stop after N iterations, resume, and the loss curve is the uninterrupted one."""

import json
import os

import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.distributed import ensure_single_process_group
from npu_dsv3.model import load_hf
from npu_dsv3.tiny_model import make_hf_model, save_hf
from npu_dsv3.training import build_optimizer, train_step, wrap_model
from npu_dsv3.training.checkpointing import load_checkpoint, save_checkpoint

SEQ, MBS, MICRO, STEPS, STOP = 16, 2, 2, 5, 2


def _batches(iteration):
    ids = torch.randint(0, 203, (MBS * MICRO, SEQ + 1), generator=torch.Generator().manual_seed(iteration))
    batch = dict(tokens=ids[:, :-1], labels=ids[:, 1:], loss_mask=torch.ones(MBS * MICRO, SEQ),
                 position_ids=torch.arange(SEQ).expand(MBS * MICRO, SEQ))
    return iter([{k: v[i * MBS:(i + 1) * MBS] for k, v in batch.items()} for i in range(MICRO)])


def _run(hf_dir, distributed=False):
    # Dropout on: resuming must restore the RNG streams too.
    model = load_hf(hf_dir, hidden_dropout=0.1, attention_dropout=0.1).train()
    chunks = wrap_model(model, distributed)
    optimizer = build_optimizer(chunks, lr=3e-3, weight_decay=0.1, min_lr=3e-4, use_distributed_optimizer=distributed)
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=3e-3, min_lr=3e-4, lr_warmup_steps=2,
                                        lr_decay_steps=STEPS, lr_decay_style="cosine", start_wd=0.1, end_wd=0.1,
                                        wd_incr_steps=STEPS, wd_incr_style="constant")
    return chunks, optimizer, scheduler


def _seed(seed):
    # The default generator (initial weights) and megatron's tracker streams (dropout).
    ensure_single_process_group()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _steps(run, first, last):
    chunks, optimizer, scheduler = run
    out = []
    for iteration in range(first, last):
        result = train_step(chunks, optimizer, _batches(iteration), MICRO, SEQ, MBS)
        scheduler.step(increment=1)
        out.append((result["lm_loss"], float(result["grad_norm"]), optimizer.param_groups[0]["lr"]))
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf(make_hf_model(seed=8, num_hidden_layers=2), str(tmp_path_factory.mktemp("hf")), with_mtp=True)


@pytest.mark.parametrize("distributed", [False, True], ids=["adam", "distributed-optimizer"])
@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_resume_reproduces_the_uninterrupted_run(hf_dir, tmp_path, ckpt_format, distributed):
    _seed(0)
    straight = _steps(_run(hf_dir, distributed), 0, STEPS)

    _seed(0)
    first = _run(hf_dir, distributed)
    before = _steps(first, 0, STOP)
    path = save_checkpoint(str(tmp_path), STOP, *first, args={"lr": 3e-3, "seq_length": SEQ},
                           ckpt_format=ckpt_format)
    assert os.path.basename(path) == f"iter_{STOP:07d}"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == str(STOP)
    if ckpt_format == "torch_dist":
        with open(os.path.join(path, "metadata.json")) as f:
            assert json.load(f)["sharded_backend"] == "torch_dist"
    else:  # MindSpeed-LLM's per-rank file, read back with weights_only=True
        payload = torch.load(os.path.join(path, "mp_rank_00", "model_optim_rng.pt"), weights_only=True)
        assert payload["iteration"] == STOP and "decoder.layers.1.mlp.router.expert_bias" in payload["model"]
        assert os.path.isfile(os.path.join(path, "mp_rank_00", "distrib_optim.pt")) == distributed

    _seed(123)  # a new process: other weights and RNG until the checkpoint is loaded
    second = _run(hf_dir, distributed)
    assert load_checkpoint(str(tmp_path), *second) == STOP
    after = _steps(second, STOP, STEPS)
    assert before + after == straight


def test_finetune_loads_weights_only_and_starts_at_zero(hf_dir, tmp_path):
    _seed(0)
    run = _run(hf_dir)
    _steps(run, 0, 1)
    save_checkpoint(str(tmp_path), 1, *run)
    fresh = _run(hf_dir)
    assert load_checkpoint(str(tmp_path), *fresh, finetune=True) == 0
    for a, b in zip(run[0][0].module.parameters(), fresh[0][0].module.parameters()):
        assert torch.equal(a, b)
    assert fresh[2].num_steps == 0


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_without_optimizer_and_rng_state_the_weights_and_iteration_load(hf_dir, tmp_path, ckpt_format):
    _seed(0)
    run = _run(hf_dir)
    _steps(run, 0, 1)
    save_checkpoint(str(tmp_path), 1, *run, ckpt_format=ckpt_format, save_optim=False, save_rng=False)
    fresh = _run(hf_dir)
    assert load_checkpoint(str(tmp_path), *fresh) == 1
    for a, b in zip(run[0][0].module.parameters(), fresh[0][0].module.parameters()):
        assert torch.equal(a, b)
    params = len(list(run[0][0].module.parameters()))
    assert [len(o.optimizer.state) for o in run[1].chained_optimizers] == [params]
    assert [len(o.optimizer.state) for o in fresh[1].chained_optimizers] == [0]  # Adam starts afresh


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_the_state_of_another_optimizer_is_refused(hf_dir, tmp_path, ckpt_format):
    _seed(0)
    run = _run(hf_dir)
    _steps(run, 0, 1)
    save_checkpoint(str(tmp_path), 1, *run, ckpt_format=ckpt_format)
    with pytest.raises(CheckpointError, match="--use-distributed-optimizer"):
        load_checkpoint(str(tmp_path), *_run(hf_dir, distributed=True))
    assert load_checkpoint(str(tmp_path), *_run(hf_dir, distributed=True), load_optim=False) == 1


def test_a_legacy_checkpoint_of_another_model_is_one_line(hf_dir, tmp_path):
    """Rank files of the 2-layer model into a run whose model has 1 layer, or the other way round."""
    deeper = save_hf(make_hf_model(seed=8, num_hidden_layers=3), str(tmp_path / "hf3"), with_mtp=True)
    _seed(0)
    save_checkpoint(str(tmp_path / "two"), 1, *_run(hf_dir), ckpt_format="torch")
    with pytest.raises(CheckpointError, match=r"lacks decoder\.layers\.2\..*another model or layout"):
        load_checkpoint(str(tmp_path / "two"), *_run(deeper))
    save_checkpoint(str(tmp_path / "three"), 1, *_run(deeper), ckpt_format="torch")
    with pytest.raises(CheckpointError, match=r"holds decoder\.layers\.2\..*that this run's model lacks"):
        load_checkpoint(str(tmp_path / "three"), *_run(hf_dir))


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_a_training_save_converts_to_hf(hf_dir, tmp_path, ckpt_format):
    """`npu-dsv3 convert mcore2hf` reads the directory the tracker names (iter_XXXXXXX), in either format,
    with the config.json the save wrote beside it: untrained weights come back as the HF ones, bit for bit."""
    from support.checkpoint_files import hf_tensors
    from npu_dsv3.cli import main

    _seed(0)
    with open(os.path.join(hf_dir, "config.json")) as f:
        hf_config = json.load(f)
    # load_hf's model holds grouped-GEMM experts; pretrain records every layout flag the same way
    save_checkpoint(str(tmp_path / "ckpt"), 3, *_run(hf_dir), args={"moe_grouped_gemm": True},
                    ckpt_format=ckpt_format, hf_config=hf_config)
    assert main(["convert", "mcore2hf", "--load-dir", str(tmp_path / "ckpt"), "--save-dir", str(tmp_path / "hf"),
                 "--no-progress"]) == 0
    original, exported = hf_tensors(hf_dir), hf_tensors(str(tmp_path / "hf"))
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)


def test_a_crash_mid_save_keeps_the_previous_checkpoint(hf_dir, tmp_path, monkeypatch):
    _seed(0)
    run = _run(hf_dir)
    _steps(run, 0, 1)
    save_checkpoint(str(tmp_path), 1, *run)
    from megatron.core import dist_checkpointing

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(dist_checkpointing, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 2, *run)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert not (tmp_path / "iter_0000002").exists()
    monkeypatch.setattr(torch, "save", crash)  # the legacy writer, killed the same way
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(str(tmp_path), 3, *run, ckpt_format="torch")
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert not (tmp_path / "iter_0000003").exists()
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path), *_run(hf_dir)) == 1
