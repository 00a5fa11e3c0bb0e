"""QLoRA in one process: the NF4 base gives exactly the LoRA model whose base is the dequantized NF4 weights
(logits and adapter gradients, fp32 and bf16); ``convert hf2mcore --qlora-nf4`` writes it in every layout,
each reading back to the same model; and the bad inputs get one clear error each."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from npu_dsv3.arguments import ArgsError, parse_args
from npu_dsv3.cli import main as cli
from npu_dsv3.lora.nf4_base import ABSMAX2, NF4Error
from npu_dsv3.model import forward_logits, load_hf
from npu_dsv3.model.loading import load_mcore
from npu_dsv3.ops.nf4 import nf4_quantize
from npu_dsv3.tiny_model import make_hf_model, save_hf

from support.checkpoint_files import hf_tensors
from support.qlora import ALIGNED, dequantized_copy
from support.recipes import dry_run

TARGETS = ("linear_q_down_proj", "linear_q_up_proj", "linear_kv_down_proj", "linear_kv_up_proj", "linear_proj",
           "mlp.linear_fc1", "mlp.linear_fc2", "shared_experts.linear_fc1", "shared_experts.linear_fc2",
           "experts.linear_fc1", "experts.linear_fc2")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    odd = save_hf(make_hf_model(seed=3), str(root / "odd"))
    aligned = save_hf(make_hf_model(seed=4, **ALIGNED), str(root / "aligned"))
    return {"odd": odd, "odd_dq": dequantized_copy(odd, str(root / "odd_dq")), "aligned": aligned}


def _ids(seed=0):
    return torch.randint(0, 203, (2, 17), generator=torch.Generator().manual_seed(seed))


def _lora(path, dtype, qlora):
    model = load_hf(path, dtype=dtype, qlora=qlora, moe_grouped_gemm=True, lora_rank=4, lora_alpha=8.0,
                    lora_targets=TARGETS)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_qlora_is_lora_on_the_dequantized_base(hf, dtype):
    quantized, reference = _lora(hf["odd"], dtype, True), _lora(hf["odd_dq"], dtype, False)
    params = dict(quantized.named_parameters())
    assert all(n.rsplit(".", 1)[-1].startswith("lora_") for n, p in params.items() if p.requires_grad)
    assert "decoder.layers.0.self_attention.linear_proj.weight" not in params  # NF4 buffers instead
    ids, upstream = _ids(), None
    outs = []
    for model in (quantized, reference):
        model.train()
        logits = forward_logits(model, ids)
        if upstream is None:
            upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        (logits.float() * upstream.float()).sum().backward()
        outs.append((logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (a, grads_a), (b, grads_b) = outs
    assert torch.equal(a, b)  # the same GEMMs on the same weights
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 20
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_weights_are_nf4_and_smaller(hf):
    model = load_hf(hf["odd"], qlora=True, moe_grouped_gemm=True)
    state = model.state_dict()
    experts = model.decoder.layers[1].mlp.experts
    assert state["decoder.layers.1.mlp.experts.gate_proj_nf4"].dtype == torch.uint8
    assert "decoder.layers.1.mlp.experts.weight1" not in state and "output_layer.weight" in state
    assert experts.nf4_fc1().shape == (12, 72, 56) and experts.nf4_fc2().shape == (12, 28, 72)
    # every quantized HF tensor's codes, bit for bit what ops.nf4 gives
    ref = load_file(os.path.join(hf["odd"], "model.safetensors"))
    kv_b = nf4_quantize(ref["model.layers.0.self_attn.kv_b_proj.weight"])
    assert torch.equal(state["decoder.layers.0.self_attention.linear_kv_up_proj.weight_nf4"].reshape(-1), kv_b.codes)


LAYOUTS = {
    "tp1": [],
    "tp2-ep2": ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"],
    "tp2-etp1": ["--target-tensor-parallel-size", "2", "--expert-tensor-parallel-size", "1"],
    "pp2-tp2-mla-mm-split": ["--target-pipeline-parallel-size", "2", "--num-layer-list", "1,2",
                             "--target-tensor-parallel-size", "2", "--mla-mm-split"],
    "torch-dist": ["--save-format", "torch_dist"],
}


def _convert(src, dst, *flags):
    return cli(["convert", "hf2mcore", "--load-dir", src, "--save-dir", dst, "--no-progress", *flags])


def test_converter_layouts_read_back_to_the_same_model(hf, tmp_path):
    ids = _ids(1)
    want = forward_logits(load_hf(hf["aligned"], qlora=True, moe_grouped_gemm=True), ids)
    for name, flags in LAYOUTS.items():
        out = str(tmp_path / name)
        assert _convert(hf["aligned"], out, "--qlora-nf4", "--moe-grouped-gemm", *flags) == 0
        with open(os.path.join(out, "config.json")) as f:
            assert json.load(f)["npu_dsv3_nf4"]["quant_type"] == "nf4"
        assert torch.equal(forward_logits(load_mcore(out), ids), want), name
    # each TP rank keeps its rows of the codes: half of o_proj's columns per rank at TP 2
    rank0 = torch.load(os.path.join(tmp_path, "tp2-ep2", "release", "mp_rank_00_000", "model_optim_rng.pt"),
                       weights_only=True)["model"]
    assert rank0["decoder.layers.0.self_attention.linear_proj.weight_nf4"].shape == (128, 32)
    assert rank0["decoder.layers.0.self_attention.linear_proj.weight_nf4_absmax"].shape == (1, 256)


def test_nf4_checkpoints_move_between_layouts_and_formats(hf, tmp_path):
    """reshard keeps NF4 NF4: legacy TP2 x EP2 -> torch_dist -> legacy PP2, the scales still fp32, the same model."""
    ids = _ids(2)
    want = forward_logits(load_hf(hf["aligned"], qlora=True, moe_grouped_gemm=True), ids)
    legacy, dist, pp2 = (str(tmp_path / n) for n in ("legacy", "dist", "pp2"))
    assert _convert(hf["aligned"], legacy, "--qlora-nf4", "--moe-grouped-gemm", "--target-tensor-parallel-size", "2",
                    "--target-expert-parallel-size", "2") == 0
    assert cli(["convert", "reshard", "--load-dir", legacy, "--save-dir", dist, "--save-format", "torch_dist",
                "--no-progress"]) == 0
    assert cli(["convert", "reshard", "--load-dir", dist, "--save-dir", pp2, "--target-pipeline-parallel-size", "2",
                "--target-num-layer-list", "1,2", "--target-moe-grouped-gemm", "--no-progress"]) == 0
    for out in (dist, pp2):
        with open(os.path.join(out, "config.json")) as f:
            assert "npu_dsv3_nf4" in json.load(f)
        assert torch.equal(forward_logits(load_mcore(out), ids), want), out
    rank = torch.load(os.path.join(pp2, "release", "mp_rank_00_000", "model_optim_rng.pt"), weights_only=True)["model"]
    assert rank["decoder.layers.0.self_attention.linear_proj.weight" + ABSMAX2].dtype == torch.float32


@pytest.mark.parametrize("save_format", ["torch", "torch_dist"])
def test_mcore2hf_writes_the_dequantized_weights(hf, tmp_path, save_format, capsys):
    """An NF4 checkpoint back to HF: the dequantized NF4 weights, bit for bit (dtypes too), said to be lossy."""
    nf4, out = str(tmp_path / "nf4"), str(tmp_path / "hf")
    flags = ["--target-tensor-parallel-size", "2", "--target-expert-parallel-size", "2"] if save_format == "torch" else []
    assert _convert(hf["aligned"], nf4, "--qlora-nf4", "--moe-grouped-gemm", "--save-format", save_format, *flags) == 0
    assert cli(["convert", "mcore2hf", "--load-dir", nf4, "--save-dir", out, "--no-progress"]) == 0
    assert "holds NF4 weights (--qlora-nf4); the HF weights written are them dequantized, which is lossy" in \
        capsys.readouterr().err
    want = load_file(os.path.join(dequantized_copy(hf["aligned"], str(tmp_path / "dq")), "model.safetensors"))
    got = hf_tensors(out)
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    with open(os.path.join(out, "config.json")) as f:
        assert "npu_dsv3_nf4" not in json.load(f)


def test_misaligned_layouts_are_refused(hf, tmp_path, capsys):
    # v_head_dim 24 over TP 2: o_proj [128, 48] gives each rank 24 columns, not whole 64-value blocks
    src = save_hf(make_hf_model(seed=4, **{**ALIGNED, "v_head_dim": 24}), str(tmp_path / "v24"))
    assert _convert(src, str(tmp_path / "bad"), "--qlora-nf4", "--moe-grouped-gemm",
                    "--target-tensor-parallel-size", "2") != 0
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "self_attn.o_proj.weight [128, 48]: this layout gives a rank its columns 0:24" in err[0]
    assert _convert(hf["odd"], str(tmp_path / "gg"), "--qlora-nf4") != 0
    assert "add --moe-grouped-gemm" in capsys.readouterr().err


BASE = ["--micro-batch-size", "1", "--seq-length", "16", "--train-iters", "2", "--lr", "1e-4", "--mock-data",
        "--moe-grouped-gemm"]


def test_flag_errors(hf, tmp_path):
    nf4_dir, plain_dir = str(tmp_path / "nf4"), str(tmp_path / "plain")
    assert _convert(hf["odd"], nf4_dir, "--qlora-nf4", "--moe-grouped-gemm") == 0
    assert _convert(hf["odd"], plain_dir, "--moe-grouped-gemm") == 0

    def parse(*extra):
        return parse_args(["--hf-config", hf["odd"], *BASE, *extra], 1, "pretrain")

    with pytest.raises(ArgsError, match="NF4 weights cannot be fine-tuned themselves: add --lora-target-modules"):
        parse("--qlora", "--load", nf4_dir)
    with pytest.raises(ArgsError, match="holds unquantized weights; convert the HF model with .*--qlora-nf4"):
        parse("--qlora", "--lora-target-modules", "linear_qkv", "--load", plain_dir)
    with pytest.raises(ArgsError, match="holds NF4 weights .* add --qlora"):
        parse("--lora-target-modules", "linear_qkv", "--load", nf4_dir)
    with pytest.raises(ArgsError, match="--qlora needs its NF4 base"):
        parse("--qlora", "--lora-target-modules", "linear_qkv")
    args = parse("--qlora", "--lora-target-modules", "linear_qkv", "--load", nf4_dir)
    assert args.qlora


def test_corrupt_scales_are_refused(hf, tmp_path):
    out = str(tmp_path / "nf4")
    assert _convert(hf["odd"], out, "--qlora-nf4", "--moe-grouped-gemm") == 0
    path = os.path.join(out, "release", "mp_rank_00", "model_optim_rng.pt")
    state = torch.load(path, weights_only=True)
    key = "decoder.layers.0.mlp.linear_fc1.weight" + ABSMAX2
    state["model"][key][0, 0] = float("nan")
    torch.save(state, path)
    os.remove(os.path.join(out, ".npu_dsv3_manifest.json"))  # its CRC would catch the edit first
    with pytest.raises(NF4Error, match=f"the NF4 scales .*{key}.* hold inf, NaN .* corrupt"):
        load_mcore(out, moe_grouped_gemm=True)


@pytest.mark.parametrize("recipe,per_node", [("tune_deepseek3_671b_4k_qlora_a3.sh", 16),
                                             ("tune_deepseek3_671b_4k_qlora_a2.sh", 8)])
def test_qlora_recipes_parse_for_mindspeed_s_layout(recipe, per_node, released_config_dir):
    from npu_dsv3.arguments import build_configs

    proc, argv = dry_run(recipe, HF_DIR=released_config_dir[0], DATA_PATH="/d", CKPT_LOAD_DIR="/nf4",
                         CKPT_SAVE_DIR="/qlora")
    assert proc.returncode == 0, proc.stderr
    world = int(argv[argv.index("--nnodes") + 1]) * int(argv[argv.index("--nproc-per-node") + 1])
    assert world == 32 and int(argv[argv.index("--nproc-per-node") + 1]) == per_node
    args = parse_args(argv[argv.index("npu_dsv3.finetune") + 1:], world_size=world, mode="finetune")
    configs = build_configs(args)
    assert (configs.parallel.tp, configs.parallel.pp, configs.parallel.ep) == (1, 8, 4)
    assert args.num_layer_list == [7, 7, 7, 8, 8, 8, 8, 8] and configs.model.qlora and configs.model.lora_rank == 8


def test_converter_recipe_writes_nf4():
    proc, argv = dry_run("ckpt_convert_deepseek3_hf2mcore.sh", LOAD_DIR="/hf", SAVE_DIR="/nf4", QLORA_NF4="1",
                         TP="1", PP="8", EP="4", NUM_LAYER_LIST="7,7,7,8,8,8,8,8", NOOP_LAYERS="", SCHEDULE="")
    assert proc.returncode == 0 and "--qlora-nf4" in argv and "--moe-grouped-gemm" in argv
    proc, argv = dry_run("ckpt_convert_deepseek3_hf2mcore.sh", LOAD_DIR="/hf", SAVE_DIR="/bf16")
    assert proc.returncode == 0 and "--qlora-nf4" not in argv
