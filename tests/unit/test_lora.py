"""LoRA in one process: the flags, the transform (base frozen, B = 0 changes nothing), and the oracles --
transformers + PEFT loaded with our exported adapter, and the merged HF weights, give our logits."""

import json
import re

import pytest
import torch
from peft import PeftModel

from npu_dsv3.arguments import ArgsError, build_configs, parse_args
from npu_dsv3.lora.export import merged_deltas, peft_config, peft_tensors, write_peft_adapter
from npu_dsv3.lora.layers import init_a, local_adapters
from npu_dsv3.lora.targets import ALIASES, CANONICAL, HF_MODULES, TargetError, resolve
from npu_dsv3.model import forward_logits, load_hf
from npu_dsv3.tiny_model import make_hf_model, save_hf

from support.recipes import dry_run

SEED = 3
TOLERANCE = 1e-5  # relative, fp32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_hf(make_hf_model(seed=SEED), str(tmp_path_factory.mktemp("lora_hf")))
    return path


def _ids(n=2, seq=17, seed=0):
    return torch.randint(0, 203, (n, seq), generator=torch.Generator().manual_seed(seed))


def _randomize(model, seed=5, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _adapters(model, vocab):
    out = {k: {kk: vv.detach().clone() for kk, vv in v.items()} for k, v in local_adapters(model).items()}
    if ("output_layer", None) in out:
        out[("output_layer", None)]["B"] = out[("output_layer", None)]["B"][:vocab]  # vocabulary padding
    return out


def _rel(a, b, dtype=torch.float32):
    if dtype == torch.float32:
        return ((a - b).abs().max() / b.abs().max()).item()
    # bf16: rounding may flip a token's routed experts, so the typical error is what is bounded
    return ((a - b).abs().mean() / b.abs().mean()).item()


# --------------------------------------------------------------------------- target names


def test_names_resolve_to_canonical_targets():
    assert resolve(["linear_fc1"]) == ("mlp.linear_fc1", "shared_experts.linear_fc1", "experts.linear_fc1")
    assert resolve(["linear_qkv", "linear_qb", "linear_kvb"]) == (
        "linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj")
    assert resolve(["shared_experts.linear_fc2", "output_layer"]) == ("shared_experts.linear_fc2", "output_layer")
    assert set(HF_MODULES) == set(CANONICAL) and set(ALIASES) >= {"linear_qkv", "linear_qb", "linear_kvb"}
    with pytest.raises(TargetError, match="--lora-target-modules linear_qkvv: not a linear"):
        resolve(["linear_qkvv"])


BASE = ["--micro-batch-size", "1", "--seq-length", "16", "--train-iters", "2", "--lr", "1e-4", "--mock-data"]


def _parse(hf_dir, *extra, world=1):
    return parse_args(["--hf-config", hf_dir, *BASE, *extra], world, "pretrain")


def test_flags_set_the_config(tiny):
    args = _parse(tiny, "--lora-target-modules", "linear_qkv", "experts.linear_fc2", "--lora-r", "8",
                  "--lora-alpha", "16", "--moe-grouped-gemm", "--lora-fusion")
    config = build_configs(args).model
    assert (config.lora_rank, config.lora_alpha, config.lora_fusion) == (8, 16.0, True)
    assert config.lora_targets == ("linear_q_down_proj", "linear_kv_down_proj", "experts.linear_fc2")
    assert config.moe_router_bias_update_rate == 0.0  # the expert bias is part of the frozen base
    defaults = build_configs(_parse(tiny, "--lora-target-modules", "linear_proj")).model
    assert (defaults.lora_rank, defaults.lora_alpha, defaults.lora_dropout) == (16, 32.0, 0.0)
    assert build_configs(_parse(tiny)).model.lora_rank == 0


@pytest.mark.parametrize("extra,message", [
    (["--lora-r", "8"], "--lora-r needs --lora-target-modules"),
    (["--lora-target-modules", "linear_fc9"], "linear_fc9: not a linear"),
    (["--lora-target-modules", "experts.linear_fc1"], "add --moe-grouped-gemm"),
    (["--lora-target-modules", "linear_proj", "--lora-load", "/x"], "--lora-load adds adapters on top"),
    (["--lora-target-modules", "linear_proj", "--lora-dropout", "1.5"], "must lie in"),
    (["--lora-modules-to-save", "word_embeddings"], "--lora-modules-to-save is not supported"),
    (["--lora-register-forward-hook"], "--lora-register-forward-hook is not supported"),
])
def test_bad_lora_flags_are_one_line(tiny, extra, message):
    with pytest.raises(ArgsError, match=message):
        _parse(tiny, *extra)


def test_a_target_the_model_lacks_is_an_error(tmp_path):
    dense = save_hf(make_hf_model(seed=1, first_k_dense_replace=3), str(tmp_path / "dense"))
    with pytest.raises(ArgsError, match="experts.linear_fc1 name no linear of this model"):
        build_configs(_parse(dense, "--lora-target-modules", "experts.linear_fc1", "--moe-grouped-gemm"))


# --------------------------------------------------------------------------- the transform


def test_only_the_adapters_train_and_zero_b_changes_nothing(tiny):
    base = load_hf(tiny)
    model = load_hf(tiny, lora_rank=4, lora_alpha=8, lora_targets=CANONICAL)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("lora_") for n in trainable)
    assert {n for n, _ in base.named_parameters()} == {n for n, _ in model.named_parameters()} - trainable
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(forward_logits(model, ids), forward_logits(base, ids))
    # gradients reach every adapter, and no frozen weight
    model.train()
    _randomize(model)
    loss = model(ids, torch.arange(17).expand(2, 17), None, labels=torch.roll(ids, -1, 1)).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == trainable and all(g.abs().sum() > 0 for g in grads.values())


def test_initialisation_is_peft_s_and_layout_independent(tiny):
    model = load_hf(tiny, lora_rank=4, lora_alpha=8, lora_targets=("linear_proj", "experts.linear_fc1"))
    layer = model.decoder.layers[1]
    a = layer.self_attention.linear_proj.lora_A
    fan_in = a.shape[1]
    assert torch.equal(a, init_a(1234, "model.layers.1.linear_proj", 4, fan_in))
    assert a.abs().max() <= 1 / fan_in ** 0.5 and torch.count_nonzero(layer.self_attention.linear_proj.lora_B) == 0
    experts = layer.mlp.experts
    assert torch.equal(experts.lora_fc1_A[5].t(), init_a(1234, "model.layers.1.mlp.experts.gate_up_proj.5", 4, 72))


@pytest.mark.parametrize("targets", [CANONICAL, ("linear_q_up_proj", "experts.linear_fc2", "mlp.linear_fc1"),
                                     ("experts.linear_fc1", "output_layer")], ids=["all", "mixed", "experts-fc1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_peft_and_the_merged_export_give_our_logits(tiny, tmp_path, targets, dtype):
    r, alpha = 4, 8.0
    model = load_hf(tiny, dtype=dtype, lora_rank=r, lora_alpha=alpha, lora_targets=targets)
    _randomize(model)
    ids = _ids()
    with torch.no_grad():
        ours = forward_logits(model, ids).float()
    adapters = _adapters(model, 203)
    write_peft_adapter(str(tmp_path), peft_tensors(adapters, 3), peft_config(list(targets), r, alpha, 0.0, tiny, False))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["r"] == r and written["lora_alpha"] == alpha
    tolerance = TOLERANCE if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        peft = PeftModel.from_pretrained(make_hf_model(seed=SEED).to(dtype), str(tmp_path))
        assert _rel(ours, peft(ids).logits.float(), dtype) < tolerance
        if dtype != torch.float32:
            return  # a merge into bf16 weights rounds W + BA: the fp32 case checks the merge
        merged = make_hf_model(seed=SEED)
        weights = merged.state_dict()
        for name, delta in merged_deltas(adapters, alpha, r).items():
            _add_delta(weights, name, delta)
        merged.load_state_dict(weights)
        assert _rel(ours, merged(ids).logits) < tolerance


def _add_delta(weights, name, delta):
    """A delta under the release's per-expert name added to transformers 5's fused expert tensors."""
    parts = name.split(".")
    if parts[3:5] != ["mlp", "experts"]:
        weights[name] += delta
        return
    fused, expert, proj = f"model.layers.{parts[2]}.mlp.experts", int(parts[5]), parts[6]
    if proj == "down_proj":
        weights[f"{fused}.down_proj"][expert] += delta
    else:
        gate_up = weights[f"{fused}.gate_up_proj"][expert]
        half = gate_up.shape[0] // 2
        gate_up[slice(0, half) if proj == "gate_proj" else slice(half, None)] += delta


# --------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("recipe,per_node", [("tune_deepseek3_671b_4k_lora_a3.sh", 16),
                                             ("tune_deepseek3_671b_4k_lora_a2.sh", 8)])
def test_lora_recipes_parse_for_mindspeed_s_layout(recipe, per_node, released_config_dir):
    hf_dir = released_config_dir[0]
    proc, argv = dry_run(recipe, HF_DIR=hf_dir, DATA_PATH="/d", CKPT_LOAD_DIR="/base", CKPT_SAVE_DIR="/lora",
                          LORA_LOAD="/lora-before")
    assert proc.returncode == 0, proc.stderr
    assert "PYTORCH_NPU_ALLOC_CONF=expandable_segments:True" in proc.stderr  # the Ascend environment
    world = int(argv[argv.index("--nnodes") + 1]) * int(argv[argv.index("--nproc-per-node") + 1])
    assert world == 64 and int(argv[argv.index("--nproc-per-node") + 1]) == per_node
    args = parse_args(argv[argv.index("npu_dsv3.finetune") + 1:], world_size=world, mode="finetune")
    configs = build_configs(args)
    sizes = configs.parallel
    assert (sizes.tp, sizes.pp, sizes.ep) == (1, 4, 16) and args.num_layer_list == [15, 15, 16, 15]
    assert (configs.model.lora_rank, configs.model.lora_alpha) == (8, 16.0) and args.lora_ckpt_filter
    assert "experts.linear_fc1" in configs.model.lora_targets and args.lora_load == "/lora-before"


def test_merge_recipe_merges_or_exports():
    proc, argv = dry_run("ckpt_convert_deepseek3_merge_lora2hf.sh", LOAD_DIR="/base", LORA_LOAD="/lora",
                          SAVE_DIR="/out", LORA_R="8")
    assert proc.returncode == 0 and argv[:3] == ["npu-dsv3", "convert", "mcore2hf"]
    assert argv[argv.index("--lora-load") + 1] == "/lora" and "--save-lora-to-hf" not in argv
    proc, argv = dry_run("ckpt_convert_deepseek3_merge_lora2hf.sh", LOAD_DIR="/lora", SAVE_DIR="/out",
                          SAVE_LORA_TO_HF="1")
    assert proc.returncode == 0 and "--save-lora-to-hf" in argv
    proc, _ = dry_run("ckpt_convert_deepseek3_merge_lora2hf.sh", LOAD_DIR="/base", SAVE_DIR="/out")
    assert proc.returncode == 2 and "LORA_LOAD" in proc.stderr


def test_a_peft_adapter_reads_back_into_the_model(tiny, tmp_path):
    from npu_dsv3.lora.export import read_peft_adapter
    from npu_dsv3.lora.layers import shard_adapters

    targets = CANONICAL
    model = load_hf(tiny, lora_rank=4, lora_alpha=8, lora_targets=targets)
    _randomize(model, seed=9)
    write_peft_adapter(str(tmp_path), peft_tensors(_adapters(model, 203), 3),
                       peft_config(list(targets), 4, 8.0, 0.0, tiny, False))
    adapters, config = read_peft_adapter(str(tmp_path), 3)
    assert config["r"] == 4
    fresh = load_hf(tiny, lora_rank=4, lora_alpha=8, lora_targets=targets)
    shard_adapters(fresh, adapters)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(forward_logits(fresh, ids), forward_logits(model, ids))
    # another tool's adapter whose gate and up projections have their own A cannot become a shared-A fc1
    weights = peft_tensors(_adapters(model, 203), 3)
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    weights[key] = weights[key] + 1
    write_peft_adapter(str(tmp_path / "other"), weights, peft_config(list(targets), 4, 8.0, 0.0, tiny, False))
    with pytest.raises(ValueError, match="gate_proj and up_proj with different A"):
        read_peft_adapter(str(tmp_path / "other"), 3)


def test_every_recipe_sets_up_the_ascend_environment(tmp_path):
    import os
    import subprocess

    from support import SHELL

    def sets_up(recipe) -> bool:
        """It sources ascend_env.sh, or runs (exec) a recipe that does (an A2 recipe is its A3 one's)."""
        text = recipe.read_text()
        runs = re.search(r'exec bash "\$\(dirname "\$\{BASH_SOURCE\[0\]\}"\)/([\w.]+\.sh)"', text)
        return '/ascend_env.sh"' in text or (runs is not None and sets_up(SHELL / runs.group(1)))

    recipes = [p for p in SHELL.glob("*.sh") if p.name != "ascend_env.sh"]
    assert len(recipes) >= 12 and all(sets_up(p) for p in recipes)
    cann = tmp_path / "set_env.sh"
    cann.write_text("export CANN_SOURCED=yes\n")
    script = f'source "{SHELL / "ascend_env.sh"}"; echo "$CANN_SOURCED $HCCL_EXEC_TIMEOUT"'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "CANN_ENV": str(cann), "HCCL_EXEC_TIMEOUT": "7", "DRY_RUN": "1"})
    assert proc.stdout.split() == ["yes", "7"] and "HCCL_EXEC_TIMEOUT=7" in proc.stderr


def test_mla_mm_split_adapts_the_up_projections_as_the_unsplit_model(tiny):
    """--mla-mm-split's parts carry one adapter per up-projection, named and laid out as the unsplit one's."""
    targets = ("linear_q_up_proj", "linear_kv_up_proj")
    unsplit = load_hf(tiny, lora_rank=4, lora_alpha=8, lora_targets=targets)
    split = load_hf(tiny, lora_rank=4, lora_alpha=8, lora_targets=targets, mla_mm_split=True)
    _randomize(unsplit, seed=11)
    _randomize(split, seed=11)
    names = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert names(split) == names(unsplit) and any("linear_q_up_proj.lora_B" in n for n in names(split))
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(split, ids), forward_logits(unsplit, ids), rtol=1e-5, atol=1e-6)
