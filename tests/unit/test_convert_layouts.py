"""HF -> megatron legacy per-rank checkpoint -> HF, for every layout training accepts."""

import os

import pytest
import torch
from safetensors.torch import load_file

from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.checkpoint.mcore_legacy import rank_file, rank_payload, read_hf_tensors
from npu_dsv3.checkpoint.rank_state import effective_hf_config, source_getter
from npu_dsv3.config import hf_to_mcore_config_dpskv3, load_hf_config
from npu_dsv3.layout import LayoutError, ParallelLayout
from npu_dsv3.model import forward_logits, load_mcore
from npu_dsv3.tiny_model import cast_like_release, make_hf_model, save_hf
from npu_dsv3.verify import compare_logits

LAYOUTS = {
    "tp1": {},
    "tp2-pp2-ep2-etp1": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                             expert_model_parallel_size=2, expert_tensor_parallel_size=1, moe_grouped_gemm=True),
    "tp2-etp2-ep3-vpp-noop": dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=2,
                                  expert_model_parallel_size=3, pipeline_model_parallel_size=2,
                                  num_layers_per_virtual_pipeline_stage=1, noop_layers="1,5", moe_grouped_gemm=True),
    "pp2-num-layer-list-per-expert": dict(pipeline_model_parallel_size=2, num_layer_list="1,3",
                                          expert_model_parallel_size=4, moe_grouped_gemm=False),
    "dualpipev-noop": dict(pipeline_model_parallel_size=2, schedules_method="dualpipev", noop_layers="2,5,6,7",
                           expert_model_parallel_size=2, moe_grouped_gemm=True),
    "pp4-tp2": dict(pipeline_model_parallel_size=4, tensor_model_parallel_size=2, expert_tensor_parallel_size=1,
                    moe_grouped_gemm=True),
    "tp2-ep3-tp-extend-ep": dict(tensor_model_parallel_size=2, expert_model_parallel_size=3, moe_tp_extend_ep=True,
                                 moe_grouped_gemm=True),
    "tp2-ep2-pp2-tp-extend-ep-per-expert": dict(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                                                pipeline_model_parallel_size=2, moe_tp_extend_ep=True,
                                                moe_grouped_gemm=False),
    "tp2-ep2-mla-mm-split": dict(tensor_model_parallel_size=2, expert_model_parallel_size=2, mla_mm_split=True,
                                 expert_tensor_parallel_size=1, moe_grouped_gemm=True),
}


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def checkpoint(request, tmp_path_factory):
    hf = make_hf_model(seed=2, num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4,
                       num_key_value_heads=4)
    hf = cast_like_release(hf, request.param)
    path = save_hf(hf, str(tmp_path_factory.mktemp("hf")), with_mtp=True)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    config = hf_to_mcore_config_dpskv3(load_hf_config(path))
    return path, tensors, config


def _convert(get, config, root, **flags):
    par = ParallelLayout.from_flags(config, **flags)
    for ranks in par.ranks():
        target = rank_file(str(root), par, *ranks)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        torch.save(rank_payload(config, par, get, *ranks), target)
    return par


def _model(root, par, tp_rank, ep_rank, pp_rank=0):
    return torch.load(rank_file(str(root), par, tp_rank, pp_rank, ep_rank), weights_only=True)["model"]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_round_trip_is_bit_exact(checkpoint, tmp_path, name):
    _, tensors, config = checkpoint
    par = _convert(tensors.__getitem__, config, tmp_path, **LAYOUTS[name])
    back = dict(read_hf_tensors(str(tmp_path), config, par))
    # MTP's embed_tokens and shared_head.head are copies of the main ones (checked on import).
    duplicates = {k for k in tensors if k.endswith(("layers.4.embed_tokens.weight", "shared_head.head.weight"))}
    assert back.keys() == tensors.keys() - duplicates
    for key, value in back.items():
        assert value.dtype == tensors[key].dtype, key
        assert torch.equal(value, tensors[key]), key


def test_sharded_checkpoint_gives_transformers_logits(tmp_path):
    hf = make_hf_model(seed=5, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
    hf_dir = save_hf(hf, str(tmp_path / "hf"))
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    config = hf_to_mcore_config_dpskv3(load_hf_config(hf_dir), mtp_num_layers=None)
    flags = dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2, expert_model_parallel_size=3,
                 num_layers_per_virtual_pipeline_stage=1)
    mcore_dir = tmp_path / "mcore"
    _convert(tensors.__getitem__, config, mcore_dir, **flags)
    with open(os.path.join(hf_dir, "config.json")) as src, open(mcore_dir / "config.json", "w") as dst:
        dst.write(src.read())
    model = load_mcore(str(mcore_dir), **flags)
    ids = torch.randint(0, hf.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert compare_logits(forward_logits(model, ids), hf(ids).logits, 1e-5)["passed"]


def test_layouts_that_do_not_divide_name_the_flag(checkpoint):
    _, _, config = checkpoint
    with pytest.raises(LayoutError, match="--target-expert-parallel-size 5"):
        ParallelLayout.from_flags(config, expert_model_parallel_size=5)
    with pytest.raises(LayoutError, match="tensor-parallel"):
        ParallelLayout.from_flags(config, tensor_model_parallel_size=3)
    with pytest.raises(LayoutError, match="--pipeline-model-parallel-size"):
        ParallelLayout.from_flags(config, pipeline_model_parallel_size=3)
    with pytest.raises(LayoutError, match="--num-layer-list"):
        ParallelLayout.from_flags(config, pipeline_model_parallel_size=2, num_layer_list="1,2")
    with pytest.raises(LayoutError, match="cannot be combined"):
        ParallelLayout.from_flags(config, pipeline_model_parallel_size=2, num_layer_list="2,2",
                                  num_layers_per_virtual_pipeline_stage=1)
    with pytest.raises(LayoutError, match="--noop-layers"):
        ParallelLayout.from_flags(config, noop_layers="9")


def test_source_flags_that_disagree_with_the_checkpoint(checkpoint, tmp_path):
    _, tensors, config = checkpoint
    _convert(tensors.__getitem__, config, tmp_path, pipeline_model_parallel_size=2)
    wrong = ParallelLayout.from_flags(config, pipeline_model_parallel_size=2, tensor_model_parallel_size=2)
    with pytest.raises(CheckpointError, match="mp_rank_01_000"):
        dict(read_hf_tensors(str(tmp_path), config, wrong))
    wrong_vpp = ParallelLayout.from_flags(config, pipeline_model_parallel_size=2,
                                          num_layers_per_virtual_pipeline_stage=1)
    with pytest.raises(CheckpointError, match="model0"):
        dict(read_hf_tensors(str(tmp_path), config, wrong_vpp))


def test_tp_extend_ep_layouts_that_do_not_divide_name_the_flags(checkpoint):
    _, _, config = checkpoint
    with pytest.raises(LayoutError, match="--moe-tp-extend-ep: 12 experts .* --target-expert-parallel-size 4 x "
                                          "--target-tensor-parallel-size 2"):
        ParallelLayout.from_flags(config, expert_model_parallel_size=4, tensor_model_parallel_size=2,
                                  moe_tp_extend_ep=True)
    with pytest.raises(LayoutError, match="--moe-tp-extend-ep .* --expert-tensor-parallel-size must be 1"):
        ParallelLayout.from_flags(config, tensor_model_parallel_size=2, expert_tensor_parallel_size=2,
                                  moe_tp_extend_ep=True)


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-gemm", "per-expert"])
def test_tp_extend_ep_gives_each_tensor_rank_whole_experts(checkpoint, tmp_path, grouped):
    _, tensors, config = checkpoint
    tp, ep = 2, 3
    par = _convert(tensors.__getitem__, config, tmp_path, tensor_model_parallel_size=tp,
                   expert_model_parallel_size=ep, moe_tp_extend_ep=True, moe_grouped_gemm=grouped)
    per_rank, hidden = config.num_moe_experts // (tp * ep), config.hidden_size
    mc, hf = "decoder.layers.1.mlp.", "model.layers.1.mlp."  # the first MoE layer
    for t in range(tp):
        for e in range(ep):
            model = _model(tmp_path, par, t, e)
            for i in range(per_rank):
                # MindSpeed's placement: tensor rank t of EP rank e holds experts (e * TP + t) * n + i.
                expert = f"{hf}experts.{(e * tp + t) * per_rank + i}."
                fc1 = torch.cat([tensors[expert + "gate_proj.weight"], tensors[expert + "up_proj.weight"]])
                if grouped:
                    got_fc1 = model[mc + "experts.weight1"].view(per_rank, hidden, -1)[i].t()
                    got_fc2 = model[mc + "experts.weight2"].view(per_rank, -1, hidden)[i].t()
                else:
                    got_fc1 = model[f"{mc}experts.local_experts.{i}.linear_fc1.weight"]
                    got_fc2 = model[f"{mc}experts.local_experts.{i}.linear_fc2.weight"]
                assert torch.equal(got_fc1, fc1) and torch.equal(got_fc2, tensors[expert + "down_proj.weight"])
            if grouped:
                assert model[mc + "experts.weight2"].shape[0] == per_rank * config.moe_ffn_hidden_size
            else:
                assert f"{mc}experts.local_experts.{per_rank}.linear_fc1.weight" not in model
            shared = tensors[hf + "shared_experts.down_proj.weight"].chunk(tp, 1)[t]
            assert torch.equal(model[mc + "shared_experts.linear_fc2.weight"], shared)


def _head_rows(weight, heads, sizes, part, tp, rank):
    """Part ``part``'s rows of each of TP rank ``rank``'s heads, head by head."""
    start, per_head = sum(sizes[:part]), sum(sizes)
    mine = range(rank * heads // tp, (rank + 1) * heads // tp)
    return torch.cat([weight[h * per_head + start: h * per_head + start + sizes[part]] for h in mine])


def test_mla_mm_split_pieces_are_the_rows_of_each_head(checkpoint, tmp_path):
    _, tensors, config = checkpoint
    par = _convert(tensors.__getitem__, config, tmp_path, tensor_model_parallel_size=2, mla_mm_split=True)
    q, kv = (config.qk_head_dim, config.qk_pos_emb_head_dim), (config.qk_head_dim, config.v_head_dim)
    for mc, hf in (("decoder.layers.0.", "model.layers.0."), ("mtp.layers.0.transformer_layer.", "model.layers.4.")):
        q_b, kv_b = tensors[hf + "self_attn.q_b_proj.weight"], tensors[hf + "self_attn.kv_b_proj.weight"]
        for t in range(2):
            model = _model(tmp_path, par, t, 0)
            expected = {"linear_qk_nope": (q_b, q, 0), "linear_qk_rope": (q_b, q, 1),
                        "linear_kv_nope": (kv_b, kv, 0), "linear_v": (kv_b, kv, 1)}
            for name, (weight, sizes, part) in expected.items():
                rows = _head_rows(weight, config.num_attention_heads, sizes, part, 2, t)
                assert torch.equal(model[f"{mc}self_attention.{name}.weight"], rows), (mc, name, t)
            assert f"{mc}self_attention.linear_q_up_proj.weight" not in model
            assert f"{mc}self_attention.linear_kv_up_proj.weight" not in model


def test_mla_mm_split_without_q_lora_splits_only_kv_b_proj(tmp_path):
    hf = make_hf_model(seed=3, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None)
    path = save_hf(hf, str(tmp_path / "hf"))
    tensors = load_file(os.path.join(path, "model.safetensors"))
    config = hf_to_mcore_config_dpskv3(load_hf_config(path))
    par = _convert(tensors.__getitem__, config, tmp_path / "mcore", tensor_model_parallel_size=2, mla_mm_split=True)
    model = _model(tmp_path / "mcore", par, 1, 0)
    attn = "decoder.layers.1.self_attention."
    q_proj = tensors["model.layers.1.self_attn.q_proj.weight"]
    assert torch.equal(model[attn + "linear_q_proj.weight"], q_proj.chunk(2)[1])
    assert attn + "linear_v.weight" in model and attn + "linear_qk_nope.weight" not in model
    back = dict(read_hf_tensors(str(tmp_path / "mcore"), config, par))
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def _cut(root, path, tensors, **flags):
    """hf2mcore with model-size flags as the converter runs it: (written config.json, model config, layout)."""
    source = load_hf_config(path)
    hf_config = effective_hf_config(source, flags)
    config = hf_to_mcore_config_dpskv3(hf_config)
    return hf_config, config, _convert(source_getter(tensors.__getitem__, source, hf_config), config, root, **flags)


def _renamed(name, layers):
    if not name.startswith("model.layers."):
        return name
    index, rest = name[len("model.layers."):].split(".", 1)
    return f"model.layers.{layers[int(index)]}.{rest}"


def test_fewer_layers_and_dense_layers_convert_part_of_the_checkpoint(checkpoint, tmp_path):
    path, tensors, _ = checkpoint
    # MindSpeed-LLM's reading: the first K dense layers, then MoE layers from the checkpoint's first one on.
    hf_config, config, par = _cut(tmp_path, path, tensors, num_layers=3, first_k_dense_replace=0,
                                  pipeline_model_parallel_size=3)
    sizes = ("num_hidden_layers", "first_k_dense_replace", "num_nextn_predict_layers")
    assert [hf_config[k] for k in sizes] == [3, 0, 1]
    source_layer = {0: 1, 1: 2, 2: 3, 3: 4}  # 3: the MTP layer
    back = dict(read_hf_tensors(str(tmp_path), config, par))
    duplicates = {"model.layers.4.embed_tokens.weight", "model.layers.4.shared_head.head.weight"}
    assert {_renamed(k, source_layer) for k in back} == {k for k in tensors if ".layers.0." not in k} - duplicates
    assert all(torch.equal(value, tensors[_renamed(k, source_layer)]) for k, value in back.items())


def test_mtp_num_layers_0_leaves_mtp_out(checkpoint, tmp_path):
    path, tensors, _ = checkpoint
    hf_config, config, par = _cut(tmp_path, path, tensors, mtp_num_layers=0, pipeline_model_parallel_size=2)
    assert hf_config["num_nextn_predict_layers"] == 0 and not config.mtp_num_layers
    assert not any(k.startswith("mtp.") for k in _model(tmp_path, par, 0, 0, pp_rank=1))
    assert dict(read_hf_tensors(str(tmp_path), config, par)).keys() == {
        k for k in tensors if not k.startswith("model.layers.4.")}


def test_model_size_flags_the_checkpoint_cannot_fill_name_flag_and_tensor(checkpoint):
    path, _, config = checkpoint
    source = load_hf_config(path)
    with pytest.raises(LayoutError, match=r"--first-k-dense-replace 2: .*model\.layers\.1\.mlp\.gate_proj\.weight"):
        effective_hf_config(source, {"first_k_dense_replace": 2})
    with pytest.raises(LayoutError, match=r"--mtp-num-layers 2: .*model\.layers\.5\.eh_proj\.weight"):
        effective_hf_config(source, {"mtp_num_layers": 2})
    with pytest.raises(LayoutError, match="--mtp-num-layers must be >= 0"):
        effective_hf_config(source, {"mtp_num_layers": -1})
    with pytest.raises(LayoutError, match="--num-layers 6 minus 1 --noop-layers is 5"):
        effective_hf_config(source, {"num_layers": 6, "noop_layers": "2"})
    assert effective_hf_config(source, {"num_layers": 6, "noop_layers": "2,3"})["num_hidden_layers"] == 4
    # A megatron source's rank files fix its layers: only MTP can be left out.
    kept = effective_hf_config(source, {"num_layers": 2, "mtp_num_layers": 0}, select_layers=False)
    assert (kept["num_hidden_layers"], kept["num_nextn_predict_layers"]) == (4, 0)
    # The flags must describe the model config the layout is built for.
    with pytest.raises(LayoutError, match="--mtp-num-layers 0, but the model config has 1"):
        ParallelLayout.from_flags(config, mtp_num_layers=0)
    with pytest.raises(LayoutError, match="--first-k-dense-replace 0, but the model config's first 1 layers"):
        ParallelLayout.from_flags(config, first_k_dense_replace=0)


def test_cli_layout_flags_carry_the_new_options():
    from npu_dsv3.cli import build_parser
    from npu_dsv3.convert import _layout_flags

    args = build_parser().parse_args(["convert", "reshard", "--load-dir", "a", "--save-dir", "b",
                                      "--source-moe-tp-extend-ep", "--target-mla-mm-split",
                                      "--target-mtp-num-layers", "0", "--target-first-k-dense-replace", "1"])
    source, target = _layout_flags(args, "source", True), _layout_flags(args, "target", True)
    assert source["moe_tp_extend_ep"] and not source["mla_mm_split"] and source["mtp_num_layers"] is None
    assert target["mla_mm_split"] and (target["mtp_num_layers"], target["first_k_dense_replace"]) == (0, 1)
    hf2mcore = build_parser().parse_args(["convert", "hf2mcore", "--load-dir", "a", "--save-dir", "b",
                                          "--moe-tp-extend-ep", "--mla-mm-split", "--mtp-num-layers", "0"])
    assert _layout_flags(hf2mcore, "target")["moe_tp_extend_ep"] and _layout_flags(hf2mcore, "target")["mla_mm_split"]
