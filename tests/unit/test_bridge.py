"""``npu_dsv3.bridge`` in one process: verl's config converter (what it keeps that verl's drops), the model
straight from HF (the FP8 release too) equal to the single-process loader's, and bad HF directories refused
before anything is read. The layouts: tests/multiprocess/test_bridge_layouts.py."""

import json
import os
import shutil

import pytest
import torch
from transformers import DeepseekV3Config

from npu_dsv3.bridge import Bridge, hf_to_mcore_config_dpskv3
from npu_dsv3.checkpoint.fp8 import SCALE_SUFFIX, dequantize_fp8_block, is_release_fp8
from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.cli import main as cli
from npu_dsv3.distributed import ensure_single_process_group
from npu_dsv3.model import forward_logits, load_hf
from npu_dsv3.tiny_model import make_hf_model, save_hf
from support.checkpoint_files import hf_tensors


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    ensure_single_process_group()
    return save_hf(make_hf_model(seed=8), str(tmp_path_factory.mktemp("bridge_hf")), with_mtp=True)


def _hf(hf_dir) -> dict:
    with open(os.path.join(hf_dir, "config.json")) as f:
        return json.load(f)


def test_config_converter_keeps_what_verl_drops(hf_dir):
    hf = {**_hf(hf_dir), "num_nextn_predict_layers": 1,
          "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    config = hf_to_mcore_config_dpskv3(hf, torch.bfloat16)
    assert config.mtp_num_layers == 1 and config.moe_router_num_groups == 3 and config.moe_router_group_topk == 2
    assert config.moe_router_enable_expert_bias and config.params_dtype == torch.bfloat16 and config.bf16
    assert config.tensor_model_parallel_size == 1  # the current (single-process) parallel state's
    pretrained = DeepseekV3Config(**{k: v for k, v in hf.items() if k != "quantization_config"})
    same = hf_to_mcore_config_dpskv3(pretrained, torch.float32, num_layers=2)
    assert same.num_layers == 2 and same.params_dtype == torch.float32 and same.moe_router_num_groups == 3


def test_get_model_from_hf_is_the_loaders_model(hf_dir):
    bridge = Bridge.from_hf_pretrained(hf_dir, dtype=torch.float32)
    (model,) = bridge.get_model(moe_grouped_gemm=True)
    reference = load_hf(hf_dir, moe_grouped_gemm=True)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not k.endswith("_extra_state"))
    ids = torch.randint(0, 203, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(forward_logits(model.eval(), ids), forward_logits(reference, ids))
    (qlora,) = bridge.get_model(moe_grouped_gemm=True, qlora=True, lora_rank=4, lora_targets=("linear_proj",))
    assert qlora.state_dict()["decoder.layers.0.self_attention.linear_proj.weight_nf4"].dtype == torch.uint8
    (fresh,) = Bridge.from_hf_pretrained(DeepseekV3Config(**_hf(hf_dir))).get_model(load_weights=False)
    assert fresh.config.params_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="made from a config, without weights"):
        Bridge.from_hf_pretrained(_hf(hf_dir)).get_model()


def test_the_fp8_release_loads_dequantized(hf_dir, tmp_path):
    from unit.test_convert_cli import _quantize_fp8

    fp8, bf16 = str(tmp_path / "fp8"), str(tmp_path / "bf16")
    _quantize_fp8(hf_dir, fp8)
    assert cli(["convert", "fp8-to-bf16", "--input-fp8-hf-path", fp8, "--output-bf16-hf-path", bf16,
                "--no-progress"]) == 0
    (direct,) = Bridge.from_hf_pretrained(fp8, dtype=torch.bfloat16).get_model(moe_grouped_gemm=True)
    (cast,) = Bridge.from_hf_pretrained(bf16, dtype=torch.bfloat16).get_model(moe_grouped_gemm=True)
    a, b = direct.state_dict(), cast.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if not k.endswith("_extra_state"))
    # exported in the release's format again for an FP8 rollout engine: the source's FP8 weights (here eh_proj
    # too), each re-quantized per 128x128 block from the model's bf16 weight and followed by its scale
    source = hf_tensors(fp8)
    bridge = Bridge.from_hf_pretrained(fp8, dtype=torch.bfloat16)
    out = dict(bridge.export_hf_weights([direct], dtype=torch.float8_e4m3fn, bucket_bytes=1 << 14))
    assert out.keys() == source.keys() and all(out[k].dtype == source[k].dtype for k in source)
    quantized = [k for k in source if source[k].dtype == torch.float8_e4m3fn]
    assert len(quantized) > 10 and any(k.endswith("eh_proj.weight") for k in quantized)
    for name in quantized:
        codes, scale = _reference_fp8(dequantize_fp8_block(source[name], source[name + SCALE_SUFFIX]))
        assert torch.equal(out[name].view(torch.uint8), codes.view(torch.uint8)), name
        assert torch.equal(out[name + SCALE_SUFFIX], scale), name
    assert all(torch.equal(out[k], _trained_bf16(k, source[k])) for k in source
               if k not in quantized and SCALE_SUFFIX not in k)
    # by default the FP8 source goes out in bf16: its cast's tensors, as the bf16 model holds them
    cast = hf_tensors(bf16)
    assert all(torch.equal(t, _trained_bf16(n, cast[n])) for n, t in bridge.export_hf_weights([direct]))
    with pytest.raises(ValueError, match="names='release'"):
        bridge.export_hf_weights([direct], dtype=torch.float8_e4m3fn, names="transformers")


def test_a_qlora_model_exports_its_dequantized_base(tmp_path):
    """The NF4 base goes out dequantized (the NF4 round trip of the HF weights); merged, it is the LoRA model's
    export over that dequantized base with the same adapters."""
    from support.qlora import ALIGNED, dequantized_copy

    hf = save_hf(make_hf_model(seed=3, **ALIGNED), str(tmp_path / "hf"), with_mtp=True)
    deq = dequantized_copy(hf, str(tmp_path / "deq"))
    lora = dict(moe_grouped_gemm=True, lora_rank=4, lora_alpha=8.0,
                lora_targets=("linear_qkv", "linear_kv_up_proj", "linear_proj", "linear_fc1", "linear_fc2"))
    bridge = Bridge.from_hf_pretrained(hf, dtype=torch.float32)
    (qlora,) = bridge.get_model(qlora=True, **lora)
    base = dict(bridge.export_hf_weights([qlora], merge_lora=False, bucket_bytes=1 << 14))
    want = hf_tensors(deq)
    assert base.keys() == want.keys() and all(torch.equal(base[k], want[k]) for k in want)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in qlora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    deq_bridge = Bridge.from_hf_pretrained(deq, dtype=torch.float32)
    (reference,) = deq_bridge.get_model(**lora)
    adapters = {k: v for k, v in qlora.state_dict().items() if ".lora_" in k}
    assert adapters and not reference.load_state_dict(adapters, strict=False).unexpected_keys
    merged, expected = dict(bridge.export_hf_weights([qlora])), dict(deq_bridge.export_hf_weights([reference]))
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    o_proj = "model.layers.1.self_attn.o_proj.weight"
    assert not torch.equal(merged[o_proj], want[o_proj])  # the adapters act


def test_a_bf16_source_exports_in_the_releases_fp8_format(hf_dir):
    """Without an FP8 source the release's choice: attention and MLP weights, not the router, norms, embeddings,
    heads or MTP's eh_proj."""
    bridge = Bridge.from_hf_pretrained(hf_dir, dtype=torch.bfloat16)
    (model,) = bridge.get_model(moe_grouped_gemm=True)
    plain = dict(bridge.export_hf_weights([model]))
    out = dict(bridge.export_hf_weights([model], dtype=torch.float8_e4m3fn))
    quantized = {k for k, v in out.items() if v.dtype == torch.float8_e4m3fn}
    assert out.keys() == plain.keys() | {k + SCALE_SUFFIX for k in quantized}
    assert all(is_release_fp8(k, plain[k].shape) == (k in quantized) for k in plain)
    assert {k.split(".")[-2] for k in quantized} >= {"q_a_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj",
                                                     "down_proj"}
    for name in quantized:
        codes, scale = _reference_fp8(plain[name])
        assert torch.equal(out[name].view(torch.uint8), codes.view(torch.uint8)) and torch.equal(
            out[name + SCALE_SUFFIX], scale)
    assert all(torch.equal(out[k], plain[k]) for k in plain if k not in quantized)


def _trained_bf16(name, tensor):
    """An HF tensor as a bf16 model holds and exports it: rounded to bf16, in its own dtype; the expert bias is
    fp32 in megatron too."""
    return tensor if name.endswith("e_score_correction_bias") else tensor.to(torch.bfloat16).to(tensor.dtype)


def _reference_fp8(weight, block=128):
    """DeepSeek's block format written out block by block: scale = the block's largest magnitude / 448."""
    rows, cols = weight.shape
    codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(-(-rows // block), -(-cols // block))
    for i in range(0, rows, block):
        for j in range(0, cols, block):
            tile = weight[i:i + block, j:j + block].float()
            amax = tile.abs().max()
            s = amax / 448.0 if amax > 0 else torch.tensor(1.0)
            scale[i // block, j // block] = s
            codes[i:i + block, j:j + block] = (tile / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return codes, scale


def test_lazy_slices_read_only_their_bytes(tmp_path):
    """``LazyHFTensor``'s slices (rows, column bands, 1-D, FP8 off the block grid) equal slicing the whole tensor,
    bit for bit, and read only their own bytes (an FP8 slice: the 128x128 blocks it overlaps)."""
    from safetensors.torch import save_file

    from npu_dsv3.checkpoint.sources import HFInput

    g = torch.Generator().manual_seed(5)
    plain = {"a": torch.randn(37, 29, generator=g), "b": torch.randn(41, generator=g).to(torch.bfloat16),
             "w": (torch.randn(300, 260, generator=g) * 50).clamp(-448, 448).to(torch.float8_e4m3fn),
             "w" + SCALE_SUFFIX: torch.rand(3, 3, generator=g) + 0.5}
    save_file(plain, str(tmp_path / "model.safetensors"))
    get, reader = HFInput(str(tmp_path)).lazy_getter({})
    whole_w = dequantize_fp8_block(plain["w"], plain["w" + SCALE_SUFFIX])
    cases = [("a", lambda t: t.chunk(3, 0)[1], 4 * 13 * 29),
             ("a", lambda t: t.chunk(2, 1)[0].narrow(0, 5, 7), 4 * 7 * 15),
             ("b", lambda t: t.narrow(0, 40, 1), 2),
             # rows 100:260 and columns 130:260: the blocks of rows 0:300 and columns 128:260
             ("w", lambda t: t.narrow(0, 100, 160).chunk(2, 1)[1], 300 * 132)]
    for name, cut, nbytes in cases:
        before = reader.bytes_read
        lazy = cut(get(name))
        want = cut(whole_w if name == "w" else plain[name])
        assert lazy.shape == want.shape and lazy.dtype == want.dtype and reader.bytes_read == before  # nothing yet
        assert torch.equal(torch.cat([lazy]), want) and torch.equal(lazy.t(), want.t())  # read once, used twice
        assert reader.bytes_read - before == nbytes + (9 * 4 if name == "w" else 0), name  # FP8: + its scales
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "model.safetensors") - 8)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):  # one line, naming the file
        HFInput(str(tmp_path)).lazy_getter({})[0]("w" + SCALE_SUFFIX).narrow(0, 2, 1).read()


def test_bad_directories_are_refused_before_loading(hf_dir, tmp_path):
    missing = str(tmp_path / "missing")
    shutil.copytree(hf_dir, missing)
    os.remove(os.path.join(missing, "model.safetensors"))
    with pytest.raises(CheckpointError):
        Bridge.from_hf_pretrained(missing, dtype=torch.float32).get_model(moe_grouped_gemm=True)
    truncated = str(tmp_path / "truncated")
    shutil.copytree(hf_dir, truncated)
    path = os.path.join(truncated, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="truncated|shorter|size"):
        Bridge.from_hf_pretrained(truncated, dtype=torch.float32).get_model(moe_grouped_gemm=True)
    other = str(tmp_path / "other")
    shutil.copytree(hf_dir, other)
    with open(os.path.join(other, "config.json"), "w") as f:
        json.dump({**_hf(hf_dir), "hidden_size": 80}, f)
    with pytest.raises(CheckpointError, match="hidden|shape"):
        Bridge.from_hf_pretrained(other, dtype=torch.float32).get_model(moe_grouped_gemm=True)


def test_export_is_every_hf_tensor_and_transformers_loads_it(hf_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    bridge = Bridge.from_hf_pretrained(hf_dir, dtype=torch.float32)
    (model,) = bridge.get_model(moe_grouped_gemm=True)
    want = load_file(os.path.join(hf_dir, "model.safetensors"))
    release = list(bridge.export_hf_weights([model], bucket_bytes=1 << 14))
    assert [n for n, _ in release] == list(dict.fromkeys(n for n, _ in release))  # each once
    got = dict(release)
    assert got.keys() == want.keys() and all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
                                              for k in want)
    assert bridge.export_buffer_bytes == 0  # one process holds every piece: each is read in place, none copied
    # transformers' names load into transformers' model, whose logits are ours; with LoRA, merged
    lora = bridge.get_model(moe_grouped_gemm=True, lora_rank=4, lora_alpha=8.0,
                            lora_targets=("linear_kv_up_proj", "linear_proj", "experts.linear_fc1", "output_layer"))[0]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state = dict(bridge.export_hf_weights([lora], names="transformers"))
    assert not [n for n in state if n.startswith("model.layers.3.")]  # no MTP in transformers
    missing, unexpected = reference.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    ids = torch.randint(0, 203, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = forward_logits(lora.eval(), ids), reference(ids).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-5
    with pytest.raises(ValueError, match="names must be 'release' or 'transformers'"):
        bridge.export_hf_weights([model], names="peft")


def test_adapter_export_loads_in_peft(hf_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from npu_dsv3.lora.export import peft_config, write_peft_adapter

    targets = ("linear_q_up_proj", "linear_proj", "mlp.linear_fc1", "experts.linear_fc2")
    bridge = Bridge.from_hf_pretrained(hf_dir, dtype=torch.float32)
    (model,) = bridge.get_model(moe_grouped_gemm=True, lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    tensors = dict(bridge.export_adapter_weights([model]))
    assert tensors and all(k.startswith("base_model.model.") for k in tensors)
    write_peft_adapter(str(tmp_path), tensors, peft_config(list(targets), 4, 8.0, 0.0, hf_dir, True))
    ids = torch.randint(0, 203, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32),
                                         str(tmp_path))(ids).logits
        ours = forward_logits(model.eval(), ids)
    assert ((peft - ours).abs().max() / ours.abs().max()).item() < 1e-5
    (plain,) = bridge.get_model(moe_grouped_gemm=True)
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        list(bridge.export_adapter_weights([plain]))


def test_value_model_has_one_output_and_exports_its_head(hf_dir):
    bridge = Bridge.from_hf_pretrained(hf_dir, dtype=torch.float32)
    (critic,) = bridge.get_model(moe_grouped_gemm=True, value_model=True)
    ids = torch.randint(0, 203, (2, 9), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9).unsqueeze(0).expand_as(ids)
    critic.mtp_process, critic.config.mtp_num_layers = False, None  # values from the main head only
    with torch.no_grad():
        values = critic.eval()(ids, positions, attention_mask=None)
    assert values.shape == (2, 9, 1)
    exported = dict(bridge.export_hf_weights([critic]))
    assert "lm_head.weight" not in exported and not [n for n in exported if "shared_head.head" in n]
    assert torch.equal(exported["score.weight"], critic.output_layer.weight.detach())


def test_bf16_odd_sizes_export_bit_for_bit(tmp_path):
    """bf16 weights of odd sizes beside the fp32 expert bias, in small buckets: every piece lands aligned."""
    from safetensors.torch import load_file

    from npu_dsv3.tiny_model import cast_like_release

    path = save_hf(cast_like_release(make_hf_model(seed=9, hidden_size=71, num_attention_heads=3), torch.bfloat16),
                   str(tmp_path / "hf"))
    bridge = Bridge.from_hf_pretrained(path, dtype=torch.bfloat16)
    (model,) = bridge.get_model(moe_grouped_gemm=True)
    want = load_file(os.path.join(path, "model.safetensors"))
    got = dict(bridge.export_hf_weights([model], bucket_bytes=1 << 12))
    assert got.keys() == want.keys()
    assert all(got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]) for k in want)
    assert want["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
