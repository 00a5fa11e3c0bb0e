"""The model each rank builds is what the checkpoint converter writes for it, for every layout
training accepts: pipeline placement (--num-layer-list, VPP, --noop-layers, dualpipev),
--mla-mm-split and --moe-tp-extend-ep. Multi-process cases run this file (``build_stages``) and
tests/support/mp_load_converted.py in gloo processes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from npu_dsv3.checkpoint.rank_state import chunk_state_dict
from npu_dsv3.cli import main
from npu_dsv3.config import hf_to_mcore_config_dpskv3, load_hf_config
from npu_dsv3.layout import LayoutError, ParallelLayout, PipelineLayout
from npu_dsv3.model import forward_logits, load_hf
from npu_dsv3.model.placement import layer_offset, pipeline_layout
from npu_dsv3.tiny_model import make_hf_model, save_hf

from support import MP_LOAD_CONVERTED, free_port, process_env

STAGES_SCRIPT = os.path.abspath(__file__)
LOAD_SCRIPT = str(MP_LOAD_CONVERTED)

# Pipeline layouts of a 4-real-layer model on 2 pipeline ranks: config overrides, and the
# converter's flags for the same layout.
PP_LAYOUTS = {
    "num-layer-list-1-3": (dict(num_layer_list=[1, 3]), dict(num_layer_list="1,3")),
    "vpp-2": (dict(virtual_pipeline_model_parallel_size=2), dict(num_layers_per_virtual_pipeline_stage=1)),
    "noop-middle-and-end": (dict(noop_layers=[1, 5]), dict(noop_layers="1,5")),
    "dualpipev": (dict(schedules_method="dualpipev", virtual_pipeline_model_parallel_size=2),
                  dict(schedules_method="dualpipev")),
    "dualpipev-noop-mtp": (dict(schedules_method="dualpipev", virtual_pipeline_model_parallel_size=2,
                                noop_layers=[0, 3, 4, 7], mtp_num_layers=1),
                           dict(schedules_method="dualpipev", noop_layers="0,3,4,7")),
}


def run_ranks(script: str, args, world: int, timeout: int = 120) -> list:
    """Run ``script`` in ``world`` gloo processes; each prints one JSON line last."""
    env = {**process_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, script, *map(str, args)], env={**env, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


def _config(hf_dir, **overrides):
    return hf_to_mcore_config_dpskv3(load_hf_config(hf_dir), use_cpu_initialization=True,
                                     perform_initialization=False, pipeline_dtype=torch.float32, **overrides)


# --------------------------------------------------------------------------- placement


def test_pipeline_layout_from_config_is_the_converters(tmp_path):
    hf_dir = save_hf(make_hf_model(seed=1, num_hidden_layers=4), str(tmp_path / "hf"))
    for name, (overrides, flags) in PP_LAYOUTS.items():
        config = _config(hf_dir, pipeline_model_parallel_size=2, **overrides)
        par = ParallelLayout.from_flags(config, pipeline_model_parallel_size=2, **flags)
        assert pipeline_layout(config) == par.pipeline, name


def test_layer_offset_counts_real_layers_before_the_chunk(tmp_path):
    hf_dir = save_hf(make_hf_model(seed=1, num_hidden_layers=4), str(tmp_path / "hf"))
    config = _config(hf_dir, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2,
                     schedules_method="dualpipev", noop_layers=[0, 3, 4, 7])
    # 4 stages of 2 global layers (n = noop): rank 0 holds [0n, 1] and [6, 7n], rank 1 [2, 3n] and [4n, 5]
    offsets = {(r, c): layer_offset(config, vp_stage=c, pp_rank=r) for r in range(2) for c in range(2)}
    assert offsets == {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}


def test_unsupported_layouts_are_refused(tmp_path):
    hf_dir = save_hf(make_hf_model(seed=1, num_hidden_layers=4), str(tmp_path / "hf"))
    with pytest.raises(LayoutError, match="schedules-method"):
        pipeline_layout(_config(hf_dir, schedules_method="1f1b-overlap"))
    with pytest.raises(LayoutError, match="does not split"):
        pipeline_layout(_config(hf_dir, pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=3))
    with pytest.raises(LayoutError, match="must be 2"):
        pipeline_layout(_config(hf_dir, pipeline_model_parallel_size=2, schedules_method="dualpipev"))


def test_pp_stages_build_exactly_the_converters_chunks(tmp_path):
    """Each (pp rank, chunk) built on 2 pipeline ranks has the converter's parameter names and
    shapes; real layers carry their HF layer number, noop layers are identities."""
    hf = make_hf_model(seed=2, num_hidden_layers=4, first_k_dense_replace=1)
    hf_dir = save_hf(hf, str(tmp_path / "hf"), with_mtp=True)
    spec_file = tmp_path / "layouts.json"
    spec_file.write_text(json.dumps({name: overrides for name, (overrides, _) in PP_LAYOUTS.items()}))
    results = run_ranks(STAGES_SCRIPT, [hf_dir, spec_file], world=2)
    tensors = _hf_tensors(hf_dir)
    for name, (overrides, flags) in PP_LAYOUTS.items():
        config = _config(hf_dir, pipeline_model_parallel_size=2, **{"mtp_num_layers": None, **overrides})
        par = ParallelLayout.from_flags(config, pipeline_model_parallel_size=2,
                                        moe_grouped_gemm=config.moe_grouped_gemm, **flags)
        for pp_rank, chunk in par.pipeline.stages():
            built = results[pp_rank][name][str(chunk)]
            expected = chunk_state_dict(config, par, tensors.__getitem__, 0, pp_rank, 0, chunk)
            assert built["params"] == {k: list(v.shape) for k, v in expected.items()}, (name, pp_rank, chunk)
            layers = par.pipeline.chunk_layers(pp_rank, chunk)
            want = [None if par.pipeline.real_layer(i) is None else par.pipeline.real_layer(i) + 1 for i in layers]
            assert built["layer_numbers"] == want, (name, pp_rank, chunk)
            assert built["noop_is_identity"], (name, pp_rank, chunk)
            # torch_dist keys number real layers; a noop layer before a real one in its chunk
            # cannot be expressed there and is refused.
            last_real = max((p for p, n in enumerate(want) if n is not None), default=-1)
            real = [n - 1 for n in want if n is not None]
            assert built["dist_layers"] == ("refused" if None in want[:last_real] else real), (name, pp_rank, chunk)
            if par.pipeline.has_head(pp_rank, chunk) and config.mtp_num_layers:
                assert built["mtp_layer_number"] == config.num_layers + 1


def _hf_tensors(hf_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(hf_dir, "model.safetensors"))


# --------------------------------------------------------------------------- --mla-mm-split


def test_mla_mm_split_gives_the_unsplit_logits(world1, tmp_path):
    hf_dir = save_hf(make_hf_model(seed=5), str(tmp_path / "hf"))
    unsplit, split = load_hf(hf_dir), load_hf(hf_dir, mla_mm_split=True)
    names = {k for k in split.state_dict() if "self_attention.linear_" in k}
    assert "decoder.layers.0.self_attention.linear_qk_nope.weight" in names
    assert not any("up_proj" in k for k in names)
    ids = torch.randint(0, 203, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = forward_logits(unsplit, ids), forward_logits(split, ids)
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()


def test_mla_mm_split_without_q_lora_splits_kv_only(world1, tmp_path):
    hf_dir = save_hf(make_hf_model(seed=6, q_lora_rank=None), str(tmp_path / "hf"))
    unsplit, split = load_hf(hf_dir), load_hf(hf_dir, mla_mm_split=True)
    names = set(split.state_dict())
    assert "decoder.layers.0.self_attention.linear_q_proj.weight" in names
    assert "decoder.layers.0.self_attention.linear_kv_nope.weight" in names
    ids = torch.randint(0, 203, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = forward_logits(unsplit, ids), forward_logits(split, ids)
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()


# --------------------------------------------------------------------------- converted checkpoints


def _convert(hf_dir, out, *flags):
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", out, "--no-progress",
                 "--moe-grouped-gemm", *flags]) == 0
    return out


@pytest.mark.parametrize("ep", [1, 2], ids=["ep1-world2", "ep2-world4"])
def test_tp2_mla_mm_split_and_moe_tp_extend_ep_load_and_match_transformers(ep, tmp_path):
    """TP 2 with --mla-mm-split and --moe-tp-extend-ep: megatron's expert group spans EP x TP
    ranks with expert TP 1 and numbers expert rank e * TP + t for tensor rank t of data-parallel
    (converter EP) rank e, the converter's placement; each rank's strict load of its file gives
    transformers' logits."""
    hf_dir = save_hf(make_hf_model(seed=7, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4),
                     str(tmp_path / "hf"))
    legacy = _convert(hf_dir, str(tmp_path / "legacy"), "--target-tensor-parallel-size", "2",
                      "--target-expert-parallel-size", str(ep), "--mla-mm-split", "--moe-tp-extend-ep")
    args = [hf_dir, legacy, "--tp", "2", "--ep", str(ep), "--mla-mm-split", "--moe-tp-extend-ep"]
    for r in run_ranks(LOAD_SCRIPT, args, world=2 * ep):
        assert r["expert_rank"] == r["rank"] and r["tp_rank"] == r["rank"] % 2, r  # TP ranks adjacent
        assert r["legacy"] < 1e-5, r


@pytest.mark.parametrize("flags", [("--num-layer-list", "1,3"), ("--noop-layers", "1,5")], ids=lambda f: f[0][2:])
def test_pp2_stages_load_converted_files_and_run_the_pipeline(flags, tmp_path):
    """PP 2: each stage strictly loads its converted rank file; a forward through megatron's
    pipeline schedule gives transformers' logits on the last stage."""
    hf_dir = save_hf(make_hf_model(seed=8, num_hidden_layers=4), str(tmp_path / "hf"))
    legacy = _convert(hf_dir, str(tmp_path / "legacy"), "--target-pipeline-parallel-size", "2", *flags)
    results = sorted(run_ranks(LOAD_SCRIPT, [hf_dir, legacy, "--pp", "2", *flags], world=2), key=lambda r: r["rank"])
    assert results[0]["legacy"] is None  # the first stage has no logits
    assert results[1]["legacy"] < 1e-5, results


# --------------------------------------------------------------------------- child process


def _layer_numbers(model):
    return [None if type(layer).__name__ == "NoopTransformerLayer" else layer.layer_number
            for layer in model.decoder.layers]


def _noop_is_identity(model) -> bool:
    x = torch.randn(3, 2, model.config.hidden_size)
    noops = [layer for layer in model.decoder.layers if type(layer).__name__ == "NoopTransformerLayer"]
    return all(torch.equal(layer(hidden_states=x, attention_mask=None)[0], x) for layer in noops)


def _dist_layers(model):
    """The decoder-layer indices of the chunk's torch_dist keys, or "refused"."""
    from megatron.core import parallel_state

    # megatron's training passes this group; the MTP chunk's embedding copy needs it.
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    try:
        keys = [t.key for t in model.sharded_state_dict(metadata=metadata).values() if hasattr(t, "key")]
    except ValueError:
        return "refused"
    return sorted({int(k.split(".")[2]) for k in keys if k.startswith("decoder.layers.")})


def build_stages(hf_dir: str, layouts_file: str) -> None:
    """Child of test_pp_stages_build_exactly_the_converters_chunks: PP 2 over the gloo world;
    every chunk of this rank for every layout, as parameter shapes and layer numbers."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from npu_dsv3.model.builder import build_model
    from npu_dsv3.model.placement import dualpipev_embedding_ranks

    dist.init_process_group("gloo")
    with open(layouts_file) as f:
        layouts = json.load(f)
    out = {}
    for name, overrides in layouts.items():
        config = _config(hf_dir, pipeline_model_parallel_size=2, **{"mtp_num_layers": None, **overrides})
        chunks = config.virtual_pipeline_model_parallel_size
        dualpipev = overrides.get("schedules_method") == "dualpipev"
        kwargs = {"get_embedding_ranks": dualpipev_embedding_ranks} if dualpipev else {}
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2,
                                                 virtual_pipeline_model_parallel_size=chunks, **kwargs)
        out[name] = {}
        for chunk in range(chunks or 1):
            model = build_model(config, vp_stage=chunk if chunks else None)
            params = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
            mtp = model.mtp.layers[0].transformer_layer.layer_number if model.mtp_process else None
            out[name][str(chunk)] = {"params": params, "layer_numbers": _layer_numbers(model),
                                     "noop_is_identity": _noop_is_identity(model), "mtp_layer_number": mtp,
                                     "dist_layers": _dist_layers(model)}
        parallel_state.destroy_model_parallel()
    print(json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    import npu_dsv3  # noqa: F401  (patches)

    build_stages(*sys.argv[1:])
