"""Evaluation during training: ``--eval-interval N --eval-iters K`` runs a forward-only pass over K
validation batches every N iterations and at the end, logged Megatron's way and added to the
iteration's ``--log-jsonl`` record; it never changes what training computes."""

import math

import pytest
import torch

from npu_dsv3.arguments import parse_args
from npu_dsv3.cli import main
from npu_dsv3.data import corpus
from npu_dsv3.tiny_model import make_hf_model, save_hf

from support.pretrain_runs import rank_stdout, run_pretrain

pytestmark = pytest.mark.slow  # several training processes each

BATCH = ["--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "32", "--lr", "1e-3",
         "--log-interval", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Pretraining text tokenized with the corpus tokenizer, a model of its vocabulary and its checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    tok = corpus.build_tokenizer(str(root / "tok"))
    assert main(["data", "preprocess", "--input", corpus.path("pretrain.jsonl"), "--tokenizer-name-or-path", tok,
                 "--output-prefix", str(root / "pre"), "--append-eod"]) == 0
    hf_dir = save_hf(make_hf_model(seed=11, vocab_size=1024), str(root / "hf"))
    start = str(root / "start")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", start, "--save-format", "torch_dist",
                 "--no-progress"]) == 0
    data = ["--data-path", str(root / "pre_text_document"), "--split", "80,20,0", "--tokenizer-type",
            "PretrainedFromHF", "--tokenizer-name-or-path", tok]
    return ["--hf-config", hf_dir, "--load", start, "--finetune", *BATCH], data


def _pretrain(flags, out):
    return run_pretrain(1, flags, out), rank_stdout(out, 0).read_text()


def test_eval_loss_is_a_forward_over_the_validation_batches(setup, tmp_path, world1):
    from npu_dsv3.model import load_hf
    from npu_dsv3.training.data import pretrain_datasets
    from npu_dsv3.training.checkpointing import load_checkpoint

    model_flags, data = setup
    flags = [*model_flags, *data, "--train-iters", "2", "--eval-interval", "1", "--eval-iters", "2",
             "--save", str(tmp_path / "ckpt")]
    records, stdout = _pretrain(flags, tmp_path / "run.jsonl")
    assert [r["iteration"] for r in records] == [1, 2]
    loss = records[1]["eval_lm_loss"]
    assert records[1]["eval_lm_ppl"] == pytest.approx(math.exp(loss), rel=1e-12)
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(" validation loss at iteration 2 |"))
    block = lines[at - 1:at + 2]
    assert block[1] == f" validation loss at iteration 2 | lm loss value: {loss:.6E} | lm loss PPL: " \
                       f"{records[1]['eval_lm_ppl']:.6E} | " and block[0] == block[2] == "-" * len(block[1] + " ")

    # The weights after iteration 2 (saved then), on the validation split's global batches 2 and 3
    # (evaluation 1 reads batches 0 and 1): one plain forward per sample.
    _, valid = pretrain_datasets(parse_args(flags, 1, "pretrain"))
    model = load_hf(setup[0][1])
    load_checkpoint(str(tmp_path / "ckpt"), [model], finetune=True)
    total = count = 0.0
    with torch.no_grad():
        for index in range(2 * 4, 4 * 4):
            sample = {k: torch.as_tensor(v)[None] for k, v in valid[index].items()}
            per_token = model(sample["tokens"], sample["position_ids"], None, labels=sample["labels"])
            total += (per_token * sample["loss_mask"]).sum().item()
            count += sample["loss_mask"].sum().item()
    assert count == 2 * 4 * 32  # two global batches of four samples, every token trained
    assert loss == pytest.approx(total / count, rel=1e-6, abs=0)
    assert records[0]["eval_lm_loss"] != pytest.approx(loss, rel=1e-3)  # other batches, other weights


def test_evaluation_does_not_change_training(setup, tmp_path):
    model_flags, _ = setup
    # Evaluation 1 runs before iteration 3, whose expert-bias update iteration 4's routing reads.
    flags = [*model_flags, "--mock-data", "--train-iters", "4"]
    with_eval, stdout = _pretrain([*flags, "--eval-interval", "2", "--eval-iters", "2"], tmp_path / "eval.jsonl")
    without, _ = _pretrain([*flags, "--eval-iters", "0"], tmp_path / "plain.jsonl")
    assert [("eval_lm_loss" in r) for r in with_eval] == [False, True, False, True]
    assert not any("eval_lm_loss" in r for r in without)
    assert stdout.count(" validation loss at iteration ") == 2
    for a, b in zip(with_eval, without):
        assert {k: v for k, v in a.items() if not k.startswith("eval_")}.keys() == b.keys()
        assert (a["lm_loss"], a["grad_norm"], a["lr"]) == (b["lm_loss"], b["grad_norm"], b["lr"])


def test_mock_validation_batches_are_another_seed_stream(setup, world1):
    from npu_dsv3.training.data import mock_microbatches

    args = parse_args([*setup[0], "--mock-data", "--train-iters", "4"], 1)
    train = [b["tokens"] for i in range(4) for b in mock_microbatches(args, i)]
    valid = [b["tokens"] for i in range(4) for b in mock_microbatches(args, i, validation=True)]
    assert all(not torch.equal(t, v) for t in train for v in valid)
    again = [b["tokens"] for i in range(4) for b in mock_microbatches(args, i, validation=True)]
    assert all(torch.equal(v, w) for v, w in zip(valid, again))
