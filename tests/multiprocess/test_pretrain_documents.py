"""Pretraining on preprocessed text with --reset-position-ids (MindSpeed-LLM) or --reset-attention-mask
(megatron): the documents of each sequence are kept apart, so the lm loss equals transformers' run on
every document on its own; without either flag a sequence is one causal stream."""

import pytest
import torch

from npu_dsv3.arguments import parse_args
from npu_dsv3.cli import main
from npu_dsv3.data import corpus
from npu_dsv3.tiny_model import make_hf_model, save_hf

from support.pretrain_runs import run_pretrain

pytestmark = pytest.mark.slow  # several training processes each

SEQ, GBS = 64, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("documents")
    tok = corpus.build_tokenizer(str(root / "tok"))
    prefix = str(root / "corpus")
    assert main(["data", "preprocess", "--input", corpus.path("pretrain.jsonl"), "--output-prefix", prefix,
                 "--tokenizer-name-or-path", tok, "--append-eod"]) == 0
    hf_dir = save_hf(make_hf_model(seed=11, vocab_size=800, num_hidden_layers=2), str(root / "hf"))
    start = str(root / "start")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", start, "--save-format", "torch_dist",
                 "--no-progress"]) == 0
    flags = ["--hf-config", hf_dir, "--load", start, "--finetune", "--data-path", prefix + "_text_document",
             "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", tok, "--split", "100,0,0",
             "--seq-length", str(SEQ), "--micro-batch-size", "2", "--global-batch-size", str(GBS),
             "--train-iters", "1", "--lr", "1e-3", "--eval-iters", "0", "--log-interval", "1"]
    return root, hf_dir, flags


def _first_loss(flags, out) -> float:
    return run_pretrain(1, flags, out)[0]["lm_loss"]


def _transformers_loss(hf_dir, flags, apart: bool) -> tuple:
    """The first global batch as the run reads it, through DeepseekV3ForCausalLM: each document alone
    (``apart``) or each sequence whole; and how many documents the batch held."""
    from transformers import AutoModelForCausalLM

    from npu_dsv3.training.data import pretrain_datasets

    args = parse_args(flags, world_size=1, mode="pretrain")
    train, _ = pretrain_datasets(args)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    total, count, documents = 0.0, 0, 0
    with torch.no_grad():
        for i in range(GBS):
            sample = {k: torch.as_tensor(v) for k, v in train[i].items()}
            starts = torch.nonzero(sample["position_ids"] == 0).flatten().tolist() if apart else [0]
            documents += len(starts)
            for begin, end in zip(starts, starts[1:] + [SEQ]):
                logits = model(sample["tokens"][None, begin:end]).logits[0].double()
                total += torch.nn.functional.cross_entropy(logits, sample["labels"][begin:end], reduction="sum")
                count += end - begin
    return float(total) / count, documents


@pytest.mark.parametrize("flag", ["--reset-position-ids", "--reset-attention-mask", None])
def test_documents_attend_only_to_themselves(setup, tmp_path, flag):
    root, hf_dir, flags = setup
    flags = flags + ([flag] if flag else [])
    expected, documents = _transformers_loss(hf_dir, flags + ["--reset-position-ids"], apart=flag is not None)
    if flag:
        assert documents >= 2 * GBS  # the sequences really hold several documents
    assert _first_loss(flags, tmp_path / "run.jsonl") == pytest.approx(expected, rel=1e-5, abs=0)
