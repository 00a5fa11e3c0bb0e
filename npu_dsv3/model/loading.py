"""Build the model from an HF DeepSeek-V3 directory (one process, TP=PP=EP=1)."""

import warnings

import torch

from npu_dsv3.checkpoint.hf_reader import CheckpointError, HFCheckpointReader
from npu_dsv3.config import hf_to_mcore_config_dpskv3, load_hf_config
from npu_dsv3.distributed import ensure_single_process_group
from npu_dsv3.model.builder import build_model
from npu_dsv3.model.hf_weights import hf_to_mcore_rules


def _mtp_present(reader: HFCheckpointReader, hf_config: dict) -> bool:
    return f"model.layers.{hf_config['num_hidden_layers']}.eh_proj.weight" in reader


def load_hf(path: str, dtype: torch.dtype = torch.float32, **overrides):
    """The DeepSeek-V3 model with the HF checkpoint in ``path`` loaded, in eval mode.

    A checkpoint without MTP tensors (transformers does not save them) gives a
    model without the MTP block, with a warning. ``overrides`` are config fields.
    """
    ensure_single_process_group()
    hf_config = load_hf_config(path)
    reader = HFCheckpointReader(path)
    if hf_config.get("num_nextn_predict_layers") and not _mtp_present(reader, hf_config):
        warnings.warn(
            f"{path} declares {hf_config['num_nextn_predict_layers']} MTP layer(s) but holds no "
            f"model.layers.{hf_config['num_hidden_layers']}.* tensors; building the model without MTP"
        )
        overrides.setdefault("mtp_num_layers", None)
    config = hf_to_mcore_config_dpskv3(
        hf_config,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=False,
        **overrides,
    )
    model = build_model(config)
    load_hf_weights(model, reader)
    return model.eval()


def load_hf_weights(model, reader: HFCheckpointReader) -> None:
    """Copy every tensor the model owns from the HF checkpoint; any mismatch is an error."""
    config = model.config
    params = model.state_dict(keep_vars=True)
    expected = {k for k in params if not k.endswith("_extra_state")}
    seen = set()
    for name, sources, combine in hf_to_mcore_rules(config):
        if name not in params:
            continue  # e.g. an MTP layer this model was built without
        value = combine([reader.get(s) for s in sources])
        target = params[name]
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            value = _pad_vocab(value, target.shape[0], name, reader.path)
        if value.shape != target.shape:
            raise CheckpointError(
                f"{name} built from {sources[0]}{' ...' if len(sources) > 1 else ''} has shape "
                f"{tuple(value.shape)}, the model expects {tuple(target.shape)}: config.json and weights disagree"
            )
        with torch.no_grad():
            target.copy_(value)
        seen.add(name)
    missing = sorted(expected - seen)
    if missing:
        raise CheckpointError(f"no HF source for model tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")


def _pad_vocab(value: torch.Tensor, rows: int, name: str, path: str) -> torch.Tensor:
    if value.shape[0] > rows:
        raise CheckpointError(f"{name} has {value.shape[0]} vocab rows in {path}, more than the model's {rows}")
    return torch.cat([value, value.new_zeros(rows - value.shape[0], *value.shape[1:])])
