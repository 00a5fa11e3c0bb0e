"""Output directories and worker processes of the converters (npu_dsv3.checkpoint.io)."""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from npu_dsv3.checkpoint.io import MANIFEST_FILE, TEMP_SUFFIX, Manifest, prepare_output_dir
from npu_dsv3.cli import main

from support.checkpoint_files import release_like_hf_dir

JOB = {"command": "hf2mcore", "load_dir": "/a"}
OTHER_JOB = {"command": "hf2mcore", "load_dir": "/b"}

# Runs `npu-dsv3 convert hf2mcore --workers 2` (two rank files), with an audit hook that makes a
# worker (a process other than this one) stall when it opens anything under the output directory,
# as on a hung file system: the workers then exist until something kills them.
_STALLED_CONVERSION = """
import os, sys, time
hf, save = sys.argv[1:]
parent = os.getpid()

def stall_workers(event, args):
    if event == "open" and os.getpid() != parent and str(args[0]).startswith(save):
        time.sleep(600)

sys.addaudithook(stall_workers)
from npu_dsv3.cli import main
sys.exit(main(["convert", "hf2mcore", "--load-dir", hf, "--save-dir", save, "--workers", "2",
               "--target-tensor-parallel-size", "2", "--no-progress"]))
"""


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return release_like_hf_dir(str(tmp_path_factory.mktemp("hf")), seed=5)


class _Proc(psutil.Process):
    """psutil's view of a subprocess.Popen, with its poll() and communicate() for the error message."""

    def __init__(self, popen):
        super().__init__(popen.pid)
        self.poll, self.communicate = popen.poll, popen.communicate


def _alive(procs):
    alive = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def _children_of(proc, count, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = proc.children()
        if len(children) >= count:
            return children
        assert proc.poll() is None, proc.communicate()[1].decode()
        time.sleep(0.05)
    raise AssertionError(f"no {count} worker processes after {timeout} s")


def test_workers_die_with_a_killed_conversion_and_its_directory_is_reusable(hf_dir, tmp_path):
    save = str(tmp_path / "mcore")
    conversion = subprocess.Popen([sys.executable, "-c", _STALLED_CONVERSION, hf_dir, save],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        workers = _children_of(_Proc(conversion), 2)
    finally:
        conversion.kill()
        conversion.wait()
    deadline = time.monotonic() + 5
    while _alive(workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = _alive(workers)
    for proc in left:  # do not leave them behind if the test fails
        proc.kill()
    assert not left, f"workers {[p.pid for p in left]} outlived their killed parent"

    # The killed job finished no file: a rerun (another layout, no --resume) may use the directory.
    assert not Manifest(save).files
    assert main(["convert", "hf2mcore", "--load-dir", hf_dir, "--save-dir", save, "--no-progress"]) == 0
    assert os.path.isfile(os.path.join(save, "latest_checkpointed_iteration.txt"))


def _write(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_a_directory_left_by_a_job_that_finished_no_file_counts_as_empty(tmp_path):
    out = str(tmp_path / "out")
    prepare_output_dir(out, resume=False, job=JOB)  # the job then fails before finishing a file
    _write(os.path.join(out, "iter_0000001", "mp_rank_00", ".model_optim_rng.pt.1234abcd" + TEMP_SUFFIX))
    manifest = prepare_output_dir(out, resume=False, job=OTHER_JOB)
    assert manifest.job == OTHER_JOB and not manifest.files
    assert os.listdir(out) == [MANIFEST_FILE]  # the temp file and its folders are gone

    os.remove(os.path.join(out, MANIFEST_FILE))
    _write(os.path.join(out, "a" + TEMP_SUFFIX))  # temp files only
    assert prepare_output_dir(out, resume=True, job=JOB).job == JOB


@pytest.mark.parametrize("leftover", ["recorded", "foreign-file", "unreadable-manifest", "empty-folder"])
def test_a_directory_with_output_or_foreign_content_is_still_refused(tmp_path, leftover):
    out = str(tmp_path / "out")
    manifest = prepare_output_dir(out, resume=False, job=JOB)
    if leftover == "recorded":
        _write(os.path.join(out, "done.bin"))
        manifest.record("done.bin")
    elif leftover == "foreign-file":
        _write(os.path.join(out, "sub", "notes.txt"))
    elif leftover == "unreadable-manifest":
        _write(os.path.join(out, MANIFEST_FILE), "{")
    else:
        os.remove(os.path.join(out, MANIFEST_FILE))
        os.makedirs(os.path.join(out, "folder"))
    with pytest.raises(ValueError, match="not empty"):
        prepare_output_dir(out, resume=False, job=OTHER_JOB)
    if leftover == "recorded":
        with pytest.raises(ValueError, match="another job"):
            prepare_output_dir(out, resume=True, job=OTHER_JOB)
        assert json.load(open(os.path.join(out, MANIFEST_FILE)))["files"]
