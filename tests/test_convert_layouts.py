"""HF -> megatron legacy per-rank checkpoint -> HF, for every layout training accepts."""

import os

import pytest
import torch
from safetensors.torch import load_file

from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.checkpoint.mcore_legacy import rank_file, rank_payload, read_hf_tensors
from npu_dsv3.checkpoint.rank_state import ParallelLayout
from npu_dsv3.config import hf_to_mcore_config_dpskv3, load_hf_config
from npu_dsv3.layout import LayoutError
from npu_dsv3.model import forward_logits, load_mcore
from npu_dsv3.tiny_model import cast_like_release, make_hf_model, save_hf
from npu_dsv3.verify import compare_logits

LAYOUTS = {
    "tp1": {},
    "tp2-pp2-ep2-etp1": dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                             expert_model_parallel_size=2),
    "tp2-etp2-ep3-vpp-noop": dict(tensor_model_parallel_size=2, expert_tensor_parallel_size=2,
                                  expert_model_parallel_size=3, pipeline_model_parallel_size=2,
                                  num_layers_per_virtual_pipeline_stage=1, noop_layers="1,5"),
    "pp2-num-layer-list-per-expert": dict(pipeline_model_parallel_size=2, num_layer_list="1,3",
                                          expert_model_parallel_size=4, moe_grouped_gemm=False),
    "dualpipev-noop": dict(pipeline_model_parallel_size=2, schedules_method="dualpipev", noop_layers="2,5,6,7",
                           expert_model_parallel_size=2),
    "pp4-tp2": dict(pipeline_model_parallel_size=4, tensor_model_parallel_size=2),
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


def _convert(tensors, config, root, **flags):
    par = ParallelLayout.from_flags(config, **flags)
    for ranks in par.ranks():
        target = rank_file(str(root), par, *ranks)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        torch.save(rank_payload(config, par, tensors.__getitem__, *ranks), target)
    return par


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_round_trip_is_bit_exact(checkpoint, tmp_path, name):
    _, tensors, config = checkpoint
    par = _convert(tensors, config, tmp_path, **LAYOUTS[name])
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
    _convert(tensors, config, mcore_dir, **flags)
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
    _convert(tensors, config, tmp_path, pipeline_model_parallel_size=2)
    wrong = ParallelLayout.from_flags(config, pipeline_model_parallel_size=2, tensor_model_parallel_size=2)
    with pytest.raises(CheckpointError, match="mp_rank_01_000"):
        dict(read_hf_tensors(str(tmp_path), config, wrong))
    wrong_vpp = ParallelLayout.from_flags(config, pipeline_model_parallel_size=2,
                                          num_layers_per_virtual_pipeline_stage=1)
    with pytest.raises(CheckpointError, match="model0"):
        dict(read_hf_tensors(str(tmp_path), config, wrong_vpp))
