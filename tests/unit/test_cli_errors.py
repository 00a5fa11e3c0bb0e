"""Bad input and unusable outputs end in one line and exit 2, naming what is wrong; every flag has help."""

import argparse
import errno
import json
import os

import pytest

from npu_dsv3.argtypes import positive_int
from npu_dsv3.arguments import ArgsError, build_parser, parse_args
from npu_dsv3.cli import build_parser as cli_parser
from npu_dsv3.cli import main
from npu_dsv3.config import load_hf_config
from npu_dsv3.data.tokenizer import load_tokenizer

from support.checkpoint_files import release_like_hf_dir


def _parsers():
    """(command line, parser) of npu-dsv3, every subcommand and sub-subcommand, pretrain and finetune."""

    def walk(parser, path):
        yield path, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, [*path, name])

    yield from walk(cli_parser(), [])
    for mode in ("pretrain", "finetune"):
        yield [mode], build_parser(mode)


def test_every_flag_of_every_entry_point_has_help(capsys):
    parsers = list(_parsers())
    assert {" ".join(path) for path, _ in parsers} >= {"", "verify", "convert", "convert hf2mcore", "convert reshard",
                                                       "data preprocess", "pretrain", "finetune"}
    missing = [f"{' '.join(path)} {action.option_strings[0]}" for path, parser in parsers
               for action in parser._actions
               if action.option_strings and not (action.help or "").strip()]
    assert missing == []
    for path, parser in parsers:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--help"])
        assert exit_.value.code == 0, path
        assert "--help" in capsys.readouterr().out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return release_like_hf_dir(str(tmp_path_factory.mktemp("hf")), seed=7)


def _one_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"npu-dsv3 {command}: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("key, value", [("hidden_size", "64"), ("hidden_size", 64.0), ("rms_norm_eps", "1e-6"),
                                        ("norm_topk_prob", 1), ("q_lora_rank", 1.5)])
def test_config_json_values_of_the_wrong_type(hf_dir, tmp_path, capsys, key, value):
    with open(os.path.join(hf_dir, "config.json")) as f:
        config = json.load(f)
    config[key] = value
    bad = tmp_path / "hf"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"config.json'?: '{key}' must be"):
        load_hf_config(str(bad))
    assert main(["convert", "hf2mcore", "--load-dir", str(bad), "--save-dir", str(tmp_path / "out")]) == 2
    assert f"'{key}' must be" in _one_line(capsys, "convert")


@pytest.mark.parametrize("argv", [["verify", "--hf-dir", "x", "--batch-size", "0"],
                                  ["verify", "--hf-dir", "x", "--seq-length", "-4"],
                                  ["convert", "hf2mcore", "--load-dir", "a", "--save-dir", "b", "--workers", "0"],
                                  ["convert", "mcore2hf", "--load-dir", "a", "--save-dir", "b",
                                   "--source-tensor-parallel-size", "x"],
                                  ["data", "preprocess", "--input", "a", "--output-prefix", "b", "--workers", "0"],
                                  ["schedule", "--pipeline-model-parallel-size", "0", "--micro-batches", "4"]])
def test_sizes_must_be_positive_in_every_command(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"npu-dsv3 {' '.join(argv[:2 if argv[0] in ('convert', 'data') else 1])}: error: argument")
    assert "must be >= 1, got" in err or "expected a positive integer, got 'x'" in err


def test_one_positive_integer_type_for_every_size():
    """The same validator behind every positive size of every entry point, training's included."""
    sizes = {"--batch-size", "--seq-length", "--workers", "--micro-batch-size", "--tensor-model-parallel-size",
             "--target-tensor-parallel-size", "--source-tensor-parallel-size", "--pipeline-model-parallel-size"}
    # data preprocess's --seq-length has a rule of its own: a sample needs two tokens
    own_rule = (["data", "preprocess"], "--seq-length")
    types = {action.type for path, parser in _parsers() for action in parser._actions
             if sizes & set(action.option_strings) and (path, action.option_strings[0]) != own_rule}
    assert types == {positive_int}
    with pytest.raises(ArgsError, match="argument --micro-batch-size: must be >= 1, got 0"):
        parse_args(["--mock-data", "--micro-batch-size", "0"], world_size=1)


def test_unusable_output_paths_are_found_before_the_input_is_read(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    missing_input = str(tmp_path / "no-such-input")
    for save_dir, problem in ((a_file, f"{a_file} is a file"), (a_file / "sub", f"{a_file} is a file")):
        assert main(["convert", "hf2mcore", "--load-dir", missing_input, "--save-dir", str(save_dir)]) == 2
        err = _one_line(capsys, "convert")
        assert f"output directory {save_dir}: {problem}" in err and "no-such-input" not in err
    assert main(["convert", "fp8-to-bf16", "--input-fp8-hf-path", missing_input,
                 "--output-bf16-hf-path", str(a_file)]) == 2
    assert f"output directory {a_file}: {a_file} is a file" in _one_line(capsys, "convert")


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_a_read_only_parent_is_found_at_start_up(tmp_path, capsys):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        assert main(["convert", "hf2mcore", "--load-dir", str(tmp_path / "none"),
                     "--save-dir", str(parent / "out")]) == 2
        assert f"{parent} is not writable" in _one_line(capsys, "convert")
    finally:
        parent.chmod(0o700)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                   PermissionError(errno.EACCES, os.strerror(errno.EACCES)),
                                   NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))])
def test_os_errors_while_writing_are_one_line_naming_the_path(hf_dir, tmp_path, capsys, monkeypatch, error):
    """A full disk (or a permission / path problem the start-up check could not foresee) shows up when a
    written file is flushed: injected at fsync, where the kernel reports a delayed ENOSPC."""
    def fail(fd):
        raise error

    monkeypatch.setattr(os, "fsync", fail)
    out = str(tmp_path / "out")
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", out, "--no-progress"]) == 2
    err = _one_line(capsys, "convert")
    assert error.strerror in err and out in err


def test_a_missing_tracked_iteration_is_named_as_such(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "latest_checkpointed_iteration.txt").write_text("7")
    for argv in (["convert", "mcore2hf", "--load-dir", str(ckpt), "--save-dir", str(tmp_path / "hf")],
                 ["convert", "reshard", "--load-dir", str(ckpt), "--save-dir", str(tmp_path / "re")]):
        assert main(argv) == 2
        err = _one_line(capsys, "convert")
        assert "latest_checkpointed_iteration.txt names iter_0000007, which is not in" in err
        assert "--source" not in err


def test_a_wrong_size_embedding_is_not_blamed_on_the_mtp_copy(hf_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from support.checkpoint_files import hf_tensors

    bad = tmp_path / "hf"
    bad.mkdir()
    tensors = hf_tensors(hf_dir)
    vocab, hidden = tensors["model.embed_tokens.weight"].shape
    tensors["model.embed_tokens.weight"] = torch.zeros(vocab + 1, hidden, dtype=torch.bfloat16)
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    (bad / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
    assert main(["convert", "hf2mcore", "--load-dir", str(bad), "--save-dir", str(tmp_path / "out")]) == 2
    err = _one_line(capsys, "convert")
    assert "model.embed_tokens.weight" in err and str(vocab + 1) in err and "differs" not in err


def test_a_tokenizer_directory_without_tokenizer_files(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="has none of tokenizer.json, tokenizer.model"):
        load_tokenizer("PretrainedFromHF", str(tmp_path))
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello"}\n')
    assert main(["data", "preprocess", "--input", str(data), "--output-prefix", str(tmp_path / "out"),
                 "--tokenizer-name-or-path", str(tmp_path)]) == 2
    err = _one_line(capsys, "data")
    assert "has none of tokenizer.json" in err and "sentencepiece" not in err.lower()
