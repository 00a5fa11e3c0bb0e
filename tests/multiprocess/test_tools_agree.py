"""The converters, training and verify agree on the layout flags: the same defaults (MindSpeed-LLM's
converter defaults, which are Megatron's), and a legacy checkpoint's recorded layout used for every
layout flag not given, one note saying which, and one line naming the value when a given one disagrees."""

import os

import pytest
import torch

from npu_dsv3.arguments import ArgsError, parse_args
from npu_dsv3.checkpoint.layout_record import recorded_layout
from npu_dsv3.cli import main
from npu_dsv3.layout import LAYOUT_DEFAULTS, LayoutError, resolve_layout, training_flag

from support.checkpoint_files import hf_tensors, release_like_hf_dir
from support.pretrain_runs import run_pretrain

TRAIN = ["--mock-data", "--micro-batch-size", "1", "--global-batch-size", "4", "--seq-length", "16",
         "--train-iters", "2", "--lr", "1e-3", "--log-interval", "1", "--eval-iters", "0", "--finetune"]
# Every kind of layout flag, none of them a default: sizes, expert TP below TP, a list, a switch.
LAYOUT = ["--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2",
          "--target-expert-parallel-size", "2", "--expert-tensor-parallel-size", "1", "--moe-grouped-gemm",
          "--num-layer-list", "1,3"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return release_like_hf_dir(str(tmp_path_factory.mktemp("hf")), seed=5)


@pytest.fixture(scope="module")
def legacy_dir(hf_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("legacy") / "ckpt")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", out, "--no-progress", *LAYOUT]) == 0
    return out


def test_resolution_order_note_and_mismatch():
    recorded = {"tensor_model_parallel_size": 2, "expert_tensor_parallel_size": 1, "num_layer_list": "1,3",
                "moe_grouped_gemm": True, "mla_mm_split": False}
    given = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": None, "num_layer_list": [1, 3]}
    values, taken = resolve_layout(given, recorded, training_flag, "--load X")
    assert set(values) == set(LAYOUT_DEFAULTS)
    # given (agreeing with the record, in another spelling), recorded, then the table
    assert values["tensor_model_parallel_size"] == 2 and values["num_layer_list"] == [1, 3]
    assert values["expert_tensor_parallel_size"] == 1 and values["moe_grouped_gemm"] is True
    assert values["pipeline_model_parallel_size"] == 1 and values["mla_mm_split"] is False
    assert taken == ["--expert-tensor-parallel-size 1", "--moe-grouped-gemm"]
    with pytest.raises(LayoutError, match=r"--load X was written with --expert-tensor-parallel-size 1, not "
                                          r"--expert-tensor-parallel-size 2: pass --expert-tensor-parallel-size 1"):
        resolve_layout({"expert_tensor_parallel_size": 2}, recorded, training_flag, "--load X")
    with pytest.raises(LayoutError, match="written with no --mla-mm-split, not --mla-mm-split: drop --mla-mm-split"):
        resolve_layout({"mla_mm_split": True}, recorded, training_flag, "--load X")
    # Nothing recorded: expert TP follows TP, or is 1 with whole experts per rank.
    plain = resolve_layout({"tensor_model_parallel_size": 4}, None, training_flag, "")[0]
    extended = resolve_layout({"tensor_model_parallel_size": 4, "moe_tp_extend_ep": True}, None, training_flag, "")[0]
    assert (plain["expert_tensor_parallel_size"], extended["expert_tensor_parallel_size"]) == (4, 1)


def test_converter_and_training_defaults_agree(hf_dir, tmp_path):
    out = str(tmp_path / "tp2")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", out, "--no-progress",
                 "--target-tensor-parallel-size", "2"]) == 0
    assert recorded_layout(out) == {**{k: v for k, v in LAYOUT_DEFAULTS.items()}, "tensor_model_parallel_size": 2,
                                    "expert_tensor_parallel_size": 2}
    # A training run with the same flags and no --load builds the same layout from its own defaults.
    args = parse_args(["--hf-config", hf_dir, *TRAIN, "--load", str(tmp_path / "none"),
                       "--tensor-model-parallel-size", "2", "--sequence-parallel"], world_size=2)
    assert {k: getattr(args, k) for k in LAYOUT_DEFAULTS} == recorded_layout(out)


def test_training_takes_the_recorded_layout(hf_dir, legacy_dir):
    args = parse_args(["--hf-config", hf_dir, *TRAIN, "--load", legacy_dir, "--sequence-parallel"], world_size=8)
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size,
            args.expert_tensor_parallel_size, args.num_layer_list, args.moe_grouped_gemm) == (2, 2, 2, 1, "1,3", True)
    notes = [n for n in args.notes if "records its layout" in n]
    assert notes == [f"--load {legacy_dir} records its layout: using --tensor-model-parallel-size 2, "
                     "--pipeline-model-parallel-size 2, --expert-model-parallel-size 2, "
                     "--expert-tensor-parallel-size 1, --num-layer-list 1,3, --moe-grouped-gemm from it"]
    with pytest.raises(ArgsError, match=r"was written with --expert-tensor-parallel-size 1, not "
                                        r"--expert-tensor-parallel-size 2: pass --expert-tensor-parallel-size 1"):
        parse_args(["--hf-config", hf_dir, *TRAIN, "--load", legacy_dir, "--sequence-parallel",
                    "--expert-tensor-parallel-size", "2"], world_size=8)
    # A value taken from the checkpoint that does not fit this run says where it came from.
    with pytest.raises(ArgsError, match=r"world size 2 is not divisible by .*records its layout"):
        parse_args(["--hf-config", hf_dir, *TRAIN, "--load", legacy_dir, "--sequence-parallel"], world_size=2)


def test_a_training_save_records_its_flags(hf_dir, tmp_path):
    """A legacy training save (--ckpt-format torch) keeps its flags in every rank file; a run resuming
    from it takes the layout from there."""
    from npu_dsv3.training.loop import saved_args

    flags = ["--pipeline-model-parallel-size", "2", "--num-layer-list", "1,3", "--moe-grouped-gemm"]
    saved = parse_args(["--hf-config", hf_dir, *TRAIN, *flags, "--load", str(tmp_path / "earlier")], world_size=2)
    rank_dir = tmp_path / "iter_0000002" / "mp_rank_00_001"
    rank_dir.mkdir(parents=True)
    torch.save({"iteration": 2, "args": saved_args(saved)}, rank_dir / "model_optim_rng.pt")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("2")
    assert recorded_layout(str(tmp_path)) == {k: getattr(saved, k) for k in LAYOUT_DEFAULTS}
    resumed = parse_args(["--hf-config", hf_dir, *TRAIN, "--load", str(tmp_path)], world_size=2)
    assert {k: getattr(resumed, k) for k in LAYOUT_DEFAULTS} == recorded_layout(str(tmp_path))
    assert any("using --pipeline-model-parallel-size 2, --num-layer-list 1,3, --moe-grouped-gemm" in note
               for note in resumed.notes)


def test_mcore2hf_and_reshard_need_no_layout_flags(hf_dir, legacy_dir, tmp_path, capsys):
    back = str(tmp_path / "back")
    assert main(["convert", "mcore2hf", "--load-dir", legacy_dir, "--save-dir", back, "--no-progress"]) == 0
    assert capsys.readouterr().err.count("records its layout") == 1
    original, exported = hf_tensors(hf_dir), hf_tensors(back)
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)
    resharded = str(tmp_path / "tp1")
    assert main(["convert", "reshard", "--load-dir", legacy_dir, "--save-dir", resharded, "--no-progress"]) == 0
    assert capsys.readouterr().err.count("records its layout") == 1
    assert recorded_layout(resharded) == dict(LAYOUT_DEFAULTS, tensor_model_parallel_size=1,
                                              expert_tensor_parallel_size=1)
    # a source flag that contradicts the record is one line naming the flag of this command
    assert main(["convert", "mcore2hf", "--load-dir", legacy_dir, "--save-dir", str(tmp_path / "x"),
                 "--source-pipeline-parallel-size", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "not --source-pipeline-parallel-size 4: pass --source-pipeline-parallel-size 2" in err
    assert main(["convert", "reshard", "--load-dir", legacy_dir, "--save-dir", str(tmp_path / "y"),
                 "--source-num-layer-list", "2,2"]) == 2
    assert "pass --source-num-layer-list 1,3" in capsys.readouterr().err


@pytest.mark.parametrize("save_format", ["torch", "torch_dist"])
def test_reshard_names_its_target_flags_in_layout_errors(legacy_dir, tmp_path, capsys, save_format):
    """reshard prefixes every flag of both sides (--target-expert-tensor-parallel-size), hf2mcore only the
    parallel sizes: a layout error speaks the command's own names."""
    assert main(["convert", "reshard", "--load-dir", legacy_dir, "--save-dir", str(tmp_path / "out"),
                 "--save-format", save_format, "--target-tensor-parallel-size", "2",
                 "--target-expert-tensor-parallel-size", "3"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the note on the recorded source layout
    assert error.startswith("npu-dsv3 convert: error: --target-expert-tensor-parallel-size 3 must be 1 or equal "
                            "--target-tensor-parallel-size 2")


def test_verify_takes_the_recorded_layout_and_speaks_its_own_flags(hf_dir, legacy_dir, capsys):
    assert main(["verify", "--hf-dir", hf_dir, "--mcore-dir", legacy_dir, "--tensor-model-parallel-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "pass --tensor-model-parallel-size 2" in err and "--source" not in err and "--target" not in err
    assert main(["verify", "--hf-dir", hf_dir, "--mcore-dir", legacy_dir]) == 0
    captured = capsys.readouterr()
    assert '"passed": true' in captured.out and captured.err.count("records its layout") == 1


@pytest.mark.slow  # two training processes
def test_convert_then_train_with_the_same_flags(hf_dir, tmp_path):
    """hf2mcore --target-tensor-parallel-size 2, then training with --tensor-model-parallel-size 2: the
    same defaults on both sides, so the legacy rank files load; the losses equal a single process's."""
    tp2, tp1 = str(tmp_path / "tp2"), str(tmp_path / "tp1")
    for out, size in ((tp2, "2"), (tp1, "1")):
        assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", out, "--no-progress",
                     "--target-tensor-parallel-size", size]) == 0
    runs = {}
    for name, world, flags in (("tp2", 2, ["--load", tp2, "--tensor-model-parallel-size", "2", "--sequence-parallel"]),
                               ("tp1", 1, ["--load", tp1])):
        runs[name] = run_pretrain(world, ["--hf-config", hf_dir, *TRAIN, *flags], tmp_path / f"{name}.jsonl")
    assert [r["iteration"] for r in runs["tp2"]] == [1, 2]
    for ours, single in zip(runs["tp2"], runs["tp1"]):
        assert ours["lm_loss"] == pytest.approx(single["lm_loss"], rel=1e-6, abs=0)
    assert os.path.isfile(os.path.join(tp2, "release", "mp_rank_01", "model_optim_rng.pt"))
