"""LoRA training on several gloo processes: from the same base and the same batches, every layout's lm
loss, MTP loss and grad norm per iteration (the adapters' gradients only: the base is frozen) equal the
single-process run; the base stays bit-identical; a --lora-ckpt-filter save resumed with --lora-load
continues the run exactly."""

import pytest
import torch

from npu_dsv3.checkpoint.safe_load import load_torch
from npu_dsv3.cli import main
from npu_dsv3.lora.targets import is_lora_param
from npu_dsv3.tiny_model import make_hf_model, save_hf

from support.checkpoint_files import hf_tensors
from support.pretrain_runs import run_pretrain

pytestmark = pytest.mark.slow  # several training processes each

ITERS = 3
LORA = ["--lora-target-modules", "linear_qkv", "linear_qb", "linear_kvb", "linear_proj", "linear_fc1", "linear_fc2",
        "output_layer", "--lora-r", "4", "--lora-alpha", "8", "--moe-grouped-gemm"]
COMMON = ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "16",
          "--train-iters", str(ITERS), "--log-interval", "1", "--eval-iters", "0", "--finetune", *LORA]
# Adam turns a gradient that is rounding noise in one layout and exactly zero in another into a full step;
# the layouts are compared with SGD (big steps, so the adapters' B moves off zero), Adam where it is the point.
OPTIMIZERS = {"sgd": ["--optimizer", "sgd", "--lr", "0.5"], "adam": ["--lr", "1e-2"]}
TP2_SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
PP2 = ["--pipeline-model-parallel-size", "2"]
# name: (world size, optimizer, flags)
LAYOUTS = {
    "tp2-sp": (2, "sgd", TP2_SP),  # expert TP 2 (the default): fc1's A and fc2's B whole on both expert-TP ranks
    "tp2-sp-lora-fusion": (2, "sgd", [*TP2_SP, "--lora-fusion"]),
    "ep2": (2, "sgd", ["--expert-model-parallel-size", "2"]),
    "tp2-ep2-sp-etp1": (4, "sgd", [*TP2_SP, "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size",
                                   "1"]),
    "tp2-sp-moe-tp-extend-ep": (2, "sgd", [*TP2_SP, "--moe-tp-extend-ep"]),
    # adapters on the split up-projections, named as the unsplit model's (the reference is unsplit); MTP's too
    "tp2-sp-mla-mm-split": (2, "sgd", [*TP2_SP, "--mla-mm-split"]),
    "pp2-vpp-full-recompute": (2, "sgd", [*PP2, "--num-layers-per-virtual-pipeline-stage", "1",
                                          "--recompute-granularity", "full", "--recompute-method", "uniform",
                                          "--recompute-num-layers", "1"]),
    "pp2-dualpipev": (2, "sgd", [*PP2, "--schedules-method", "dualpipev"]),
    "pp2-dualpipev-fb-overlap": (2, "sgd", [*PP2, "--schedules-method", "dualpipev", "--moe-fb-overlap"]),
    "dp2-distributed-optimizer": (2, "adam", ["--use-distributed-optimizer"]),
}


def _run(world, flags, start, out, optimizer="adam"):
    hf_dir, weights, _ = start
    return run_pretrain(world, ["--hf-config", hf_dir, "--load", weights, *COMMON, *OPTIMIZERS[optimizer], *flags],
                        out)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny model with MTP, its starting weights (torch_dist), and the single-process LoRA run."""
    root = tmp_path_factory.mktemp("lora")
    hf_dir = save_hf(make_hf_model(seed=3, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
                     str(root / "hf"), with_mtp=True)
    weights = str(root / "start")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", weights, "--save-format", "torch_dist",
                 "--no-progress"]) == 0
    reference = {opt: run_pretrain(1, ["--hf-config", hf_dir, "--load", weights, *COMMON, *flags],
                                   root / f"single-{opt}.jsonl") for opt, flags in OPTIMIZERS.items()}
    return hf_dir, weights, reference


def _same(records, reference):
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    for ours, single in zip(records, reference):
        for key in ("lm_loss", "grad_norm", "mtp_loss"):
            assert ours[key] == pytest.approx(single[key], rel=2e-6, abs=0), key


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_layout_matches_the_single_process_run(start, tmp_path, name):
    world, optimizer, flags = LAYOUTS[name]
    _same(_run(world, flags, start, tmp_path / "run.jsonl", optimizer), start[2][optimizer])


def test_the_adapters_learn_and_the_base_stays_bit_identical(start, tmp_path):
    hf_dir, _, reference = start
    reference = reference["adam"]
    legacy = str(tmp_path / "legacy")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", legacy, "--moe-grouped-gemm",
                 "--no-progress"]) == 0
    before = load_torch(str(tmp_path / "legacy" / "release" / "mp_rank_00" / "model_optim_rng.pt"))["model"]
    save = tmp_path / "save"
    records = run_pretrain(1, ["--hf-config", hf_dir, "--load", legacy, *COMMON, *OPTIMIZERS["adam"],
                               "--ckpt-format", "torch", "--save", str(save)], tmp_path / "run.jsonl")
    _same(records, reference)
    assert records[-1]["lm_loss"] < records[0]["lm_loss"]
    after = load_torch(str(save / f"iter_{ITERS:07d}" / "mp_rank_00" / "model_optim_rng.pt"))
    base = {k: v for k, v in after["model"].items() if not is_lora_param(k) and not k.endswith("_extra_state")}
    assert base.keys() == {k for k in before if not k.endswith("_extra_state")}
    assert all(torch.equal(base[k], before[k]) for k in base)
    adapters = {k: v for k, v in after["model"].items() if is_lora_param(k)}
    assert adapters and any(k.endswith("lora_B") and v.abs().sum() > 0 for k, v in adapters.items())
    assert any(k.startswith("mtp.") for k in adapters) and any("experts.lora_fc1_B" in k for k in adapters)


@pytest.mark.parametrize("ckpt_format", ["torch_dist", "torch"])
def test_a_filtered_save_resumes_with_lora_load_exactly(start, tmp_path, ckpt_format):
    """Save only the adapters at iteration 2, resume them on the base with --lora-load: iteration 3 is the
    uninterrupted run's."""
    hf_dir, weights, reference = start
    reference = reference["adam"]
    save = tmp_path / "lora"
    flags = [f for f in COMMON if f != "--finetune"] + OPTIMIZERS["adam"]
    run_pretrain(1, ["--hf-config", hf_dir, "--load", weights, "--finetune", *flags, "--train-iters", "2",
                     "--lr-decay-iters", str(ITERS), "--save", str(save), "--lora-ckpt-filter",
                     "--ckpt-format", ckpt_format], tmp_path / "first.jsonl")
    stored = sorted(p.name for p in (save / "iter_0000002").rglob("*") if p.is_file())
    assert stored and (save / "lora_config.json").is_file()
    resumed = run_pretrain(1, ["--hf-config", hf_dir, "--load", weights, "--lora-load", str(save), *flags,
                               "--ckpt-format", ckpt_format], tmp_path / "second.jsonl")
    assert [r["iteration"] for r in resumed] == [3]
    assert resumed[0]["lm_loss"] == reference[2]["lm_loss"]
    assert resumed[0]["grad_norm"] == pytest.approx(reference[2]["grad_norm"], rel=1e-12)
    another_layout = ["--hf-config", hf_dir, "--load", weights, "--lora-load", str(save), *flags, *TP2_SP,
                      "--ckpt-format", ckpt_format]
    if ckpt_format == "torch_dist":  # the adapters are stored layout-free: another layout resumes them
        other = run_pretrain(2, another_layout, tmp_path / "tp2.jsonl")
        assert [r["iteration"] for r in other] == [3]
        assert other[0]["lm_loss"] == pytest.approx(reference[2]["lm_loss"], rel=2e-6, abs=0)
    else:  # per-rank files of one layout: one line naming the flag
        with pytest.raises(AssertionError, match="exited with 2: .*(written for|saved with) another layout"):
            run_pretrain(2, another_layout, tmp_path / "tp2.jsonl")


@pytest.mark.parametrize("ckpt_format", ["torch", "torch_dist"])
def test_a_sharded_lora_checkpoint_merges_and_exports_for_peft(start, tmp_path, ckpt_format):
    """TP2 x EP2 (expert TP 2) adapters saved alone: merged into the base they equal the single-process run's
    merge; exported as a PEFT adapter, transformers + PEFT give the merged model's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf_dir, weights, _ = start

    def train(world, flags, save):
        run_pretrain(world, ["--hf-config", hf_dir, "--load", weights, *COMMON, *OPTIMIZERS["sgd"], "--train-iters",
                             "2", "--save", str(save), "--ckpt-format", ckpt_format, *flags], save.with_suffix(".jsonl"))

    train(1, [], tmp_path / "single")
    train(4, [*TP2_SP, "--expert-model-parallel-size", "2", "--lora-ckpt-filter"], tmp_path / "sharded")
    assert main(["convert", "mcore2hf", "--load-dir", str(tmp_path / "single"), "--save-dir",
                 str(tmp_path / "merged_single"), "--no-progress"]) == 0
    assert main(["convert", "mcore2hf", "--load-dir", weights, "--lora-load", str(tmp_path / "sharded"), "--lora-r",
                 "4", "--save-dir", str(tmp_path / "merged"), "--no-progress"]) == 0
    ours, single = (hf_tensors(tmp_path / d) for d in ("merged", "merged_single"))
    base = hf_tensors(hf_dir)
    assert ours.keys() == single.keys() == base.keys()
    changed = [n for n in ours if not torch.equal(ours[n], base[n])]
    assert any(".experts.5.up_proj" in n for n in changed) and "lm_head.weight" in changed
    for name in ours:
        torch.testing.assert_close(ours[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
    assert main(["convert", "mcore2hf", "--load-dir", str(tmp_path / "sharded"), "--save-lora-to-hf", "--save-dir",
                 str(tmp_path / "adapter"), "--no-progress"]) == 0
    ids = torch.randint(0, 203, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)(ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                                         str(tmp_path / "adapter"))(ids).logits
    assert ((peft - merged).abs().max() / merged.abs().max()).item() < 1e-5


def test_a_peft_adapter_starts_training_on_any_layout(start, tmp_path):
    """--lora-load a PEFT adapter directory: TP2 x EP2 continues from it exactly as one process does."""
    hf_dir, weights, reference = start
    save, adapter = tmp_path / "lora", tmp_path / "adapter"
    run_pretrain(1, ["--hf-config", hf_dir, "--load", weights, *COMMON, *OPTIMIZERS["sgd"], "--train-iters", "1",
                     "--save", str(save), "--lora-ckpt-filter"], tmp_path / "first.jsonl")
    assert main(["convert", "mcore2hf", "--load-dir", str(save), "--save-lora-to-hf", "--save-dir", str(adapter),
                 "--no-progress"]) == 0
    flags = ["--hf-config", hf_dir, "--load", weights, *COMMON, *OPTIMIZERS["sgd"], "--lora-load", str(adapter)]
    single = run_pretrain(1, flags, tmp_path / "single.jsonl")
    assert single[0]["lm_loss"] != reference["sgd"][0]["lm_loss"]  # the adapter's updates are in
    _same(run_pretrain(4, [*flags, *TP2_SP, "--expert-model-parallel-size", "2"], tmp_path / "sharded.jsonl"),
          single)


def test_bf16_trains_fp32_masters_of_the_adapters_only(start, tmp_path):
    """--bf16: the adapters compute in bf16 and the optimizer keeps fp32 masters of them, and of nothing else."""
    hf_dir, weights, _ = start
    save = tmp_path / "save"
    records = run_pretrain(1, ["--hf-config", hf_dir, "--load", weights, *COMMON, *OPTIMIZERS["adam"], "--bf16",
                               "--train-iters", "1", "--ckpt-format", "torch", "--save", str(save)],
                           tmp_path / "run.jsonl")
    assert len(records) == 1
    payload = load_torch(str(save / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"))
    adapters = {k: v for k, v in payload["model"].items() if is_lora_param(k)}
    assert adapters and all(v.dtype == torch.bfloat16 for v in adapters.values())

    def masters(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "fp32_from_fp16_params":
                    yield from (t for group in value for t in group)
                else:
                    yield from masters(value)
        elif isinstance(node, (list, tuple)):
            for value in node:
                yield from masters(value)

    found = list(masters(payload["optimizer"]))
    assert found and all(t.dtype == torch.float32 for t in found)
    assert sum(t.numel() for t in found) == sum(v.numel() for v in adapters.values())
