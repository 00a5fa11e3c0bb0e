"""QLoRA training on gloo processes: from an NF4 base (``--qlora-nf4``, legacy files of the layout or torch_dist),
the lm loss, MTP loss and grad norm of every iteration equal those of the single-process LoRA run whose base is
the dequantized NF4 weights (the adapters' gradients: the base is frozen), at world size 1, TP2 x EP2, PP2 and
the other layouts LoRA runs; the adapters export to PEFT and merge; saves resume, dequantized or not."""

import json

import pytest
import torch

from npu_dsv3.checkpoint.safe_load import load_torch
from npu_dsv3.cli import main
from npu_dsv3.tiny_model import make_hf_model, save_hf

from support.checkpoint_files import hf_tensors
from support.pretrain_runs import run_pretrain
from support.qlora import ALIGNED, dequantized_copy

pytestmark = pytest.mark.slow  # several training processes each

ITERS = 3
LORA = ["--lora-target-modules", "linear_qkv", "linear_qb", "linear_kvb", "linear_proj", "linear_fc1", "linear_fc2",
        "output_layer", "--lora-r", "4", "--lora-alpha", "8", "--moe-grouped-gemm"]
COMMON = ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "16",
          "--train-iters", str(ITERS), "--log-interval", "1", "--eval-iters", "0", "--finetune", *LORA,
          "--optimizer", "sgd", "--lr", "0.5"]
TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
TP2_EP2 = [*TP2_SP, "--expert-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]
DIST = ["--save-format", "torch_dist"]
# name: (world size, training layout flags, the converter's: legacy files of the layout, or torch_dist for any)
LAYOUTS = {
    "single": (1, [], []),
    "tp2-ep2-sp": (4, TP2_EP2, ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"]),
    "pp2": (2, PP2, ["--target-pipeline-parallel-size", "2"]),
    "tp2-ep2-sp-from-torch-dist": (4, TP2_EP2, DIST),
    # the split up-projections read their rows of the unsplit NF4 codes
    "tp2-sp-mla-mm-split-from-torch-dist": (2, [*TP2_SP, "--mla-mm-split"], DIST),
    "tp2-sp-moe-tp-extend-ep-lora-fusion-from-torch-dist": (2, [*TP2_SP, "--moe-tp-extend-ep", "--lora-fusion"], DIST),
    "pp2-dualpipev-fb-overlap-from-torch-dist": (2, [*PP2, "--schedules-method", "dualpipev", "--moe-fb-overlap"],
                                                 DIST),
    "pp2-vpp-full-recompute-from-torch-dist": (2, [*PP2, "--num-layers-per-virtual-pipeline-stage", "1",
                                                   "--recompute-granularity", "full", "--recompute-method", "uniform",
                                                   "--recompute-num-layers", "1"], DIST),
}


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """The HF model (with MTP), and the single-process LoRA run on its dequantized NF4 weights."""
    root = tmp_path_factory.mktemp("qlora")
    hf_dir = save_hf(make_hf_model(seed=3, **ALIGNED, num_hidden_layers=4), str(root / "hf"), with_mtp=True)
    dequantized = dequantized_copy(hf_dir, str(root / "hf_dq"))
    base = str(root / "base")
    assert main(["convert", "hf2mcore", "--load-dir", dequantized, "--save-dir", base, "--save-format", "torch_dist",
                 "--no-progress"]) == 0
    reference = run_pretrain(1, ["--hf-config", hf_dir, "--load", base, *COMMON], root / "lora.jsonl")
    return hf_dir, reference, base


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_qlora_matches_lora_on_the_dequantized_base(start, tmp_path, name):
    hf_dir, reference, _ = start
    world, flags, convert_flags = LAYOUTS[name]
    nf4 = str(tmp_path / "nf4")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", nf4, "--qlora-nf4", "--moe-grouped-gemm",
                 "--no-progress", *convert_flags]) == 0
    records = run_pretrain(world, ["--hf-config", hf_dir, "--load", nf4, "--qlora", *COMMON, *flags],
                           tmp_path / "run.jsonl")
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    for ours, single in zip(records, reference):
        for key in ("lm_loss", "grad_norm", "mtp_loss"):
            assert ours[key] == pytest.approx(single[key], rel=2e-6, abs=0), key


def test_a_qlora_adapter_loads_in_peft_and_merges(start, tmp_path):
    """TP2 x EP2 QLoRA adapters saved alone: exported, transformers + PEFT on the dequantized base give our
    QLoRA model's logits; merged into the NF4 base (dequantized, lossy and said so), the same logits again."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from npu_dsv3.lora.layers import shard_adapters
    from npu_dsv3.lora.sources import adapters_of
    from npu_dsv3.model import forward_logits, load_hf

    hf_dir, _, _ = start
    world, flags, convert_flags = LAYOUTS["tp2-ep2-sp"]
    nf4, save = str(tmp_path / "nf4"), tmp_path / "adapters"
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", nf4, "--qlora-nf4", "--moe-grouped-gemm",
                 "--no-progress", *convert_flags]) == 0
    run_pretrain(world, ["--hf-config", hf_dir, "--load", nf4, "--qlora", *COMMON, *flags, "--train-iters", "2",
                         "--save", str(save), "--ckpt-format", "torch", "--lora-ckpt-filter"], tmp_path / "run.jsonl")
    with open(save / "config.json") as f:
        assert "npu_dsv3_nf4" in json.load(f)  # the checkpoints' base is NF4
    assert main(["convert", "mcore2hf", "--load-dir", str(save), "--save-lora-to-hf", "--save-dir",
                 str(tmp_path / "peft"), "--no-progress"]) == 0
    assert main(["convert", "mcore2hf", "--load-dir", nf4, "--lora-load", str(save), "--save-dir",
                 str(tmp_path / "merged"), "--no-progress"]) == 0
    dequantized = dequantized_copy(hf_dir, str(tmp_path / "hf_dq"))
    adapters, description = adapters_of(str(save))
    ours = load_hf(hf_dir, qlora=True, moe_grouped_gemm=True, lora_rank=4, lora_alpha=8.0,
                   lora_targets=tuple(description["targets"]), mtp_num_layers=None)
    shard_adapters(ours, adapters)
    ids = torch.randint(0, 203, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = forward_logits(ours, ids)
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.float32),
                                         str(tmp_path / "peft"))(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)(ids).logits
    assert ((peft - mine).abs().max() / mine.abs().max()).item() < 1e-5
    assert ((merged - mine).abs().max() / mine.abs().max()).item() < 1e-5
    assert adapters and any(v["B"].abs().sum() > 0 for v in adapters.values())


def test_save_dequantize_writes_the_unquantized_model(start, tmp_path):
    """--qlora-save-dequantize: the saved base is the dequantized NF4 weights under the unquantized model's names,
    which a LoRA run of the layout loads and convert mcore2hf merges like any LoRA checkpoint."""
    hf_dir, _, _ = start
    nf4, save = str(tmp_path / "nf4"), tmp_path / "save"
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", nf4, "--qlora-nf4", "--moe-grouped-gemm",
                 "--no-progress"]) == 0
    first = run_pretrain(1, ["--hf-config", hf_dir, "--load", nf4, "--qlora", *COMMON, "--train-iters", "1", "--save",
                             str(save), "--ckpt-format", "torch", "--qlora-save-dequantize"], tmp_path / "run.jsonl")
    with open(save / "config.json") as f:
        assert "npu_dsv3_nf4" not in json.load(f)
    payload = load_torch(str(save / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"))["model"]
    assert not [k for k in payload if "_nf4" in k]
    dequantized = hf_tensors(dequantized_copy(hf_dir, str(tmp_path / "hf_dq")))
    assert torch.equal(payload["decoder.layers.0.self_attention.linear_proj.weight"],
                       dequantized["model.layers.0.self_attn.o_proj.weight"])
    # a LoRA run resumes it: iteration 2 from the saved adapters and the dequantized base
    resumed = run_pretrain(1, ["--hf-config", hf_dir, "--load", str(save), *[f for f in COMMON if f != "--finetune"],
                               "--train-iters", "2", "--ckpt-format", "torch"], tmp_path / "resumed.jsonl")
    assert [r["iteration"] for r in resumed] == [2] and first[0]["lm_loss"] != resumed[0]["lm_loss"]
    assert main(["convert", "mcore2hf", "--load-dir", str(save), "--save-dir", str(tmp_path / "merged"),
                 "--no-progress"]) == 0


def test_a_torch_dist_save_resumes_in_another_layout(start, tmp_path):
    """TP2 x EP2 saves base (NF4) and adapters as torch_dist at iteration 2 (Adam: its state is resharded too);
    EP2 alone resumes it: iteration 3 is the uninterrupted run's."""
    hf_dir, _, _ = start
    nf4, save = str(tmp_path / "nf4"), tmp_path / "save"
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", nf4, "--qlora-nf4", "--moe-grouped-gemm",
                 "--save-format", "torch_dist", "--no-progress"]) == 0
    sgd = COMMON.index("--optimizer")
    flags = ["--hf-config", hf_dir, "--qlora", *[f for f in COMMON[:sgd] if f != "--finetune"], "--lr", "1e-2",
             "--lr-decay-iters", str(ITERS)]
    whole = run_pretrain(1, [*flags, "--load", nf4, "--finetune"], tmp_path / "whole.jsonl")
    run_pretrain(4, [*flags, "--load", nf4, "--finetune", *TP2_EP2, "--train-iters", "2", "--save", str(save)],
                 tmp_path / "first.jsonl")
    with open(save / "config.json") as f:
        assert "npu_dsv3_nf4" in json.load(f)
    resumed = run_pretrain(2, [*flags, "--load", str(save), "--expert-model-parallel-size", "2"],
                           tmp_path / "second.jsonl")
    assert [r["iteration"] for r in resumed] == [3]
    assert resumed[0]["lm_loss"] == pytest.approx(whole[2]["lm_loss"], rel=2e-6, abs=0)


def test_bf16_is_lora_on_the_dequantized_base_in_bf16(start, tmp_path):
    """--bf16 (megatron's Float16Module casts the model; the NF4 scales stay fp32): QLoRA's losses are the bf16
    LoRA run's on the dequantized base."""
    hf_dir, _, base = start
    nf4 = str(tmp_path / "nf4")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", nf4, "--qlora-nf4", "--moe-grouped-gemm",
                 "--no-progress"]) == 0
    flags = ["--hf-config", hf_dir, *COMMON, "--bf16"]
    lora = run_pretrain(1, [*flags, "--load", base], tmp_path / "lora.jsonl")
    qlora = run_pretrain(1, [*flags, "--load", nf4, "--qlora"], tmp_path / "qlora.jsonl")
    for ours, theirs in zip(qlora, lora):
        for key in ("lm_loss", "grad_norm", "mtp_loss"):
            assert ours[key] == theirs[key], key
