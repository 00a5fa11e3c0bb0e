"""The zero-bubble W split on the DeepSeek-V3 model: a backward inside ``weight_grad.deferring()``
leaves the linears' and grouped experts' weight gradients to the W step, and running the W step
gives every parameter exactly the gradient of a plain backward."""

import pytest
import torch

from npu_dsv3.config import hf_to_mcore_config_dpskv3, load_hf_config
from npu_dsv3.model.builder import build_model, forward_logits
from npu_dsv3.ops import weight_grad
from npu_dsv3.tiny_model import make_hf_model, save_hf


@pytest.fixture(scope="module")
def model(tmp_path_factory, world1):
    hf_dir = save_hf(make_hf_model(seed=3), str(tmp_path_factory.mktemp("hf") / "hf"))
    config = hf_to_mcore_config_dpskv3(load_hf_config(hf_dir), use_cpu_initialization=True,
                                       pipeline_dtype=torch.float32, mtp_num_layers=None)
    torch.manual_seed(0)
    return build_model(config)


def _grads(model, deferred: bool):
    model.zero_grad(set_to_none=True)
    tokens = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    loss = forward_logits(model, tokens).float().log_softmax(-1).mean()
    if not deferred:
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, []
    with weight_grad.deferring() as closures:
        loss.backward()
    after_b = {n for n, p in model.named_parameters() if p.grad is not None}
    weight_grad.run(closures)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, after_b


def test_w_step_completes_exactly_the_plain_backward(model):
    plain, _ = _grads(model, deferred=False)
    split, after_b = _grads(model, deferred=True)
    assert split.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(split[name], plain[name], rtol=0, atol=0, msg=name)
    # B left the weight GEMMs of the attention projections, the MLPs, the experts and the head to W;
    # norms, the router and the embedding got theirs in B.
    deferred = set(plain) - after_b
    assert any("linear_proj" in n for n in deferred)
    assert any("experts.weight1" in n for n in deferred)
    assert any("output_layer" in n for n in deferred)
    assert not any("layernorm" in n or "router" in n or "embedding" in n for n in deferred)


def test_deferral_does_not_nest():
    with weight_grad.deferring():
        with pytest.raises(RuntimeError, match="cannot nest"):
            with weight_grad.deferring():
                pass
