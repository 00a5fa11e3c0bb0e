"""The layout a megatron checkpoint was written in, as the checkpoint records it.

A legacy (per-rank) checkpoint reads back only in the layout that wrote it, so
training (``--load``), ``npu-dsv3 verify --mcore-dir`` and the converters that
read one take every layout flag the user did not give from the checkpoint
(``npu_dsv3.layout.resolve_layout``). Where it is recorded:

- a converter's output: its manifest's job (``layout``: the flags, by dest);
- a training save (``--ckpt-format torch``): the flags in every rank file (``args``).

A torch_dist checkpoint is read by any layout: it needs no layout flags.
"""

import json
import os
from typing import Dict, Optional

from npu_dsv3.checkpoint.hf_reader import CheckpointError
from npu_dsv3.layout import LAYOUT_DEFAULTS


def checkpoint_dir(load_dir: str) -> str:
    """The directory ``load_dir``'s tracker names; one line when there is none or it is missing."""
    from npu_dsv3.checkpoint.sources import TRACKER_FILE, tracked_dir

    if not os.path.isdir(load_dir):
        raise FileNotFoundError(f"checkpoint directory {load_dir} does not exist")
    tracker = os.path.join(load_dir, TRACKER_FILE)
    try:
        directory = tracked_dir(load_dir)
    except ValueError:
        raise CheckpointError(f"{tracker} does not name an iteration (an integer or 'release')") from None
    if directory is None:
        raise CheckpointError(f"{load_dir} has no {TRACKER_FILE}: it is not a megatron checkpoint, or the job that "
                              "writes it has not finished")
    if not os.path.isdir(directory):
        raise CheckpointError(f"{tracker} names {os.path.basename(directory)}, which is not in {load_dir} "
                              "(deleted or not copied?)")
    return directory


def recorded_layout(load_dir: str) -> Optional[Dict[str, object]]:
    """The layout flags (``LAYOUT_DEFAULTS``' keys) the legacy checkpoint in ``load_dir`` records; None for a
    torch_dist checkpoint, one that records none (written by another tool) or no checkpoint at all (the
    reader that follows says what is missing, see ``checkpoint_dir``)."""
    from npu_dsv3.checkpoint.mcore_dist import release_dir
    from npu_dsv3.checkpoint.sources import RELEASE, tracked_dir

    try:
        directory = tracked_dir(load_dir)
    except ValueError:  # a tracker that names no iteration
        return None
    if directory is None or not os.path.isdir(directory) or release_dir(load_dir) is not None:
        return None
    if os.path.basename(directory) == RELEASE:
        flags = _converter_job(load_dir).get("layout")
    else:
        flags = _training_args(directory)
    if not isinstance(flags, dict):
        return None
    return {name: flags[name] for name in LAYOUT_DEFAULTS if name in flags}


def _converter_job(load_dir: str) -> dict:
    from npu_dsv3.checkpoint.io import MANIFEST_FILE

    try:
        with open(os.path.join(load_dir, MANIFEST_FILE)) as f:
            job = json.load(f).get("job")
    except (OSError, ValueError, AttributeError):
        return {}
    return job if isinstance(job, dict) else {}


def _training_args(directory: str) -> Optional[dict]:
    """The flags a training save stored in its rank files (all hold the same; the first is read)."""
    from npu_dsv3.checkpoint.mcore_legacy import MODEL_FILE
    from npu_dsv3.checkpoint.safe_load import load_torch

    ranks = sorted(name for name in os.listdir(directory) if name.startswith("mp_rank_"))
    for name in ranks:
        path = os.path.join(directory, name, MODEL_FILE)
        if os.path.isfile(path):
            try:
                return load_torch(path, map_location="meta").get("args")
            except CheckpointError:  # unreadable or refused: the load that follows names the file and why
                return None
    return None
