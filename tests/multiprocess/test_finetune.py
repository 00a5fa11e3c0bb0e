"""`python -m npu_dsv3.finetune`: supervised fine-tuning on the instruction data `npu-dsv3 data
preprocess` writes, packed (documents apart through megatron's THD format) or padded per micro-batch.

Oracles: transformers' DeepseekV3ForCausalLM on every document of the preprocessed files on its own,
the loss taken on reply tokens only; and, for every layout, the single-process run."""

import json
import os
import shlex
import subprocess
import sys

import numpy
import pytest
import torch

from npu_dsv3.arguments import ArgsError, parse_args
from npu_dsv3.cli import main
from npu_dsv3.data import corpus
from npu_dsv3.data.handlers import IGNORE_INDEX
from npu_dsv3.tiny_model import make_hf_model, save_hf

from support import RELEASED_CONFIG, SHELL
from support.pretrain_runs import rank_stdout, run_pretrain

pytestmark = pytest.mark.slow  # several training processes each

ITERS = 3
RECORDS = 16  # alpaca records: six packs of 128 tokens
# 1024 rows: a multiple of 128 x TP, so no padded vocabulary row enters the softmax the oracle lacks.
MODEL = dict(seed=7, vocab_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)


def _indexed(prefix, key):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(f"{prefix}_packed_{key}_document")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tokenizer, packed and unpacked instruction data, the model and its starting checkpoint."""
    root = tmp_path_factory.mktemp("finetune")
    tok = corpus.build_tokenizer(str(root / "tok"))
    with open(corpus.path("alpaca.jsonl"), encoding="utf-8") as f:
        (root / "alpaca.jsonl").write_text("".join(f.readlines()[:RECORDS]), encoding="utf-8")
    common = ["data", "preprocess", "--input", str(root / "alpaca.jsonl"), "--tokenizer-name-or-path", tok,
              "--handler-name", "AlpacaStyleInstructionHandler", "--seq-length", "128"]
    assert main([*common, "--output-prefix", str(root / "packed"), "--pack"]) == 0
    assert main([*common, "--output-prefix", str(root / "plain")]) == 0
    hf_dir = save_hf(make_hf_model(**MODEL), str(root / "hf"))
    start = str(root / "start")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", start, "--save-format", "torch_dist",
                 "--target-tensor-parallel-size", "2", "--no-progress"]) == 0
    return root, tok, hf_dir, start


def _variant(setup, name):
    """(data prefix, flags, training sample indices): every iteration's global batch is the whole
    training split, whose loss is the same in any order; the other samples are the validation split."""
    root, tok, hf_dir, start = setup
    prefix = str(root / ("packed" if name == "packed" else "plain"))
    count = len(_indexed(prefix, "input_ids"))
    train = count - 1 - (count - 1) % 2  # even: two samples per micro-batch
    data = (["--reset-attention-mask"] if name == "packed" else ["--variable-seq-lengths"])
    flags = ["--data-path", prefix, *data, "--split", f"{train},{count - train},0", "--seq-length", "128",
             "--micro-batch-size", "2", "--global-batch-size", str(train), "--train-iters", str(ITERS),
             "--eval-interval", "2", "--eval-iters", "1", "--lr", "1e-3", "--lr-decay-style", "constant",
             "--hf-config", hf_dir, "--load", start, "--tokenizer-type", "PretrainedFromHF",
             "--tokenizer-name-or-path", tok, "--stage", "sft", "--is-instruction-dataset", "--prompt-type",
             "deepseek3"]
    return prefix, flags, range(train)


def _run(world, flags, out):
    records = run_pretrain(world, ["--log-interval", "1", *flags], out, module="npu_dsv3.finetune")
    return records, rank_stdout(out, world - 1).read_text()


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    """The single-process run of each data variant: (records, stdout)."""
    runs = {}

    def get(name):
        if name not in runs:
            _, flags, _ = _variant(setup, name)
            runs[name] = _run(1, flags, tmp_path_factory.mktemp(name) / "run.jsonl")
        return runs[name]

    return get


def _transformers_sft_loss(hf_dir, prefix, samples) -> float:
    """Each document of the raw files through DeepseekV3ForCausalLM alone; the loss on the tokens
    whose stored label is not IGNORE_INDEX (the replies), token-weighted over all of them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    ids, labels, docs = (_indexed(prefix, k) for k in ("input_ids", "labels", "attention_mask"))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in samples:
            doc = numpy.asarray(docs[i])
            for d in numpy.unique(doc[doc != 0]):
                tokens = torch.from_numpy(numpy.asarray(ids[i])[doc == d].astype(numpy.int64))
                targets = torch.from_numpy(numpy.asarray(labels[i])[doc == d].astype(numpy.int64))[1:]
                logits = model(tokens[None]).logits[0, :-1].double()
                total += torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX,
                                                           reduction="sum").item()
                count += int((targets != IGNORE_INDEX).sum())
    return total / count


@pytest.mark.parametrize("name", ["packed", "variable"])
def test_sft_loss_equals_transformers_on_each_document(setup, single, name):
    prefix, _, train = _variant(setup, name)
    records, _ = single(name)
    if name == "packed":  # packs really hold several documents (numbered from 1; 0 is padding)
        docs = _indexed(prefix, "attention_mask")  # kept alive: items view its mmap
        assert max(len(numpy.unique(docs[i][docs[i] != 0])) for i in train) >= 2
    assert records[0]["lm_loss"] == pytest.approx(_transformers_sft_loss(setup[2], prefix, train), rel=1e-6, abs=0)


@pytest.mark.parametrize("name", ["packed", "variable"])
def test_sft_iterations_lower_the_loss_and_evaluate(single, name):
    records, stdout = single(name)
    losses = [r["lm_loss"] for r in records]
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    assert losses[0] > losses[1] > losses[2] and losses[2] < losses[0] - 0.2, losses
    assert [("eval_lm_loss" in r) for r in records] == [False, True, True]  # every 2 iterations and at the end
    assert records[2]["eval_lm_loss"] < records[1]["eval_lm_loss"]
    assert f"validation loss at iteration 2 | lm loss value: {records[1]['eval_lm_loss']:.6E}" in stdout


LAYOUTS = {
    "packed-pp2": ("packed", ["--pipeline-model-parallel-size", "2"]),
    "packed-tp2-sp": ("packed", ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "variable-pp2": ("variable", ["--pipeline-model-parallel-size", "2"]),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_matches_the_single_process_run(setup, single, tmp_path, layout):
    name, extra = LAYOUTS[layout]
    _, flags, _ = _variant(setup, name)
    # The learning rate is constant: the first two iterations (and the evaluation at 2) do not
    # depend on --train-iters.
    records, _ = _run(2, [*flags, *extra, "--train-iters", "2"], tmp_path / "run.jsonl")
    reference, _ = single(name)
    assert len(records) == 2 and "eval_lm_loss" in records[1]
    for ours, one in zip(records, reference):
        for key in ("lm_loss", "grad_norm", "eval_lm_loss"):
            if key in one:
                assert ours[key] == pytest.approx(one[key], rel=1e-6, abs=0), (ours["iteration"], key)


# LoRA SFT on the unpacked data (--variable-seq-lengths): SGD with big steps, so the adapters' B leaves zero
LORA = ["--lora-target-modules", "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "--lora-r", "4",
        "--lora-alpha", "8", "--moe-grouped-gemm", "--optimizer", "sgd", "--lr", "0.5"]


def test_lora_sft_on_variable_lengths_matches_the_single_process_run(setup, tmp_path):
    _, flags, _ = _variant(setup, "variable")
    flags = [*flags, *LORA, "--train-iters", "2"]
    one, _ = _run(1, flags, tmp_path / "one.jsonl")
    two, _ = _run(2, [*flags, "--tensor-model-parallel-size", "2", "--sequence-parallel"], tmp_path / "two.jsonl")
    assert one[1]["lm_loss"] < one[0]["lm_loss"]
    for ours, single in zip(two, one):
        for key in ("lm_loss", "grad_norm", "eval_lm_loss"):
            if key in single:
                assert ours[key] == pytest.approx(single[key], rel=2e-6, abs=0), (ours["iteration"], key)


def _source(setup, *extra, name="packed"):
    """The data source a run with these flags would read (its checks included), or the flags' error."""
    from npu_dsv3.training.data import instruction_source

    _, flags, _ = _variant(setup, name)
    return instruction_source(parse_args([*flags, *extra], 1, "finetune"))


def test_bad_input_is_one_clear_line(setup, tmp_path):
    root, tok, hf_dir, _ = setup
    assert main(["data", "preprocess", "--input", corpus.path("pretrain.jsonl"), "--tokenizer-name-or-path", tok,
                 "--output-prefix", str(tmp_path / "pre"), "--append-eod"]) == 0
    data_errors = [
        (("--data-path", str(tmp_path / "pre")), ValueError, "pre_text_document.bin/.idx is pretraining data"),
        (("--data-path", str(tmp_path / "pre_text_document")), ValueError, "is pretraining data"),
        (("--data-path", str(tmp_path / "none")), FileNotFoundError, "none_packed_input_ids_document.bin"),
        (("--data-path", "1", str(root / "packed"), "1", str(root / "plain")), ValueError,
         "one instruction dataset prefix"),
        (("--seq-length", "64"), ValueError, "a sample of 128 tokens, longer than --seq-length 64"),
        (("--split", "99,1,0", "--global-batch-size", "2"), ValueError, "gives the validation split none"),
    ]
    for extra, error, message in data_errors:
        with pytest.raises(error) as caught:
            _source(setup, *extra)
        assert message in str(caught.value) and "\n" not in str(caught.value), (extra, str(caught.value))

    _, flags, _ = _variant(setup, "packed")
    not_instruction = _without(flags, ["--is-instruction-dataset", "--prompt-type"])
    flag_errors = [
        (not_instruction, "--stage: fine-tuning on instruction data needs --is-instruction-dataset"),
        (_without(not_instruction, ["--stage"]) + ["--variable-seq-lengths"],
         "--variable-seq-lengths: fine-tuning on instruction data needs --is-instruction-dataset"),
        (flags + ["--split", "100,0,0"], "--eval-iters 1 evaluates on the validation split, and --split 100,0,0 "
                                         "gives it nothing"),
        (_without(flags, ["--reset-attention-mask"]) + ["--reset-position-ids"],
         "--reset-position-ids restarts positions per packed sample only together with --reset-attention-mask"),
    ]
    for argv, message in flag_errors:
        with pytest.raises(ArgsError) as caught:
            parse_args(argv, 1, "finetune")
        assert message in str(caught.value) and "\n" not in str(caught.value), str(caught.value)

    # The entry point prints exactly one line, no traceback.
    proc = subprocess.run([sys.executable, "-m", "npu_dsv3.finetune", *not_instruction], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert errors == ["npu_dsv3.finetune: error: " + flag_errors[0][1] + " (--data-path: the prefix npu-dsv3 data "
                      "preprocess wrote with an instruction handler)"], proc.stderr[-2000:]


def _without(flags, names):
    """``flags`` without the flags ``names`` and their values."""
    out, skipping = [], False
    for arg in flags:
        if arg.startswith("--"):
            skipping = arg in names
        if not skipping:
            out.append(arg)
    return out


@pytest.mark.parametrize("chip,per_node,nodes", [("a3", 16, 16), ("a2", 8, 32)])
def test_recipe_dry_run_is_a_finetune_run_of_the_a3_layout(tmp_path, chip, per_node, nodes):
    with open(RELEASED_CONFIG) as f:
        config = json.load(f)
    config.pop("quantization_config")  # the BF16 model directory
    (tmp_path / "config.json").write_text(json.dumps(config))
    recipe = str(SHELL / f"tune_deepseek3_671b_4k_full_{chip}.sh")
    env = {**os.environ, "HF_DIR": str(tmp_path), "CKPT_LOAD_DIR": "/ckpt/in", "DATA_PATH": "/data/alpaca",
           "CKPT_SAVE_DIR": "/ckpt/out", "DRY_RUN": "1"}
    proc = subprocess.run(["bash", recipe], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    assert argv[:7] == ["torchrun", "--nproc-per-node", str(per_node), "--nnodes", str(nodes), "--node-rank", "0"]
    args = parse_args(argv[argv.index("npu_dsv3.finetune") + 1:], 16 * 16, "finetune")
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size,
            args.noop_layers, args.moe_tp_extend_ep, args.sequence_parallel) == (2, 16, 8, [47, 62, 63], True, True)
    assert args.is_instruction_dataset and args.stage == "sft" and args.reset_attention_mask and args.finetune
    assert (args.load, args.data_path, args.save, args.num_microbatches, args.eval_iters) == (
        "/ckpt/in", ["/data/alpaca"], "/ckpt/out", 128, 0)
    unpacked = subprocess.run(["bash", recipe], capture_output=True, text=True, timeout=60,
                              env={**env, "PACKED": "0", "EXTRA_ARGS": "--log-throughput"})
    words = unpacked.stdout.split()
    assert "--variable-seq-lengths" in words and "--reset-attention-mask" not in words
    assert words[-1] == "--log-throughput"
    missing = subprocess.run(["bash", recipe], capture_output=True, text=True,
                             env={k: v for k, v in env.items() if k != "DATA_PATH"}, timeout=60)
    assert missing.returncode != 0 and "set DATA_PATH" in missing.stderr
