"""A few real training steps on CPU through megatron-core's DDP, optimizer and schedule."""

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

from npu_dsv3.model import load_hf
from npu_dsv3.training import build_optimizer, train_step, wrap_model
from npu_dsv3.tiny_model import make_hf_model, save_hf

SEQ, MBS, MICRO = 24, 2, 2


def _microbatches(seed=0):
    ids = torch.randint(0, 203, (MBS * MICRO, SEQ + 1), generator=torch.Generator().manual_seed(seed))
    batch = dict(
        tokens=ids[:, :-1], labels=ids[:, 1:], loss_mask=torch.ones(MBS * MICRO, SEQ),
        position_ids=torch.arange(SEQ).expand(MBS * MICRO, SEQ),
    )
    return [{k: v[i * MBS:(i + 1) * MBS] for k, v in batch.items()} for i in range(MICRO)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf(make_hf_model(seed=21), str(tmp_path_factory.mktemp("train")), with_mtp=True)


def _routers(model):
    return [m for m in model.modules() if hasattr(m, "expert_bias") and m.expert_bias is not None]


def test_adam_lowers_loss_and_bias_follows_noaux_tc(checkpoint):
    rate = 1e-3
    model = load_hf(checkpoint, moe_router_bias_update_rate=rate).train()
    chunks = wrap_model(model)
    optimizer = build_optimizer(chunks, lr=3e-3)
    routers = _routers(model)
    assert len(routers) == 3  # two MoE decoder layers and the MTP layer

    counts = {}
    def count_tokens(router, inputs, output):
        counts[router] = counts.get(router, 0) + output[1].sum(0).float()
    hooks = [r.register_forward_hook(count_tokens) for r in routers]

    losses = []
    for _ in range(6):
        counts.clear()
        before = [r.expert_bias.clone() for r in routers]
        result = train_step(chunks, optimizer, iter(_microbatches()), MICRO, SEQ, MBS)
        losses.append(result["lm_loss"])
        assert result["mtp_loss"] is not None and len(result["mtp_loss"]) == 1
        for router, old in zip(routers, before):
            load = counts[router]
            expected = old + rate * torch.sign(load.mean() - load)
            torch.testing.assert_close(router.expert_bias, expected, rtol=0, atol=1e-7)
    for h in hooks:
        h.remove()
    assert losses[-1] < 0.75 * losses[0], losses
    assert all(b.dtype == torch.float32 for b in (r.expert_bias for r in routers))


def _seq_aux_reference(logits, topk, num_experts, seq, batch):
    """DeepSeek-V3's sequence-wise balance loss sum_i f_i P_i, averaged over sequences."""
    scores = torch.sigmoid(logits.float()).view(seq, batch, num_experts)
    normalised = scores / scores.sum(-1, keepdim=True)
    total = 0.0
    for b in range(batch):
        s = scores[:, b]
        chosen = torch.zeros_like(s).scatter(1, s.topk(topk, dim=-1)[1], 1.0)
        f = num_experts / (topk * seq) * chosen.sum(0)
        p = normalised[:, b].mean(0)
        total = total + (f * p).sum()
    return total / batch


@pytest.mark.parametrize("balancing", ["seq_aux_loss", "none"])
def test_aux_loss_options(checkpoint, balancing):
    coeff = 1e-2 if balancing != "none" else 0.0
    model = load_hf(checkpoint, moe_router_load_balancing_type=balancing, moe_aux_loss_coeff=coeff).train()
    router = model.decoder.layers[1].mlp.router
    captured = {}
    def capture(module, inputs, output):
        captured.setdefault("x", inputs[0].detach())
    hook = router.register_forward_hook(capture)
    batch = _microbatches()[0]
    get_moe_layer_wise_logging_tracker().clear()
    model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    hook.remove()
    tracker = get_moe_layer_wise_logging_tracker()
    if balancing == "none":
        assert "seq_load_balancing_loss" not in tracker
        return
    logged = tracker["seq_load_balancing_loss"]["values"][router.layer_number - 1]
    logits = captured["x"].reshape(-1, captured["x"].shape[-1]).float() @ router.weight.float().t()
    cfg = model.config
    reference = _seq_aux_reference(logits, cfg.moe_router_topk, cfg.num_moe_experts, SEQ, MBS)
    torch.testing.assert_close(logged, reference, rtol=1e-5, atol=1e-6)


def test_mtp_loss_enters_backward_with_its_scaling_factor(checkpoint):
    grads = {}
    for factor in (0.1, 0.3):
        model = load_hf(checkpoint, mtp_loss_scaling_factor=factor, moe_router_load_balancing_type="none").train()
        batch = _microbatches()[0]
        loss = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"]).mean()
        loss.backward()
        grads[factor] = (
            model.mtp.layers[0].eh_proj.weight.grad.clone(),
            model.decoder.layers[0].self_attention.linear_proj.weight.grad.clone(),
        )
    mtp_only_01, shared_01 = grads[0.1]
    mtp_only_03, shared_03 = grads[0.3]
    # The MTP projection only receives the MTP loss: its gradient scales with the factor.
    torch.testing.assert_close(mtp_only_03, 3 * mtp_only_01, rtol=1e-4, atol=1e-8)
    # Main-model weights receive both losses, so they change but do not scale by 3.
    assert (shared_03 - shared_01).abs().max() > 1e-6
    assert not torch.allclose(shared_03, 3 * shared_01, rtol=1e-2)
