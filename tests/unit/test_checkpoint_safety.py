"""A checkpoint never runs code: every pickled file of every format goes through one allow-list, and a
crafted or truncated file is refused in one line naming the file (and, when crafted, the type)."""

import argparse
import io
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.enums import ModelType
from megatron.core.transformer.enums import AttnBackend

import npu_dsv3
from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.checkpoint.safe_load import UnsafeCheckpointError, load_pickle, load_torch
from npu_dsv3.cli import main
from npu_dsv3.distributed import ensure_single_process_group
from npu_dsv3.model import load_mcore
from npu_dsv3.training.checkpointing import load_checkpoint

from support.checkpoint_files import hf_tensors, release_like_hf_dir

MANIFEST = ".npu_dsv3_manifest.json"


class _RunsCode:
    """Unpickled freely, it creates the file ``marker``: what a crafted checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _crafted_torch_file(marker) -> bytes:
    buffer = io.BytesIO()
    torch.save({"model": _RunsCode(marker), "iteration": 1}, buffer)
    return buffer.getvalue()


def _crafted_pickle(marker) -> bytes:
    return pickle.dumps(_RunsCode(marker))  # the protocol DCP writes .metadata with


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return release_like_hf_dir(str(tmp_path_factory.mktemp("hf")), seed=5)


def _converted(hf_dir, out, *flags):
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", out, "--no-progress", *flags]) == 0
    # Megatron-LM and MindSpeed-LLM write no manifest: the reader, not a checksum, must stop a crafted file.
    os.remove(os.path.join(out, MANIFEST))
    return out


@pytest.fixture(scope="module")
def dist_dir(hf_dir, tmp_path_factory):
    return _converted(hf_dir, str(tmp_path_factory.mktemp("dist") / "ckpt"), "--save-format", "torch_dist")


@pytest.fixture(scope="module")
def legacy_dir(hf_dir, tmp_path_factory):
    return _converted(hf_dir, str(tmp_path_factory.mktemp("legacy") / "ckpt"))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "code_ran"
    yield path
    assert not path.exists(), "a checkpoint file ran code"


def _copy(src, tmp_path):
    return shutil.copytree(src, tmp_path / "ckpt")


def _cli_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1, lines
    return lines[0]


def _one_line(excinfo) -> str:
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_the_crafted_files_run_code_when_unpickled_freely(tmp_path):
    pickle.loads(_crafted_pickle(tmp_path / "a"))
    torch.load(io.BytesIO(_crafted_torch_file(tmp_path / "b")), weights_only=False)
    assert (tmp_path / "a").exists() and (tmp_path / "b").exists()


def test_a_crafted_metadata_is_refused_by_every_reader(hf_dir, dist_dir, tmp_path, marker, capsys):
    ckpt = _copy(dist_dir, tmp_path)
    metadata = ckpt / "release" / ".metadata"
    metadata.write_bytes(_crafted_pickle(marker))
    assert main(["convert", "mcore2hf", "--load-dir", str(ckpt), "--save-dir", str(tmp_path / "hf")]) == 2
    error = _cli_error(capsys)
    assert str(metadata) in error and "builtins.exec" in error
    assert main(["convert", "reshard", "--load-dir", str(ckpt), "--save-dir", str(tmp_path / "r")]) == 2
    assert "builtins.exec" in _cli_error(capsys)
    assert main(["verify", "--hf-dir", hf_dir, "--mcore-dir", str(ckpt)]) == 2
    assert "builtins.exec" in _cli_error(capsys)
    with pytest.raises(UnsafeCheckpointError) as e:  # megatron's own loader
        load_mcore(str(ckpt))
    assert str(metadata) in _one_line(e) and "builtins.exec" in str(e.value)


def test_a_crafted_byte_record_in_a_distcp_file_is_refused(dist_dir, tmp_path, marker):
    ckpt = _copy(dist_dir, tmp_path)
    path = ckpt / "release" / ".metadata"
    metadata = pickle.loads(path.read_bytes())  # our own file: plain pickle is fine here
    index = next(i for i in metadata.storage_data
                 if type(metadata.state_dict_metadata[i.fqn]).__name__ == "BytesStorageMetadata")
    payload = _crafted_torch_file(marker)
    (ckpt / "release" / "crafted.distcp").write_bytes(payload)
    info = metadata.storage_data[index]
    info.relative_path, info.offset, info.length = "crafted.distcp", 0, len(payload)
    path.write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError) as e:
        load_mcore(str(ckpt))
    message = _one_line(e)
    assert str(ckpt / "release" / "crafted.distcp") in message and index.fqn in message
    assert "builtins.exec" in message


def test_a_crafted_common_pt_is_refused(dist_dir, tmp_path, marker):
    ckpt = _copy(dist_dir, tmp_path)
    common = ckpt / "release" / "common.pt"
    common.write_bytes(_crafted_torch_file(marker))
    with pytest.raises(UnsafeCheckpointError) as e:
        load_mcore(str(ckpt))
    assert str(common) in _one_line(e) and "builtins.exec" in str(e.value)
    ensure_single_process_group()
    with pytest.raises(UnsafeCheckpointError) as e:  # training's --load reads it before building anything
        load_checkpoint(str(ckpt), [])
    assert str(common) in _one_line(e) and "builtins.exec" in str(e.value)


def test_a_crafted_legacy_rank_file_is_refused(legacy_dir, tmp_path, marker, capsys):
    ckpt = _copy(legacy_dir, tmp_path)
    rank_file = ckpt / "release" / "mp_rank_00" / "model_optim_rng.pt"
    rank_file.write_bytes(_crafted_torch_file(marker))
    assert main(["convert", "mcore2hf", "--load-dir", str(ckpt), "--save-dir", str(tmp_path / "hf")]) == 2
    error = _cli_error(capsys)
    assert str(rank_file) in error and "builtins.exec" in error
    ensure_single_process_group()
    with pytest.raises(UnsafeCheckpointError) as e:
        load_checkpoint(str(ckpt), [])
    assert str(rank_file) in _one_line(e) and "builtins.exec" in str(e.value)


def test_megatron_lm_args_and_numpy_rng_state_load(hf_dir, legacy_dir, tmp_path):
    """What Megatron-LM / MindSpeed-LLM keep beside the weights: args as a Namespace holding torch dtypes
    and megatron enums, and the Python, numpy and torch RNG states."""
    ckpt = _copy(legacy_dir, tmp_path)
    rank_file = ckpt / "release" / "mp_rank_00" / "model_optim_rng.pt"
    payload = load_torch(str(rank_file), map_location="cpu")
    args = argparse.Namespace(params_dtype=torch.bfloat16, attention_backend=AttnBackend.flash,
                              model_type=ModelType.encoder_or_decoder, seq_length=4096, data_path=["a", "b"])
    rng = {"random_rng_state": random.getstate(), "np_rng_state": np.random.get_state(),
           "torch_rng_state": torch.get_rng_state(), "rng_tracker_states": {}}
    payload.update(args=args, rng_state=[rng], checkpoint_version=3.0)
    torch.save(payload, rank_file)

    loaded = load_torch(str(rank_file), map_location="cpu")
    assert loaded["args"] == args
    state = loaded["rng_state"][0]
    assert state["random_rng_state"] == rng["random_rng_state"]
    assert state["np_rng_state"][0] == "MT19937" and np.array_equal(state["np_rng_state"][1], rng["np_rng_state"][1])
    assert torch.equal(state["torch_rng_state"], rng["torch_rng_state"])
    # the converter reads the same file through the same reader and exports the weights unchanged
    assert main(["convert", "mcore2hf", "--load-dir", str(ckpt), "--save-dir", str(tmp_path / "hf"),
                 "--no-progress"]) == 0
    exported, original = hf_tensors(tmp_path / "hf"), hf_tensors(hf_dir)
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)


def test_a_pickle_may_not_rewire_an_allowed_class_or_build_object_arrays(tmp_path):
    # BUILD with slot state on the class itself would set argparse.Namespace.__eq__ process-wide
    rewire = (b"\x80\x02cargparse\nNamespace\nq\x00N}q\x01X\x06\x00\x00\x00__eq__q\x02cbuiltins\nset\nq\x03s"
              b"\x86q\x04b.")
    with pytest.raises(UnsafeCheckpointError, match="attributes set on the class argparse.Namespace"):
        load_pickle(io.BytesIO(rewire), "rewire.pkl")
    assert argparse.Namespace.__eq__ is not set
    buffer = io.BytesIO()
    torch.save({"objects": np.array([print], dtype=object)}, buffer)
    buffer.seek(0)
    with pytest.raises(UnsafeCheckpointError, match="objects.pt holds a numpy array of Python objects"):
        load_torch(buffer, "objects.pt")


def test_a_torchscript_archive_is_refused(tmp_path):
    path = tmp_path / "model_optim_rng.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(path))
    with pytest.raises(UnsafeCheckpointError, match="TorchScript"):
        load_torch(str(path))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_distcp_file_names_the_file(dist_dir, tmp_path, capsys):
    ckpt = _copy(dist_dir, tmp_path)
    distcp = ckpt / "release" / "__0_0.distcp"
    _truncate(distcp)
    with pytest.raises(CheckpointError) as e:
        load_mcore(str(ckpt))
    assert f"{distcp} is truncated" in _one_line(e)
    assert main(["convert", "mcore2hf", "--load-dir", str(ckpt), "--save-dir", str(tmp_path / "hf")]) == 2
    assert f"{distcp} is truncated" in _cli_error(capsys)


@pytest.mark.parametrize("name", [".metadata", "common.pt"])
def test_a_truncated_metadata_or_common_pt_names_the_file(dist_dir, tmp_path, name):
    ckpt = _copy(dist_dir, tmp_path)
    _truncate(ckpt / "release" / name)
    with pytest.raises(CheckpointError) as e:
        load_mcore(str(ckpt))
    assert f"cannot read {ckpt / 'release' / name}: it is truncated or damaged" in _one_line(e)


def test_no_module_but_the_reader_unpickles():
    """Whatever reads checkpoint files later goes through safe_load too: no other unpickling call."""
    package = Path(npu_dsv3.__file__).parent
    sources = [*package.rglob("*.py"), *(package.parent / "ops").rglob("*.py")]
    call = re.compile(r"\b(torch\.load|torch\.jit\.load|pickle\.loads?|np\.load|numpy\.load|Unpickler)\(")
    found = [f"{path}:{n}" for path in sources if path.name != "safe_load.py"
             for n, line in enumerate(path.read_text().splitlines(), 1) if call.search(line)]
    assert len(sources) > 50 and found == []
