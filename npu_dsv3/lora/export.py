"""LoRA adapters on the HF side: PEFT adapter directories and merged weights.

``peft_tensors`` turns the adapters of a whole model (every tensor unsplit, megatron names keyed by HF
layer) into PEFT's ``adapter_model.safetensors`` entries for transformers 5's ``DeepseekV3ForCausalLM``:
attention projections and ``lm_head`` as ``target_modules``; every MLP weight -- dense, shared experts, and
the fused routed experts ``mlp.experts.gate_up_proj`` / ``down_proj`` -- as ``target_parameters`` (PEFT
rewrites a ``gate_proj``/``up_proj``/``down_proj`` module target into a routed-expert one and drops the
dense and shared MLPs' adapters; as parameters all of them load). PEFT stacks one wrapper per targeted
parameter of a module, the last listed outermost, so the routed experts' fc1 adapter sits under
``mlp.experts.base_layer`` when fc2 is adapted too. The fc1 adapter (gate and up share A) becomes one
adapter per HF projection with A repeated. MTP's adapters have no transformers module: they are left
out of the adapter (``merged_deltas`` has them) and the config says so.

``merged_deltas`` gives (alpha / r) B A per adapted HF tensor, in fp32, for merging into full weights.
"""

import functools
import os
from typing import Callable, Dict, Iterator, List, Tuple

import torch

from npu_dsv3.lora.targets import HF_MODULES, OUTPUT_LAYER

PEFT_PREFIX = "base_model.model."
OUTPUT_LAYER_HF = "lm_head"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"

# Adapter = (canonical target, HF layer or None for the output layer) -> its unsplit tensors:
#   linears: {"A": [r, in], "B": [out, r]} (fc1's B rows [gate; up]);
#   routed experts: {"A": [E, r, in], "B": [E, out, r]} (fc1's out rows [gate; up]).
Adapters = Dict[Tuple[str, int], Dict[str, torch.Tensor]]


def _hf_linears(target: str, layer, tensors: Dict[str, torch.Tensor]) -> Iterator[Tuple[str, torch.Tensor, torch.Tensor]]:
    """(HF module or parameter name, A, B) of one adapter; fc1 gives gate and up, A shared."""
    a, b = tensors["A"], tensors["B"]
    names = [OUTPUT_LAYER_HF if target == OUTPUT_LAYER else f"model.layers.{layer}.{m}" for m in HF_MODULES[target]]
    if target.endswith("linear_fc1") and not target.startswith("experts"):
        gate, up = b.chunk(2, dim=0)
        yield names[0], a, gate
        yield names[1], a, up
        return
    yield names[0], a, b



def delta_builders(adapters: Adapters, alpha: float, r: int) -> Dict[str, Callable[[], torch.Tensor]]:
    """HF weight name (the release's names, routed experts per expert) -> a function giving (alpha / r) B A
    in fp32, the update a merge adds; built one tensor at a time."""
    scale, out = alpha / r, {}
    for (target, layer), tensors in adapters.items():
        if target.startswith("experts"):
            for e in range(tensors["A"].shape[0]):
                prefix = f"model.layers.{layer}.mlp.experts.{e}"
                if target.endswith("linear_fc1"):
                    for half, proj in enumerate(("gate_proj", "up_proj")):
                        out[f"{prefix}.{proj}.weight"] = functools.partial(_expert_delta, tensors, e, scale, half)
                else:
                    out[f"{prefix}.down_proj.weight"] = functools.partial(_expert_delta, tensors, e, scale, None)
            continue
        for name, a, b in _hf_linears(target, layer, tensors):
            weight = name if name.endswith(".weight") else f"{name}.weight"
            out[weight] = functools.partial(_delta, a, b, scale)
    return out


def _delta(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    return (b.float() @ a.float()) * scale


def _expert_delta(tensors, e: int, scale: float, half) -> torch.Tensor:
    b = tensors["B"][e]
    if half is not None:
        b = b.chunk(2, dim=0)[half]
    return _delta(tensors["A"][e], b, scale)


def merged_deltas(adapters: Adapters, alpha: float, r: int) -> Dict[str, torch.Tensor]:
    """Every update of ``delta_builders`` at once (small models and tests)."""
    return {name: build() for name, build in delta_builders(adapters, alpha, r).items()}


class MergedSource:
    """A ``names()`` / ``get(name)`` source of HF tensors (the converters') with the adapters' updates added:
    W + (alpha / r) B A in fp32, then W's dtype."""

    def __init__(self, source, adapters: Adapters, alpha: float, r: int):
        self.source, self.builders = source, delta_builders(adapters, alpha, r)
        missing = sorted(set(self.builders) - set(source.names()))
        if missing:
            raise ValueError(f"the adapters update {missing[0]} (and {len(missing) - 1} more), which the base "
                             "checkpoint does not hold: they were trained on another model")

    def names(self) -> List[str]:
        return self.source.names()

    def get(self, name: str) -> torch.Tensor:
        tensor = self.source.get(name)
        build = self.builders.get(name)
        return tensor if build is None else (tensor.float() + build()).to(tensor.dtype)


def peft_tensors(adapters: Adapters, num_hidden_layers: int) -> Dict[str, torch.Tensor]:
    """PEFT's adapter_model.safetensors entries (MTP's adapters, layer ``num_hidden_layers``, left out)."""
    out = {}
    experts = {(layer, t) for t, layer in adapters if t.startswith("experts")}
    for (target, layer), tensors in sorted(adapters.items(), key=lambda kv: (kv[0][1] is None, kv[0][1] or 0, kv[0][0])):
        if layer is not None and layer >= num_hidden_layers:
            continue
        if target.startswith("experts"):
            nested = target == "experts.linear_fc1" and (layer, "experts.linear_fc2") in experts
            name = f"model.layers.{layer}.mlp.experts" + (".base_layer" if nested else "")
            a, b = tensors["A"], tensors["B"]  # [E, r, in], [E, out, r]
            experts_n, r = a.shape[0], a.shape[1]
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a.reshape(experts_n * r, a.shape[2]).contiguous()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], r * experts_n).contiguous()
            continue
        for hf_name, a, b in _hf_linears(target, layer, tensors):
            module = hf_name[: -len(".weight")] if hf_name.endswith(".weight") else hf_name
            out[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.clone()  # fc1's A serves gate and up
            out[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
    return out


def peft_config(targets: List[str], r: int, alpha: float, dropout: float, base_model: str,
                left_out_mtp: bool) -> dict:
    """adapter_config.json for ``targets`` (canonical names)."""
    modules, parameters = [], []
    for target in targets:
        for hf in HF_MODULES[target]:
            if hf.endswith(".weight") or target.startswith("experts"):
                parameters.append(hf)  # matched as a suffix of the parameter's name
            else:
                modules.append(hf.rsplit(".", 1)[-1])  # matched as the module's last name
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha,
        # PEFT's wrapper of target_parameters refuses dropout; dropout only acts in training.
        "lora_dropout": 0.0 if parameters else dropout,
        "target_modules": modules or None, "target_parameters": parameters or None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }
    if left_out_mtp:
        config["npu_dsv3_note"] = ("the MTP layer's adapters are left out: transformers has no MTP module; "
                                   "`npu-dsv3 convert mcore2hf --lora-load` merges them")
    return config


def write_peft_adapter(directory: str, tensors: Dict[str, torch.Tensor], config: dict) -> None:
    """adapter_model.safetensors and adapter_config.json, each written atomically."""
    from safetensors.torch import save_file

    from npu_dsv3.checkpoint.io import atomic_write, atomic_write_json

    os.makedirs(directory, exist_ok=True)
    with atomic_write(os.path.join(directory, ADAPTER_WEIGHTS)) as path:
        save_file(tensors, path, metadata={"format": "pt"})
    atomic_write_json(config, os.path.join(directory, ADAPTER_CONFIG), sort_keys=True)


def read_peft_adapter(directory: str, num_layers: int) -> Tuple[Adapters, dict]:
    """A PEFT adapter directory for DeepseekV3ForCausalLM (this package's or another tool's) as whole adapters
    by (canonical target, HF layer), and its adapter_config.json. Gate and up projections must share A (this
    package's fc1 adapter is one A for both)."""
    import json

    from safetensors.torch import load_file

    with open(os.path.join(directory, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
        raise ValueError(f"{directory}: a plain LoRA adapter is needed (peft_type LORA, no DoRA / rsLoRA)")
    tensors = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v
               for k, v in load_file(os.path.join(directory, ADAPTER_WEIGHTS)).items()}
    by_module: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, ab = key.rsplit(".lora_", 1)
        by_module.setdefault(module, {})[ab.split(".")[0]] = value
    out: Adapters = {}
    hf_to_target = {}
    for target, modules in HF_MODULES.items():
        for index, hf in enumerate(modules):
            hf_to_target[hf[: -len(".weight")] if hf.endswith(".weight") else hf] = (target, index)
    fc1_parts: Dict[Tuple[str, int], Dict[int, Tuple[torch.Tensor, torch.Tensor]]] = {}
    for module, ab in by_module.items():
        nested = module.endswith("mlp.experts.base_layer")
        if module == OUTPUT_LAYER_HF:
            out[(OUTPUT_LAYER, None)] = {"A": ab["A"], "B": ab["B"]}
            continue
        parts = module.split(".")
        layer, rest = int(parts[2]), ".".join(parts[3:])
        if rest.startswith("mlp.experts"):
            # PEFT nests one wrapper per targeted parameter in the order listed, the last outermost
            listed = [p for p in config.get("target_parameters") or () if p.rsplit(".", 1)[-1] in _EXPERT_PARAMS]
            if not listed:
                raise ValueError(f"{directory}: adapters on {module} but no routed-expert target_parameters")
            param = listed[0] if nested else listed[-1]
            target = _EXPERT_PARAMS[param.rsplit(".", 1)[-1]]
            r = config["r"]
            experts = ab["A"].shape[0] // r
            a = ab["A"].reshape(experts, r, -1)
            b = ab["B"].reshape(ab["B"].shape[0], r, experts).permute(2, 0, 1)
            out[(target, layer)] = {"A": a, "B": b}
            continue
        if rest not in hf_to_target:
            raise ValueError(f"{directory}: an adapter on {module}, which this package cannot adapt")
        target, index = hf_to_target[rest]
        if target.endswith("linear_fc1"):
            fc1_parts.setdefault((target, layer), {})[index] = (ab["A"], ab["B"])
        else:
            out[(target, layer)] = {"A": ab["A"], "B": ab["B"]}
    for (target, layer), halves in fc1_parts.items():
        if set(halves) != {0, 1} or not torch.equal(halves[0][0], halves[1][0]):
            raise ValueError(f"{directory}: model.layers.{layer} adapts gate_proj and up_proj with different A (or "
                             "only one of them); this package's fc1 adapter shares one A between them")
        out[(target, layer)] = {"A": halves[0][0], "B": torch.cat([halves[0][1], halves[1][1]])}
    return {k: v for k, v in out.items() if k[1] is None or k[1] < num_layers}, config


_EXPERT_PARAMS = {"gate_up_proj": "experts.linear_fc1", "down_proj": "experts.linear_fc2"}
