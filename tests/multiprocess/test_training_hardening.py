"""Training and data hardening (issue 12): a diverging run never publishes weights whose next step is
non-finite; a run resumed with another --global-batch-size reads on from the samples the checkpoint
consumed; unusable output directories, rewritten or truncated data and token ids outside the vocabulary
fail early, in one line that names the cause."""

import argparse
import json
import os
import re

import numpy
import pytest
from megatron.core import dist_checkpointing, parallel_state

from npu_dsv3.arguments import ArgsError, build_configs, parse_args
from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.cli import main
from npu_dsv3.distributed import ensure_single_process_group
from npu_dsv3.tiny_model import make_hf_model, save_hf
from npu_dsv3.training.checkpointing import Resumed, iteration_dir
from npu_dsv3.training.metrics import NonFiniteLossError

from support.pretrain_runs import run_pretrain

TINY = ["--micro-batch-size", "2", "--seq-length", "16", "--log-interval", "1", "--eval-iters", "0"]
TRACKER = "latest_checkpointed_iteration.txt"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_hf(make_hf_model(seed=8, num_hidden_layers=2), str(tmp_path_factory.mktemp("hf")))


def _flags(hf_dir, *flags, batch=4):
    return ["--hf-config", hf_dir, *TINY, "--global-batch-size", str(batch), *map(str, flags)]


def _train(hf_dir, log, *flags, batch=4):
    """An in-process ``python -m npu_dsv3.pretrain`` run (a world of one); the records of its --log-jsonl."""
    from npu_dsv3.training.loop import train

    ensure_single_process_group()
    parallel_state.destroy_model_parallel()  # the run sets up its own
    try:
        args = parse_args(_flags(hf_dir, "--log-jsonl", log, *flags, batch=batch), 1)
        train(args, build_configs(args))
    finally:
        parallel_state.destroy_model_parallel()
        ensure_single_process_group()  # what the other tests of the session expect
    return _records(log)


def _records(log):
    return [json.loads(line) for line in open(log)] if os.path.exists(log) else []


def _tracker(save):
    return (save / TRACKER).read_text()


def _write_data(tmp_path, capsys, name, documents, vocab=200, seed=0):
    """``documents`` random documents of NullTokenizer ids below ``vocab``; their prefix."""
    rng = numpy.random.default_rng(seed)
    source = tmp_path / f"{name}.jsonl"
    source.write_text("".join(json.dumps({"text": " ".join(map(str, rng.integers(0, vocab, rng.integers(5, 40))))})
                              + "\n" for _ in range(documents)))
    assert main(["data", "preprocess", "--input", str(source), "--tokenizer-type", "NullTokenizer", "--vocab-size",
                 str(vocab), "--output-prefix", str(tmp_path / name), "--append-eod"]) == 0
    capsys.readouterr()
    return str(tmp_path / f"{name}_text_document")


# --------------------------------------------------------------------------- a diverging run


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_a_diverging_run_publishes_only_checkpoints_whose_next_step_is_finite(hf_dir, tmp_path, ckpt_format):
    save = tmp_path / "ckpt"
    flags = ["--mock-data", "--lr", "1e6", "--save", save, "--save-interval", "1", "--ckpt-format", ckpt_format]
    with pytest.raises(NonFiniteLossError) as stop:
        _train(hf_dir, tmp_path / "run.jsonl", *flags, "--train-iters", "8")
    records = _records(tmp_path / "run.jsonl")
    bad = len(records) + 1  # the iteration that stopped the run logs nothing
    assert bad >= 3, "the run must diverge after two finite steps for this test to mean anything"
    assert f" is nan at iteration {bad}: stopping; {save / TRACKER} names iteration {bad - 2}: resume from it; " \
           f"iteration {bad - 1}'s checkpoint was removed" in str(stop.value)
    assert "untouched" not in str(stop.value)
    assert _tracker(save) == str(bad - 2)
    assert os.path.isdir(iteration_dir(str(save), bad - 2)) and not os.path.exists(iteration_dir(str(save), bad - 1))

    # What the tracker names gives a finite next step: resumed, it repeats the original iteration bad - 1
    # exactly, and a run that ends normally publishes its last save at once.
    resumed = _train(hf_dir, tmp_path / "resumed.jsonl", *flags, "--load", save, "--train-iters", bad - 1)
    assert [r["iteration"] for r in resumed] == [bad - 1]
    assert resumed[0]["lm_loss"] == records[bad - 2]["lm_loss"] and numpy.isfinite(resumed[0]["grad_norm"])
    assert _tracker(save) == str(bad - 1)


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_a_full_disk_while_saving_is_one_line_naming_the_save_directory(hf_dir, tmp_path, capsys, monkeypatch,
                                                                       ckpt_format):
    """ENOSPC shows up when a written file is flushed (injected at fsync): the training entry point says
    so in one line naming --save, exit 2, as the npu-dsv3 commands do."""
    import errno

    from npu_dsv3.pretrain import main as pretrain_main

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    save = tmp_path / "ckpt"
    monkeypatch.setattr(os, "fsync", full)
    parallel_state.destroy_model_parallel()
    try:
        code = pretrain_main(_flags(hf_dir, "--mock-data", "--lr", "1e-3", "--train-iters", "1", "--save", save,
                                         "--ckpt-format", ckpt_format))
    finally:
        parallel_state.destroy_model_parallel()
        ensure_single_process_group()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("npu_dsv3.pretrain: error: ") and os.strerror(errno.ENOSPC) in err[0]
    assert str(save) in err[0] and not os.path.exists(save / TRACKER)
    assert os.listdir(save) == []  # the failed save's staging directory is gone


@pytest.mark.slow
def test_with_two_pipeline_stages_every_rank_stops_and_names_the_tracker(hf_dir, tmp_path):
    save = tmp_path / "ckpt"
    log = tmp_path / "run.jsonl"
    flags = _flags(hf_dir, "--mock-data", "--pipeline-model-parallel-size", 2, "--lr", "1e6", "--train-iters", 8,
                   "--save", save, "--save-interval", 1)
    with pytest.raises(AssertionError, match="exited with 2"):
        run_pretrain(2, flags, log)
    bad = len(_records(log)) + 1
    assert bad >= 3 and _tracker(save) == str(bad - 2)
    for rank in range(2):  # the first stage has no loss, and learns of it from the last
        err = open(f"{log}.rank{rank}.err").read()
        assert f"at iteration {bad}" in err and f"names iteration {bad - 2}: resume from it" in err


# --------------------------------------------------------------------------- consumed samples


def test_a_run_resumed_with_another_global_batch_size_continues_from_the_consumed_samples(hf_dir, tmp_path, capsys):
    prefix = _write_data(tmp_path, capsys, "corpus", 300)
    data = ["--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--split", "100,0,0", "--lr", "1e-3"]
    save = tmp_path / "ckpt"
    first = _train(hf_dir, tmp_path / "first.jsonl", *data, "--save", save, "--save-interval", 1, "--train-iters", 2,
                   batch=8)
    assert [r["consumed_samples"] for r in first] == [8, 16] and _tracker(save) == "2"
    assert os.path.isdir(iteration_dir(str(save), 1))  # published a step later, once its next loss was finite
    capsys.readouterr()
    resumed = _train(hf_dir, tmp_path / "resumed.jsonl", *data, "--load", save, "--save", save, "--train-iters", 4)
    assert "training reads on from sample 16" in capsys.readouterr().err
    assert [(r["iteration"], r["consumed_samples"]) for r in resumed] == [(3, 20), (4, 24)]
    stored = dist_checkpointing.load_common_state_dict(iteration_dir(str(save), 4))
    assert stored["args"]["consumed_train_samples"] == 24 and stored["args"]["global_batch_size"] == 4


def test_consumed_samples_of_checkpoints_that_do_not_store_them():
    from npu_dsv3.training.loop import consumed_samples

    now = argparse.Namespace(global_batch_size=8)
    assert consumed_samples(now, Resumed(3, {"global_batch_size": 16, "consumed_train_samples": 40})) == 40
    assert consumed_samples(now, Resumed(3, {"global_batch_size": 16})) == 48  # from its iteration and batch size
    assert consumed_samples(now, Resumed(3, {})) == 24  # a checkpoint without flags: this run's batch size
    assert consumed_samples(now, Resumed(0, {"consumed_train_samples": 40})) == 0  # --finetune: from the start


def test_the_training_batches_start_at_the_consumed_sample(hf_dir, tmp_path, capsys, world1):
    from npu_dsv3.training.data import pretrain_datasets, pretrain_source

    prefix = _write_data(tmp_path, capsys, "corpus", 300)
    args = parse_args(_flags(hf_dir, "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--lr", "1e-3",
                             "--train-iters", 4, "--split", "100,0,0", batch=8), 1)
    source = pretrain_source(args, train_samples=64)
    train, _ = pretrain_datasets(args, 64)
    read = numpy.concatenate([b["tokens"].numpy() for b in source.train(12)])
    assert numpy.array_equal(read, numpy.stack([train[i]["tokens"] for i in range(12, 20)]))


# --------------------------------------------------------------------------- fail early, in one line


def test_an_unusable_save_or_cache_directory_is_refused_before_the_model_is_built(hf_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for flag in ("--save", "--data-cache-path"):
        with pytest.raises(ArgsError, match=f"^{flag} {blocker}/sub: {blocker} is a file, not a directory; give "):
            parse_args(_flags(hf_dir, "--mock-data", "--lr", "1e-3", "--train-iters", 1, flag, blocker / "sub"), 1)
    with pytest.raises(ArgsError, match=f"^--log-jsonl {blocker}/run.jsonl: {blocker} is a file, not a directory"):
        parse_args(_flags(hf_dir, "--mock-data", "--lr", "1e-3", "--train-iters", 1, "--log-jsonl",
                          blocker / "run.jsonl"), 1)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to any directory")
def test_a_read_only_save_directory_is_refused(hf_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(ArgsError, match=f"--save {locked}/ckpt: {locked} is not writable"):
        parse_args(_flags(hf_dir, "--mock-data", "--lr", "1e-3", "--train-iters", 1, "--save", locked / "ckpt"), 1)


def test_an_unusable_output_prefix_is_refused_before_tokenizing(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "1 2 3"}\n')
    assert main(["data", "preprocess", "--input", str(source), "--tokenizer-type", "NullTokenizer", "--vocab-size",
                 "10", "--output-prefix", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("npu-dsv3 data") and err.endswith(
        f"error: --output-prefix {blocker}/out: {blocker} is a file, not a directory; give a prefix in a directory "
        "this run can write")


def _samples(prefix, cache=None):
    from npu_dsv3.data.dataset import build_pretrain_datasets
    from npu_dsv3.data.tokenizer import load_tokenizer

    train, _, _ = build_pretrain_datasets(prefix, seq_length=16, sizes=[200, 0, 0], split="100,0,0",
                                          tokenizer=load_tokenizer("NullTokenizer", None, 200), path_to_cache=cache)
    return numpy.stack([train[i]["tokens"].numpy() for i in range(len(train))])


def test_data_written_again_under_the_same_prefix_gets_new_index_caches(tmp_path, capsys, world1):
    prefix = _write_data(tmp_path, capsys, "corpus", 300, seed=1)
    _samples(prefix)  # megatron caches its indices beside the data
    assert os.path.isdir(os.path.join(prefix, "cache"))
    _write_data(tmp_path, capsys, "corpus", 60, seed=2)  # fewer, other documents
    (tmp_path / "copy").mkdir()
    fresh = _write_data(tmp_path / "copy", capsys, "corpus", 60, seed=2)
    assert numpy.array_equal(_samples(prefix), _samples(fresh))


def test_data_cache_path_keeps_the_caches_out_of_the_data_directory(tmp_path, capsys, world1):
    prefix = _write_data(tmp_path, capsys, "corpus", 100)
    cache = tmp_path / "elsewhere"
    _samples(prefix, str(cache))
    assert not os.path.exists(os.path.join(prefix, "cache"))
    assert any(name.endswith("-GPTDataset-train-shuffle_index.npy") for name in os.listdir(cache))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to any directory")
def test_a_read_only_data_directory_names_data_cache_path(tmp_path, capsys, world1):
    prefix = _write_data(tmp_path, capsys, "corpus", 100)
    os.chmod(tmp_path, 0o500)
    try:
        with pytest.raises(ValueError, match=f"--data-path {prefix}: .* {tmp_path} is not writable: pass "
                                             "--data-cache-path DIR"):
            _samples(prefix)
    finally:
        os.chmod(tmp_path, 0o700)


@pytest.mark.parametrize("suffix", [".bin", ".idx"])
def test_a_truncated_data_file_is_one_line_naming_it(tmp_path, capsys, world1, suffix):
    prefix = _write_data(tmp_path, capsys, "corpus", 100)
    path = prefix + suffix
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 7 if suffix == ".bin" else 40)
    expected = (rf"{re.escape(path)} holds {size - 7} bytes where {re.escape(prefix)}\.idx describes {size}: it is "
                "truncated" if suffix == ".bin" else rf"{re.escape(path)} cannot be read \(.*\): it is truncated")
    with pytest.raises(ValueError, match=expected):
        _samples(prefix)


def test_token_ids_outside_the_vocabulary_are_blamed_on_the_tokenizer(hf_dir, tmp_path, capsys):
    prefix = _write_data(tmp_path, capsys, "corpus", 100, vocab=1000)  # the tiny model has 203 tokens
    with pytest.raises(ValueError) as error:
        _train(hf_dir, tmp_path / "run.jsonl", "--data-path", prefix, "--tokenizer-type", "NullTokenizer", "--lr",
               "1e-3", "--train-iters", 1, "--split", "100,0,0")
    found = re.fullmatch(r"--data-path \S+: token id (\d+) \(samples 0\.\.1\) is outside the model's vocabulary "
                         r"of 203: the data was tokenized with another tokenizer; preprocess it again with this "
                         r"model's", str(error.value))
    assert found and 203 <= int(found.group(1)) <= 1000


def test_the_optimizer_mismatch_names_only_the_differing_kinds(hf_dir, tmp_path):
    save = tmp_path / "ckpt"
    _train(hf_dir, tmp_path / "run.jsonl", "--mock-data", "--lr", "1e-3", "--train-iters", 1, "--save", save)
    with pytest.raises(CheckpointError) as error:
        _train(hf_dir, tmp_path / "resumed.jsonl", "--mock-data", "--lr", "1e-3", "--train-iters", 2, "--load", save,
               "--use-distributed-optimizer")
    assert re.match(rf"{re.escape(str(iteration_dir(str(save), 1)))} holds the state of FP32Optimizer optimizer\(s\) "
                    r"where this run has DistributedOptimizer \(", str(error.value))
    assert "[" not in str(error.value)
