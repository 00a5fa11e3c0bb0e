"""``npu-dsv3 demo``: the main job on the embedded default, on any machine with 2+ cores.

1. trains the bundled corpus's tokenizer and builds a tiny random DeepSeek-V3
   (MLA, grouped sigmoid router with expert bias, shared experts, a dense first
   layer, YaRN, MTP) as an HF checkpoint, and checks our megatron-core model
   against transformers' logits;
2. preprocesses the bundled corpus into megatron's ``.bin/.idx``;
3. converts the HF weights to a distributed checkpoint, the starting point;
4. pretrains over several processes (``torchrun -m npu_dsv3.pretrain``; by default
   TP 2 with sequence parallelism x PP 2 x EP 2 on 4 gloo processes), logging
   every iteration and saving the last one;
5. converts the trained checkpoint to HF and checks it against transformers again;
6. LoRA-tunes the trained checkpoint on the bundled instruction corpus with the same processes
   (adapters on every linear, routed experts included; only the adapters saved);
7. exports the adapters as a PEFT adapter and checks transformers + PEFT against our model with the
   adapters, in fp32.

Exit code 0 only if every parity check passes and the pretraining loss clearly fell.
"""

import json
import os
import subprocess
import sys
import time

from npu_dsv3.argtypes import positive_int
from npu_dsv3.cli import main as cli
from npu_dsv3.layout import add_layout_flags

# The loss must end below this fraction of where it started (mean of the first and last 5 iterations).
LOSS_FALL = 0.8


def add_parser(subparsers):
    p = subparsers.add_parser("demo", help="tiny DeepSeek-V3 end to end: data, multi-process training, HF export, "
                                           "parity with transformers")
    p.add_argument("--workdir", default="runs/demo", help="where everything is written (default %(default)s)")
    p.add_argument("--train-iters", type=positive_int, default=40, help="training iterations (default %(default)s)")
    add_layout_flags(p, {"tensor_model_parallel_size": "tensor-parallel size of the run (default %(default)s)",
                         "pipeline_model_parallel_size": "pipeline-parallel size of the run (default %(default)s)",
                         "expert_model_parallel_size": "expert-parallel size of the run (default %(default)s)"})
    # The demo runs a fixed small layout, not the "not given" of training's flags.
    p.set_defaults(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, expert_model_parallel_size=2)
    p.add_argument("--seq-length", type=positive_int, default=64, help="tokens per sequence (default %(default)s)")
    p.add_argument("--global-batch-size", type=positive_int, default=8,
                   help="sequences per iteration (default %(default)s)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default %(default)s)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the data and the model (default %(default)s)")
    return p


STEPS = 7
LORA = ["--lora-target-modules", "linear_qkv", "linear_qb", "linear_kvb", "linear_proj", "linear_fc1", "linear_fc2",
        "output_layer", "--lora-r", "8", "--lora-alpha", "16", "--moe-grouped-gemm", "--lora-ckpt-filter"]
LORA_ITERS = 6
# transformers + PEFT against our model with the same adapters (fp32)
LORA_TOLERANCE = 1e-5


def _step(number: int, text: str) -> float:
    print(f"[demo {number}/{STEPS}] {text}", flush=True)
    return time.perf_counter()


def _model(workdir: str, seed: int) -> tuple:
    from transformers import AutoTokenizer

    from npu_dsv3.data.corpus import build_tokenizer
    from npu_dsv3.tiny_model import make_hf_model, save_hf, yarn

    tokenizer = build_tokenizer(os.path.join(workdir, "tokenizer"))
    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    # Four heads and four layers: TP 2 splits the heads, PP 2 the layers (one dense, three MoE).
    model = make_hf_model(seed=seed, vocab_size=vocab, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=4, rope_parameters=yarn(factor=8.0))
    hf_dir = save_hf(model, os.path.join(workdir, "hf"), with_mtp=True)
    for name in os.listdir(tokenizer):
        os.replace(os.path.join(tokenizer, name), os.path.join(hf_dir, name))
    os.rmdir(tokenizer)
    return hf_dir, vocab


def _layout(args) -> list:
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--expert-model-parallel-size", str(ep), "--expert-tensor-parallel-size", "1",
            *(["--sequence-parallel"] if tp > 1 else [])]


def _train(args, hf_dir: str, data: str, start: str, checkpoints: str, metrics: str, log: str) -> None:
    flags = [
        "--hf-config", hf_dir, *_layout(args), "--data-path", data, "--tokenizer-type", "PretrainedFromHF", "--tokenizer-name-or-path", hf_dir,
        "--split", "100,0,0", "--seq-length", str(args.seq_length), "--micro-batch-size", "2",
        "--global-batch-size", str(args.global_batch_size), "--train-iters", str(args.train_iters),
        "--lr", f"{args.lr:g}", "--min-lr", f"{args.lr / 10:g}", "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, args.train_iters // 10)), "--seed", str(args.seed),
        "--load", start, "--finetune", "--save", checkpoints, "--save-interval", str(args.train_iters),
        "--log-interval", "1", "--log-jsonl", metrics, "--eval-iters", "0",
    ]
    _launch(args, "npu_dsv3.pretrain", flags, log)


def _lora(args, hf_dir: str, data: str, base: str, save: str, metrics: str, log: str) -> None:
    """A few iterations of LoRA SFT on the instruction data, from the pretrained checkpoint."""
    flags = ["--hf-config", hf_dir, *_layout(args), "--stage", "sft", "--is-instruction-dataset",
             "--prompt-type", "deepseek3", "--data-path", data, "--tokenizer-type", "PretrainedFromHF",
             "--tokenizer-name-or-path", hf_dir, "--split", "100,0,0", "--reset-attention-mask",
             "--seq-length", str(args.seq_length), "--micro-batch-size", "2",
             "--global-batch-size", str(args.global_batch_size), "--train-iters", str(LORA_ITERS), "--lr", "1e-2",
             "--seed", str(args.seed), "--load", base, "--save", save, "--log-interval", "1",
             "--log-jsonl", metrics, "--eval-iters", "0", *LORA]
    _launch(args, "npu_dsv3.finetune", flags, log)


def _launch(args, module: str, flags: list, log: str) -> None:
    world = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
               "-m", module, *flags]
    print(f"  {' '.join(command[1:])}", flush=True)
    # Rank 0's iteration lines come to the terminal; every rank's warnings go to the log file.
    with open(log, "w") as err:
        proc = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=err)
    if proc.returncode:
        with open(log) as err:
            tail = err.read()[-4000:]
        raise RuntimeError(f"{module} failed (exit {proc.returncode}); the end of {log}:\n{tail}")


def _loss_fell(metrics: str) -> tuple:
    with open(metrics) as f:
        losses = [json.loads(line)["lm_loss"] for line in f]
    first, last = sum(losses[:5]) / len(losses[:5]), sum(losses[-5:]) / len(losses[-5:])
    return first, last, last < LOSS_FALL * first


def _peft_parity(hf_dir: str, lora_dir: str, adapter_dir: str) -> float:
    """Max relative difference of transformers + PEFT's logits from our model's with the same adapters."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from npu_dsv3.lora.layers import load_adapters
    from npu_dsv3.lora.sources import adapters_of
    from npu_dsv3.lora.targets import resolve
    from npu_dsv3.model import forward_logits, load_hf

    adapters, description = adapters_of(lora_dir)
    ours = load_hf(hf_dir, lora_rank=description["r"], lora_alpha=description["alpha"],
                   lora_targets=resolve(description["targets"]))
    load_adapters(ours, adapters)
    ids = torch.randint(0, ours.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                                           adapter_dir)(ids).logits
        mine = forward_logits(ours, ids)
    return float((mine - theirs).abs().max() / theirs.abs().max())


def run(args) -> int:
    from npu_dsv3.verify import verify_hf_dir

    work = os.path.abspath(args.workdir)
    paths = {name: os.path.join(work, name)
             for name in ("data", "start", "checkpoints", "hf_trained", "lora", "lora_adapter")}
    paths.update(metrics=os.path.join(work, "metrics.jsonl"), log=os.path.join(work, "train.log"),
                 lora_metrics=os.path.join(work, "lora_metrics.jsonl"))
    os.makedirs(work, exist_ok=True)

    began = _step(1, "tokenizer and tiny DeepSeek-V3, checked against transformers")
    hf_dir, vocab = _model(work, args.seed)
    before = verify_hf_dir(hf_dir)
    print(f"  {hf_dir}: vocabulary {vocab}; parity {json.dumps(before)}", flush=True)

    _step(2, "bundled corpus -> megatron .bin/.idx")
    from npu_dsv3.data.corpus import path as corpus_path

    data = os.path.join(paths["data"], "corpus")
    if cli(["data", "preprocess", "--input", corpus_path("pretrain.jsonl"), "--output-prefix", data,
            "--tokenizer-name-or-path", hf_dir, "--append-eod", "--workers", "2"]):
        return 1

    _step(3, "HF -> distributed checkpoint (the starting weights)")
    if cli(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", paths["start"], "--save-format",
            "torch_dist", "--target-tensor-parallel-size", str(args.tensor_model_parallel_size), "--no-progress"]):
        return 1

    _step(4, f"pretraining, {args.tensor_model_parallel_size * args.pipeline_model_parallel_size} processes")
    _train(args, hf_dir, data + "_text_document", paths["start"], paths["checkpoints"], paths["metrics"],
           paths["log"])
    first, last, fell = _loss_fell(paths["metrics"])

    _step(5, "trained checkpoint -> HF, checked against transformers")
    if cli(["convert", "mcore2hf", "--load-dir", paths["checkpoints"], "--save-dir", paths["hf_trained"],
            "--no-progress"]):
        return 1
    after = verify_hf_dir(paths["hf_trained"], mcore_dir=paths["checkpoints"])

    _step(6, "LoRA fine-tuning of the trained checkpoint on the bundled instruction corpus")
    instructions = os.path.join(paths["data"], "alpaca")
    if cli(["data", "preprocess", "--input", corpus_path("alpaca.jsonl"), "--output-prefix", instructions,
            "--tokenizer-name-or-path", hf_dir, "--handler-name", "AlpacaStyleInstructionHandler",
            "--seq-length", str(args.seq_length), "--pack"]):
        return 1
    _lora(args, hf_dir, instructions, paths["checkpoints"], paths["lora"], paths["lora_metrics"], paths["log"])

    _step(7, "adapters -> PEFT adapter, transformers + PEFT checked against our model")
    if cli(["convert", "mcore2hf", "--load-dir", paths["lora"], "--save-lora-to-hf", "--save-dir",
            paths["lora_adapter"], "--no-progress"]):
        return 1
    lora_diff = _peft_parity(paths["hf_trained"], paths["lora"], paths["lora_adapter"])
    passed = before["passed"] and after["passed"] and fell and lora_diff < LORA_TOLERANCE
    summary = {"passed": passed, "lm_loss_first5": round(first, 4), "lm_loss_last5": round(last, 4),
               "parity_start_rel_diff": before["rel_diff"], "parity_trained_rel_diff": after["rel_diff"],
               "lora_peft_rel_diff": lora_diff, "checkpoint": paths["checkpoints"], "metrics": paths["metrics"],
               "hf_export": paths["hf_trained"], "lora_checkpoint": paths["lora"],
               "lora_adapter": paths["lora_adapter"], "train_log": paths["log"],
               "seconds": round(time.perf_counter() - began, 1)}
    print(json.dumps(summary), flush=True)
    return 0 if passed else 1
