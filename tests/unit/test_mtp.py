"""The MTP block against a plain-torch reading of DeepSeek-V3's MTP formula.

For depth 1 and position i:  h'_i = M [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)],
h1 = TRM(h'), logits = OutHead(RMSNorm(h1_i)), predicting t_{i+2}.
The concatenation order (embedding first) is the released checkpoint's, which
the inference engines that serve its MTP layer use. TRM is transformers'
DeepSeek-V3 decoder layer loaded with the MTP layer's weights.
"""

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

from npu_dsv3.model import load_hf
from npu_dsv3.tiny_model import make_hf_model, save_hf


def _rms(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _hf_mtp_layer(hf, tensors):
    cfg = hf.config
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    layer = DeepseekV3DecoderLayer(cfg, layer_idx=cfg.num_hidden_layers).eval()
    state = {}
    for name in layer.state_dict():
        if name == "mlp.experts.gate_up_proj":
            state[name] = torch.stack([
                torch.cat([tensors[f"{prefix}mlp.experts.{e}.gate_proj.weight"],
                           tensors[f"{prefix}mlp.experts.{e}.up_proj.weight"]])
                for e in range(cfg.n_routed_experts)
            ])
        elif name == "mlp.experts.down_proj":
            state[name] = torch.stack(
                [tensors[f"{prefix}mlp.experts.{e}.down_proj.weight"] for e in range(cfg.n_routed_experts)]
            )
        else:
            state[name] = tensors[prefix + name]
    layer.load_state_dict(state)
    return layer


def reference_mtp_logits(hf, tensors, ids):
    cfg = hf.config
    eps = cfg.rms_norm_eps
    p = f"model.layers.{cfg.num_hidden_layers}."
    batch, seq = ids.shape
    h = hf.model(ids).last_hidden_state  # main model output, after its final RMSNorm
    next_ids = torch.roll(ids, -1, dims=1)
    emb = F.embedding(next_ids, tensors[p + "embed_tokens.weight"])
    x = torch.cat([_rms(emb, tensors[p + "enorm.weight"], eps), _rms(h, tensors[p + "hnorm.weight"], eps)], -1)
    x = x @ tensors[p + "eh_proj.weight"].t()
    positions = torch.arange(seq).unsqueeze(0).expand(batch, seq)
    cos_sin = hf.model.rotary_emb(x, positions)
    causal = torch.full((seq, seq), float("-inf")).triu(1)[None, None].expand(batch, 1, seq, seq)
    layer = _hf_mtp_layer(hf, tensors)
    layer.self_attn.config._attn_implementation = "eager"
    h1 = layer(x, attention_mask=causal, position_embeddings=cos_sin, position_ids=positions)
    h1 = h1[0] if isinstance(h1, tuple) else h1
    return _rms(h1, tensors[p + "shared_head.norm.weight"], eps) @ tensors[p + "shared_head.head.weight"].t()


def test_mtp_logits_match_formula(tmp_path):
    hf = make_hf_model(seed=11)
    path = save_hf(hf, str(tmp_path), with_mtp=True)
    tensors = load_file(f"{path}/model.safetensors")
    model = load_hf(path)
    assert model.mtp_process and model.config.mtp_num_layers == 1

    ids = torch.randint(0, hf.config.vocab_size, (2, 29), generator=torch.Generator().manual_seed(5))
    labels = torch.roll(ids, -1, dims=1)
    outputs = []
    # Clone: megatron's cross entropy works on the logits in place.
    hook = model.output_layer.register_forward_hook(lambda mod, inp, out: outputs.append(out[0].clone()))
    with torch.no_grad():
        position_ids = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
        model(ids, position_ids, None, labels=labels)
        reference = reference_mtp_logits(hf, tensors, ids)
    hook.remove()
    # megatron calls the output layer for the MTP depth first, then the main head.
    ours = outputs[0].transpose(0, 1)[..., : hf.config.vocab_size]
    # The last position sees a rolled-in token on both sides; compare the rest.
    diff = (ours[:, :-1] - reference[:, :-1]).abs().max()
    assert diff <= 1e-4 * reference.abs().max(), diff
    # Sanity: the MTP head is not the main head.
    main = outputs[1].transpose(0, 1)[..., : hf.config.vocab_size]
    assert (main - ours).abs().max() > 1e-2
