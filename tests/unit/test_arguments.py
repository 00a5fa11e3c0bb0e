"""Training flags: the real MindSpeed-LLM DeepSeek-V3 recipes parse, --hf-config supplies the model,
impossible runs fail at start-up naming the flags, and the flags land in the right config fields."""

import argparse
import json
import shlex

import pytest

from npu_dsv3.arguments import FLAG_TABLE, ArgsError, Unsupported, build_configs, build_parser, parse_args
from npu_dsv3.config import hf_to_mcore_config_dpskv3
from npu_dsv3.model.placement import pipeline_layout

from support.recipes import PRETRAIN_A2, PRETRAIN_A3, TUNE_FULL_A3, TUNE_LORA_A3_EXTRA, flags


RECIPES = {"pretrain_A3": (PRETRAIN_A3, 512, "pretrain"), "pretrain_A2": (PRETRAIN_A2, 512, "pretrain"),
           "tune_full_A3": (TUNE_FULL_A3, 256, "finetune")}


def _without_refused(text):
    """The recipe's arguments minus the refused flags and their values."""
    out, skipping = [], False
    for arg in shlex.split(text):
        if arg.startswith("--"):
            skipping = isinstance(FLAG_TABLE.get(arg), Unsupported)
        if not skipping:
            out.append(arg)
    return out


def _parse(name):
    text, world, mode = RECIPES[name]
    return parse_args(_without_refused(text), world, mode)


@pytest.fixture(scope="module")
def hf_dir(released_config_dir):
    return released_config_dir


BASE = ["--micro-batch-size", "1", "--seq-length", "64", "--train-iters", "10", "--lr", "1e-4", "--mock-data"]


def _hf_run(hf_dir, *extra, world=1, mode="pretrain"):
    return parse_args(["--hf-config", hf_dir[0], *BASE, *extra], world, mode)


# --------------------------------------------------------------------------- the table


@pytest.mark.parametrize("text", [PRETRAIN_A3, PRETRAIN_A2, TUNE_FULL_A3, TUNE_LORA_A3_EXTRA])
def test_every_recipe_flag_is_decided(text):
    assert [f for f in flags(text) if f not in FLAG_TABLE] == []


def test_table_and_parser_agree():
    options = {s for a in build_parser()._actions for s in a.option_strings} - {"-h", "--help"}
    assert options == set(FLAG_TABLE)


@pytest.mark.parametrize("flag", sorted(f for f, w in FLAG_TABLE.items() if isinstance(w, Unsupported)))
def test_refused_flags_say_why(flag):
    with pytest.raises(ArgsError, match=f"{flag} is not supported: {FLAG_TABLE[flag].reason[:20]}"):
        parse_args([*BASE, flag, "4"], 1)


def test_unknown_and_abbreviated_flags_are_errors():
    with pytest.raises(ArgsError, match="unrecognized arguments: --no-such-flag"):
        parse_args([*BASE, "--no-such-flag"], 1)
    with pytest.raises(ArgsError, match="unrecognized arguments: --lr-warmup"):
        parse_args([*BASE, "--lr-warmup", "2"], 1)


# --------------------------------------------------------------------------- real recipes


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_parses_without_its_refused_flags(name):
    args = _parse(name)
    model, sizes, layout, optimizer = build_configs(args)
    assert model.num_layers == 61 and len(layout.pipeline.noop_layers) == 3
    assert (model.q_lora_rank, model.kv_lora_rank, model.qk_head_dim, model.qk_pos_emb_head_dim,
            model.v_head_dim) == (1536, 512, 128, 64, 128)
    assert (model.num_moe_experts, model.moe_router_topk, model.moe_ffn_hidden_size,
            model.moe_shared_expert_intermediate_size) == (256, 8, 2048, 2048)
    assert model.moe_layer_freq == [0, 0, 0] + [1] * 58
    assert (model.moe_router_num_groups, model.moe_router_group_topk) == (8, 4)
    assert model.moe_router_score_function == "sigmoid" and model.moe_router_enable_expert_bias
    assert model.moe_router_norm_topk_prob and model.moe_router_topk_scaling_factor == 2.5
    assert model.moe_router_load_balancing_type == "seq_aux_loss" and model.moe_router_dtype == "fp32"
    assert model.mtp_num_layers == 1 and model.mtp_loss_scaling_factor == 0.3
    assert model.rope_type == "yarn" and model.rotary_scaling_factor == 40 and model.mscale_all_dim == 1.0
    assert not model.tie_word_embeddings and model.layernorm_epsilon == 1e-6 and model.hidden_dropout == 0.0
    assert model.recompute_granularity == "full" and model.moe_token_dispatcher_type == "alltoall"
    assert model.use_flash_attn and model.use_fused_rmsnorm and model.moe_grouped_gemm and model.bf16
    assert args.padded_vocab_size == 129280 and optimizer.use_distributed_optimizer and optimizer.lr == 1e-5
    assert sizes.world_size == sizes.tp * sizes.pp * sizes.dp
    assert pipeline_layout(model) == layout.pipeline  # the model builder places layers as the layout says


def test_a3_recipe_layout_and_sizes():
    args = _parse("pretrain_A3")
    _, sizes, layout, _ = build_configs(args)
    assert (sizes.tp, sizes.pp, sizes.ep, sizes.etp, sizes.dp, sizes.num_microbatches) == (2, 8, 16, 1, 32, 120)
    assert layout.pipeline.dualpipev and layout.tp_extend_ep and layout.mla_mm_split
    model = build_configs(args).model
    assert (model.expert_model_parallel_size, model.expert_tensor_parallel_size) == (32, 1)  # EP x TP, whole experts
    assert model.moe_tp_extend_ep and model.mla_mm_split and model.schedules_method == "dualpipev"
    assert model.noop_layers == [61, 62, 63] and model.virtual_pipeline_model_parallel_size == 2
    assert layout.pipeline.chunk_layers(0, 1) == [60, 61, 62, 63]
    assert args.manual_gc and not args.shared_storage and args.reset_position_ids and not args.load_optim


def test_old_and_megatron_names_build_the_same_model():
    old, new = build_configs(_parse("pretrain_A3")).model, build_configs(_parse("pretrain_A2")).model
    for field in ("qk_head_dim", "qk_pos_emb_head_dim", "moe_router_num_groups", "moe_router_group_topk",
                  "moe_router_topk_scaling_factor", "beta_fast", "beta_slow", "moe_router_load_balancing_type",
                  "moe_router_enable_expert_bias", "moe_router_dtype"):
        assert getattr(old, field) == getattr(new, field), field


def test_tune_recipe_groups_default_to_expert_parallel_size():
    args = _parse("tune_full_A3")
    assert args.finetune and args.stage == "sft" and args.is_instruction_dataset and args.variable_seq_lengths
    assert any("--expert-model-parallel-size (8)" in note for note in args.notes)


def test_finetune_flags_need_finetune_mode():
    text, world, _ = RECIPES["tune_full_A3"]
    with pytest.raises(ArgsError, match="--stage, --is-instruction-dataset, --variable-seq-lengths: fine-tuning"):
        parse_args(_without_refused(text), world, "pretrain")


# --------------------------------------------------------------------------- --hf-config


def test_hf_config_supplies_the_model(hf_dir):
    path, hf = hf_dir
    model = build_configs(_hf_run(hf_dir)).model
    expected = hf_to_mcore_config_dpskv3(hf)
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "q_lora_rank",
                  "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "num_moe_experts",
                  "moe_router_topk", "moe_layer_freq", "moe_shared_expert_intermediate_size",
                  "moe_router_num_groups", "moe_router_group_topk", "moe_router_enable_expert_bias",
                  "moe_router_load_balancing_type", "moe_router_topk_scaling_factor", "mtp_num_layers",
                  "rotary_scaling_factor", "mscale", "mscale_all_dim", "original_max_position_embeddings",
                  "vocab_size", "tie_word_embeddings", "layernorm_epsilon"):
        assert getattr(model, field) == getattr(expected, field), field
    assert model.hidden_dropout == 0.0


def test_explicit_flags_override_hf_config(hf_dir):
    args = _hf_run(hf_dir, "--num-layers", "6", "--noop-layers", "5", "--first-k-dense-replace", "1",
                   "--moe-router-topk", "4", "--n-group", "4", "--topk-group", "2", "--mtp-num-layers", "0",
                   "--rope-scaling-factor", "8", "--moe-router-load-balancing-type", "none", "--hidden-size", "512")
    model = build_configs(args).model
    assert model.num_layers == 5 and model.moe_layer_freq == [0, 1, 1, 1, 1]
    assert (model.moe_router_topk, model.moe_router_num_groups, model.moe_router_group_topk) == (4, 4, 2)
    assert model.mtp_num_layers is None and model.hidden_size == 512
    assert model.rotary_scaling_factor == 8 and model.original_max_position_embeddings == 4096  # other keys kept
    assert model.moe_router_load_balancing_type == "none" and model.moe_router_enable_expert_bias


def test_flags_only_model_uses_megatron_defaults():
    argv = [*BASE, "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads",
            "4", "--vocab-size", "100", "--kv-lora-rank", "16", "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "8",
            "--v-head-dim", "8", "--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "32"]
    model = build_configs(parse_args(argv, 1)).model
    assert model.moe_router_score_function == "softmax" and not model.moe_router_enable_expert_bias
    assert model.moe_router_load_balancing_type == "aux_loss" and model.moe_aux_loss_coeff == 0.0
    assert model.tie_word_embeddings and model.q_lora_rank is None and model.max_position_embeddings == 64
    assert model.hidden_dropout == 0.1 and model.moe_layer_freq == [1, 1, 1, 1] and model.rope_type == "rope"
    at = argv.index("--num-experts")
    with pytest.raises(ArgsError, match="the model needs --num-experts$"):
        parse_args(argv[:at] + argv[at + 2:], 1)


def test_flags_only_model_names_missing_flags():
    with pytest.raises(ArgsError, match=r"without --hf-config the model needs --num-layers, --hidden-size"):
        parse_args(BASE, 1)


def test_seq_aux_and_noaux_tc_map_to_megatron(hf_dir):
    seq = build_configs(_hf_run(hf_dir, "--moe-router-load-balancing-type", "noaux_tc", "--seq-aux")).model
    assert seq.moe_router_load_balancing_type == "seq_aux_loss" and seq.moe_router_enable_expert_bias
    bias_only = build_configs(_hf_run(hf_dir, "--moe-router-load-balancing-type", "noaux_tc")).model
    assert bias_only.moe_router_load_balancing_type == "none" and bias_only.moe_router_enable_expert_bias


def test_hf_config_errors_are_one_line(tmp_path, hf_dir):
    with pytest.raises(ArgsError, match="--hf-config: no HF config found"):
        _hf_run((str(tmp_path / "missing"), None))


# --------------------------------------------------------------------------- start-up checks


@pytest.mark.parametrize("extra,world,message", [
    (["--tensor-model-parallel-size", "3"], 8, "world size 8 is not divisible by --tensor-model-parallel-size 3 x "
                                               "--pipeline-model-parallel-size 1"),
    (["--global-batch-size", "6", "--tensor-model-parallel-size", "2"], 8,
     "--global-batch-size 6 is not divisible by --micro-batch-size 1 x data-parallel size 4"),
    (["--expert-model-parallel-size", "3"], 6, "256 experts do not divide over --expert-model-parallel-size 3"),
    (["--expert-model-parallel-size", "16", "--tensor-model-parallel-size", "32", "--moe-tp-extend-ep",
      "--sequence-parallel"], 512, "--moe-tp-extend-ep: 256 experts do not divide over --expert-model-parallel-size 16 "
                                   "x --tensor-model-parallel-size 32"),
    (["--moe-tp-extend-ep", "--expert-tensor-parallel-size", "2", "--tensor-model-parallel-size", "2",
      "--sequence-parallel"], 2,
     "--moe-tp-extend-ep keeps every expert whole: --expert-tensor-parallel-size must be 1"),
    (["--expert-model-parallel-size", "4"], 2, "not divisible by --expert-model-parallel-size x "
                                               "--expert-tensor-parallel-size (4)"),
    (["--tensor-model-parallel-size", "3"], 3, "attention heads (128) does not split over 3 tensor-parallel ranks; "
                                               "change --tensor-model-parallel-size"),
    (["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2"], 4, "needs --sequence-parallel"),
    (["--tensor-model-parallel-size", "2"], 2, "a MoE model with --tensor-model-parallel-size 2 needs --sequence-parallel"),
    (["--pipeline-model-parallel-size", "4"], 4,
     "--num-layers (61) is not divisible by --pipeline-model-parallel-size (4); use --num-layer-list or --noop-layers"),
    (["--noop-layers", "70"], 1, "--noop-layers [70] are outside the 62 layers of --num-layers"),
    (["--pipeline-model-parallel-size", "4", "--num-layer-list", "15,15,16,14"], 4,
     "--num-layer-list 15,15,16,14 must have --pipeline-model-parallel-size (4) positive entries summing to"),
    (["--pipeline-model-parallel-size", "4", "--noop-layers", "61,62", "--schedules-method", "dualpipev",
      "--global-batch-size", "8"], 4, "dualpipev needs --pipeline-model-parallel-size >= 2 and --num-layers (63) a "
                                      "multiple of 2 x pp (8); pad with --noop-layers"),
    (["--pipeline-model-parallel-size", "4", "--noop-layers", "61,62,63,64,65,66,67", "--schedules-method",
      "dualpipev", "--global-batch-size", "4"], 4, "dualpipev needs at least 2 x --pipeline-model-parallel-size (8)"),
    (["--pipeline-model-parallel-size", "2", "--noop-layers", "61,62,63", "--schedules-method", "dualpipev",
      "--num-layers-per-virtual-pipeline-stage", "4", "--global-batch-size", "8"], 2,
     "--num-layers-per-virtual-pipeline-stage and --schedules-method dualpipev cannot be combined"),
    (["--num-layers-per-virtual-pipeline-stage", "2"], 1, "needs --pipeline-model-parallel-size >= 2"),
    (["--pipeline-model-parallel-size", "2", "--noop-layers", "61,62,63", "--num-layers-per-virtual-pipeline-stage",
      "4", "--global-batch-size", "3"], 2, "3 micro-batches per step"),
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 exclude each other"),
    (["--data-path", "x"], 1, "give exactly one of --data-path and --mock-data"),
    (["--recompute-granularity", "full"], 1, "--recompute-granularity full needs --recompute-method"),
    (["--recompute-method", "block"], 1, "--recompute-method need --recompute-granularity"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "2"], 1,
     "selective takes --recompute-modules, not --recompute-method / --recompute-num-layers"),
    (["--finetune"], 1, "--finetune starts from a checkpoint: give --load DIR"),
    (["--save-interval", "5"], 1, "--save-interval needs --save"),
    (["--tokenizer-type", "PretrainedFromHF"], 1, "--tokenizer-type PretrainedFromHF needs --tokenizer-name-or-path"),
    (["--tokenizer-name-or-path", "t"], 1,
     "--tokenizer-name-or-path is read only by --tokenizer-type PretrainedFromHF"),
    (["--context-parallel-size", "2"], 2, "--context-parallel-size 2: context parallelism"),
    (["--moe-token-dispatcher-type", "flex"], 1, "flex needs DeepEP"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "63"], 2,
     "--sequence-parallel splits --seq-length 63 over --tensor-model-parallel-size 2"),
    (["--topk-group", "9"], 1, "--moe-router-group-topk (--topk-group) 9 must be between 1 and "
                               "--moe-router-num-groups (--n-group) 8"),
    (["--n-group", "7"], 1, "--num-experts 256 is not divisible by --moe-router-num-groups (--n-group) 7"),
    (["--n-group", "8", "--moe-router-num-groups", "4"], 1, "--moe-router-num-groups 4 contradicts --n-group 8"),
    (["--schedules-method", "dualpipev", "--pipeline-model-parallel-size", "2", "--noop-layers", "61,62,63",
      "--global-batch-size", "4"], 2, None),
    (["--padded-vocab-size", "1000"], 1, "--padded-vocab-size 1000 must be >= the vocabulary (129280)"),
    (["--spec", "my.spec", "layer_spec"], 1, "only --spec mindspeed_llm.tasks.models.spec.deepseek_spec layer_spec"),
    (["--min-lr", "1"], 1, "--min-lr 1.0 is above --lr 0.0001"),
    (["--moe-fb-overlap"], 1, "--moe-fb-overlap overlaps the forward/backward pairs of --schedules-method dualpipev"),
    (["--schedules-method", "dualpipev", "--pipeline-model-parallel-size", "2", "--noop-layers", "61,62,63",
      "--global-batch-size", "4", "--moe-fb-overlap", "--hidden-dropout", "0.1", "--recompute-granularity", "full",
      "--recompute-method", "uniform", "--recompute-num-layers", "1"], 2,
     "--moe-fb-overlap with recompute needs --hidden-dropout 0 and --attention-dropout 0"),
    (["--optimizer", "sgd", "--use-distributed-optimizer"], 1,
     "--use-distributed-optimizer runs --optimizer adam only"),
])
def test_impossible_runs_name_the_flags(hf_dir, extra, world, message):
    if message is None:  # the control: a valid dualpipev run
        _hf_run(hf_dir, *extra, world=world)
        return
    with pytest.raises(ArgsError) as error:
        _hf_run(hf_dir, *extra, world=world)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_dualpipev_needs_untied_embeddings(hf_dir, tmp_path):
    path, hf = hf_dir
    (tmp_path / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": True}))
    with pytest.raises(ArgsError, match="dualpipev needs --untie-embeddings-and-output-weights"):
        _hf_run((str(tmp_path), None), "--schedules-method", "dualpipev", "--pipeline-model-parallel-size", "2",
                "--noop-layers", "61,62,63", "--global-batch-size", "4", world=2)


def test_sequence_parallel_is_off_without_tensor_parallelism(hf_dir):
    args = _hf_run(hf_dir, "--sequence-parallel")
    assert not args.sequence_parallel and not build_configs(args).model.sequence_parallel
    assert any("--sequence-parallel" in note for note in args.notes)


def test_finetune_mode(hf_dir):
    with pytest.raises(ArgsError, match="python -m npu_dsv3.finetune starts from a checkpoint"):
        _hf_run(hf_dir, mode="finetune")
    args = _hf_run(hf_dir, "--load", "ckpt", mode="finetune")
    assert args.finetune and args.load == "ckpt"


def test_parallel_sizes_and_defaults(hf_dir):
    args = _hf_run(hf_dir, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                   "--noop-layers", "61,62,63", "--num-layers-per-virtual-pipeline-stage", "4",
                   "--expert-model-parallel-size", "4", "--sequence-parallel", "--global-batch-size", "8", world=16)
    model, sizes, layout, _ = build_configs(args)
    assert (sizes.tp, sizes.pp, sizes.ep, sizes.etp, sizes.dp, sizes.num_microbatches, sizes.vpp) == (
        2, 2, 4, 2, 4, 2, 8)
    assert model.expert_tensor_parallel_size == 2 and model.virtual_pipeline_model_parallel_size == 8
    assert layout.pipeline.num_chunks == 8 and args.tokenizer_type == "NullTokenizer"
    assert pipeline_layout(model) == layout.pipeline
    assert args.padded_vocab_size == 129280  # already a multiple of 128 x TP 2
    assert isinstance(args, argparse.Namespace)
