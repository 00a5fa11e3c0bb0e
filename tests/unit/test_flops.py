"""The model-FLOP count against torch's FLOP counter on the model's real forward."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from npu_dsv3.config import hf_to_mcore_config_dpskv3
from npu_dsv3.model import forward_logits, load_hf
from npu_dsv3.config import padded_vocab_size
from npu_dsv3.tiny_model import make_hf_model, save_hf
from npu_dsv3.training.flops import forward_flops_per_token, train_flops

from support import RELEASED_CONFIG

FIXTURE = RELEASED_CONFIG


@pytest.mark.parametrize("q_lora_rank", [None, 40], ids=["no-q-lora", "q-lora"])
def test_forward_count_equals_the_matmuls_the_model_runs(tmp_path, q_lora_rank):
    # Per-expert MLPs and the materialised-scores attention run plain matmuls torch can count;
    # the reference attention computes every score, i.e. the count without the causal half.
    hf = make_hf_model(seed=1, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=q_lora_rank)
    model = load_hf(save_hf(hf, str(tmp_path)), moe_grouped_gemm=False, use_flash_attn=False)
    batch, seq = 2, 24
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward_logits(model, ids)
    expected = forward_flops_per_token(model.config, seq, causal=False, mtp=False,
                                       vocab_size=padded_vocab_size(model.config.vocab_size)) * batch * seq
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-9)


def test_deepseek_v3_671b_step():
    # The released config: the report's 37B activated parameters (the embedding lookup aside,
    # which runs no matmul) give about 6 * 37e9 FLOPs per token for a training step, plus
    # attention over 4K tokens and the MTP depth.
    released = json.loads(FIXTURE.read_text())
    config = hf_to_mcore_config_dpskv3({k: v for k, v in released.items() if k != "quantization_config"})
    per_token = train_flops(config, 4096, 1)
    activated_params = forward_flops_per_token(config, 1, causal=False, mtp=False) / 2
    assert 36e9 < activated_params < 39e9
    assert 1.0 < per_token / (6 * activated_params) < 1.2
