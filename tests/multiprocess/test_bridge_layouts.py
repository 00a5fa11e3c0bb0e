"""``npu_dsv3.bridge`` on gloo processes: ``Bridge.from_hf_pretrained(dir).get_model(...)`` builds each rank's
chunks of the layout straight from the HF directory, a forward through megatron's pipeline schedule gives
transformers' logits, and ``export_hf_weights`` gives every rank the HF files bit for bit, for TP2 + SP, PP2,
EP2, TP2 x EP2 with expert-TP 1 and 2, PP2 with VPP, dualpipev PP2 and --moe-tp-extend-ep (LoRA too; MTP on in
``WITH_MTP``, off in the others); and an RL
loop (transformers rollout, megatron policy steps, bridge sync) on each of those layouts and PP2 x EP2 keeps the
rollout model equal to the policy; a QLoRA model at TP2 x EP2 exports its dequantized NF4 base from every rank.
Run as a script, this file is one rank (one JSON line)."""

import json
import os
import subprocess
import sys

import pytest
import torch

LAYOUTS = {
    # name: (world, megatron sizes, config overrides)
    "tp2-sp": (2, dict(tp=2), dict(sequence_parallel=True)),
    "pp2": (2, dict(pp=2), {}),
    "ep2": (2, dict(ep=2), {}),
    "tp2-ep2-etp1": (4, dict(tp=2, ep=2, etp=1), dict(sequence_parallel=True)),
    "tp2-ep2-etp2": (4, dict(tp=2, ep=2, etp=2), dict(sequence_parallel=True)),
    "pp2-vpp2": (2, dict(pp=2, vpp=2), {}),
    "pp2-dualpipev": (2, dict(pp=2, vpp=2), dict(schedules_method="dualpipev")),
    "tp2-sp-moe-tp-extend-ep": (2, dict(tp=2, ep=2, etp=1), dict(sequence_parallel=True, moe_tp_extend_ep=True)),
    # adapters (B = 0: the merged export is still the files) gathered from every rank, expert-TP 1
    "tp2-ep2-etp1-lora": (4, dict(tp=2, ep=2, etp=1), dict(
        sequence_parallel=True, lora_rank=4, lora_alpha=8.0,
        lora_targets=("linear_kv_up_proj", "linear_proj", "mlp.linear_fc1", "experts.linear_fc1", "output_layer"))),
}
# the RL loop runs on every layout above, and on pipeline x expert parallelism
RL_LAYOUTS = {**LAYOUTS, "pp2-ep2": (4, dict(pp=2, ep=2), {})}
# these load a checkpoint with an MTP layer (on the last stage, beside the head; its embedding and head copies)
WITH_MTP = {"pp2", "tp2-ep2-etp1", "pp2-vpp2", "pp2-dualpipev", "tp2-sp-moe-tp-extend-ep", "pp2-ep2"}
TOLERANCE = 2e-5  # fp32, relative to the largest logit


def _init(sizes: dict, overrides: dict) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from npu_dsv3.model.placement import dualpipev_embedding_ranks

    dist.init_process_group("gloo")
    extra = {"get_embedding_ranks": dualpipev_embedding_ranks} if overrides.get("schedules_method") else {}
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.get("tp", 1), pipeline_model_parallel_size=sizes.get("pp", 1),
        virtual_pipeline_model_parallel_size=sizes.get("vpp"), expert_model_parallel_size=sizes.get("ep", 1),
        expert_tensor_parallel_size=sizes.get("etp", 1), **extra)
    tensor_parallel.model_parallel_cuda_manual_seed(1)


def _microbatches(sizes: dict, overrides: dict) -> int:
    """megatron's interleaved schedule wants a multiple of PP micro-batches, dualpipev at least 2 x PP."""
    return sizes.get("pp", 1) * (2 if overrides.get("schedules_method") else 1)


def _logits_diff(chunks, ids, expected, microbatches: int):
    """This rank's vocabulary columns of the logits (through megatron's schedule, forward only) against
    ``expected``: the max relative difference on the last stage, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)

    def forward_step(data_iterator, chunk):
        out = chunk(ids, positions, attention_mask=None)
        return out, lambda o: (o.sum() * 0, {"logits": o.detach()})

    for chunk in chunks:
        chunk.eval()
    # the main head's logits (what transformers computes): megatron runs an MTP block only with labels
    mtp = [chunk.mtp_process for chunk in chunks], chunks[0].config.mtp_num_layers
    for chunk in chunks:
        chunk.mtp_process = False
    chunks[0].config.mtp_num_layers = None
    with torch.no_grad():
        stored = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=[iter([None] * microbatches) for _ in chunks],
            model=chunks, num_microbatches=microbatches, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
            forward_only=True)
    for chunk, process in zip(chunks, mtp[0]):
        chunk.mtp_process = process
    chunks[0].config.mtp_num_layers = mtp[1]
    if not stored:
        return None
    local = stored[0]["logits"]
    width, tp_rank = local.shape[-1], parallel_state.get_tensor_model_parallel_rank()
    cols = slice(tp_rank * width, min((tp_rank + 1) * width, expected.shape[-1]))
    return float((local[..., : cols.stop - cols.start] - expected[..., cols]).abs().max() / expected.abs().max())


def _rank_main(hf_dir: str, name: str) -> None:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from npu_dsv3.bridge import Bridge

    _, sizes, overrides = LAYOUTS[name]
    _init(sizes, overrides)
    bridge = Bridge.from_hf_pretrained(hf_dir, dtype=torch.float32)
    chunks = bridge.get_model(moe_grouped_gemm=True, **overrides)
    ids = torch.randint(0, 203, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)(ids).logits
    result = _logits_diff(chunks, ids, expected, _microbatches(sizes, overrides))
    # every rank receives every HF tensor, exactly once, bit for bit the file's (small buckets: many of them)
    from npu_dsv3.checkpoint.hf_reader import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)
    exported = list(bridge.export_hf_weights(chunks, bucket_bytes=1 << 15))
    names = [n for n, _ in exported]
    same = sorted(names) == sorted(reader.names()) and len(set(names)) == len(names) and all(
        t.dtype == reader.get(n).dtype and torch.equal(t, reader.get(n)) for n, t in exported)
    if overrides.get("lora_rank"):  # every adapter, whole, under PEFT's names, on every rank
        adapters = dict(bridge.export_adapter_weights(chunks))
        experts = [k for k in adapters if ".mlp.experts." in k]
        same = same and len(experts) == 2 * 3 and all(  # fc1's A and B of the 3 MoE layers, all experts each
            k.endswith("lora_B.weight") == (not v.any()) for k, v in adapters.items())
    # the load read this rank's slices only: no more bytes than its tensors hold (the files are fp32, as is the
    # model; vocabulary padding is not read), where whole tensors would be twice that under tensor parallelism
    own = sum(t.numel() * t.element_size() for c in chunks for k, t in c.state_dict().items()
              if not k.endswith("_extra_state") and ".lora_" not in k)
    print(json.dumps({"rank": dist.get_rank(), "diff": result, "export": same, "read": bridge.read_bytes, "own": own,
                      "buffer": bridge.export_buffer_bytes, "bucket": 1 << 15,
                      "largest": max(t.numel() * t.element_size() for _, t in exported)}), flush=True)
    dist.destroy_process_group()


def _rl_main(hf_dir: str, name: str) -> None:
    """An RL step on CPU: the rollout model (transformers) generates, the policy (megatron, from the bridge) takes a
    gradient step on the rollout, the bridge syncs the weights, and the rollout model's logits are the policy's."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from npu_dsv3.bridge import Bridge
    from npu_dsv3.training.step import build_optimizer, train_step

    _, sizes, overrides = RL_LAYOUTS[name]
    _init(sizes, overrides)
    bridge = Bridge.from_hf_pretrained(hf_dir, dtype=torch.float32)
    chunks = bridge.get_model(wrap_with_ddp=True, moe_grouped_gemm=True, **overrides)
    if overrides.get("lora_rank"):  # adapters that already act, so the step moves them measurably
        with torch.no_grad():
            for chunk in chunks:
                for key, param in chunk.named_parameters():
                    if "lora_B" in key:
                        param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(2))
    optimizer = build_optimizer(chunks, lr=2e-3)
    microbatches = _microbatches(sizes, overrides)
    rollout = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    prompt = torch.randint(0, 203, (2, 8), generator=torch.Generator().manual_seed(1))
    diffs = []
    for step in range(2):
        with torch.no_grad():
            tokens = rollout.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)  # [2, 12]
        for chunk in chunks:
            chunk.train()
        batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "position_ids":
                 torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens),
                 "loss_mask": torch.cat([torch.zeros(2, 7), torch.ones(2, 4), torch.zeros(2, 1)], 1)}
        train_step(chunks, optimizer, iter([batch] * microbatches), microbatches, tokens.shape[1], tokens.shape[0])
        with torch.no_grad():
            stale = rollout(tokens).logits
        state = dict(bridge.export_hf_weights(chunks, names="transformers"))
        missing, unexpected = rollout.load_state_dict(state, strict=False)
        assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
        with torch.no_grad():
            expected = rollout(tokens).logits
        moved = float((expected - stale).abs().max() / stale.abs().max())  # the step changed the policy
        diffs.append(_logits_diff([c.module for c in chunks], tokens, expected, microbatches))
    print(json.dumps({"rank": dist.get_rank(), "diffs": diffs, "moved": moved}), flush=True)
    dist.destroy_process_group()


def _qlora_main(hf_dir: str) -> None:
    """A QLoRA model at EP2 x TP2 (the NF4 slices whole blocks): every rank's export of the base is the NF4 round
    trip of the HF files, bit for bit, its pieces dequantized where they are sent."""
    import torch.distributed as dist

    from npu_dsv3.bridge import Bridge
    from npu_dsv3.lora.nf4_base import is_quantized
    from npu_dsv3.ops.nf4 import nf4_dequantize, nf4_quantize
    from support.checkpoint_files import hf_tensors

    _init(dict(tp=2, ep=2), dict(sequence_parallel=True))
    bridge = Bridge.from_hf_pretrained(hf_dir, dtype=torch.float32)
    chunks = bridge.get_model(moe_grouped_gemm=True, sequence_parallel=True, qlora=True, lora_rank=4,
                              lora_targets=("linear_proj", "linear_fc1", "linear_fc2"))
    want = {k: nf4_dequantize(nf4_quantize(v)) if is_quantized(k) else v for k, v in hf_tensors(hf_dir).items()}
    got = dict(bridge.export_hf_weights(chunks, merge_lora=False, bucket_bytes=1 << 15))
    same = got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    print(json.dumps({"rank": dist.get_rank(), "export": same, "received": bridge.export_received_bytes}), flush=True)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> the HF directory its layout loads: without MTP, or with it (``WITH_MTP``)."""
    from npu_dsv3.tiny_model import make_hf_model, save_hf

    model = make_hf_model(seed=6, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)
    plain = save_hf(model, str(tmp_path_factory.mktemp("bridge")))
    mtp = save_hf(model, str(tmp_path_factory.mktemp("bridge_mtp")), with_mtp=True)
    return lambda name: mtp if name in WITH_MTP else plain


def _run(hf_dir, name, world, *extra):
    from support import free_port, process_env

    env = {**process_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), hf_dir, name, *extra],
                              env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    outputs = [p.communicate(timeout=240) for p in procs]
    for proc, (_, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_get_model_from_hf_gives_transformers_logits(hf_dirs, name):
    world = LAYOUTS[name][0]
    results = _run(hf_dirs(name), name, world)
    measured = [r["diff"] for r in results if r["diff"] is not None]
    assert measured and max(measured) < TOLERANCE, results
    assert all(r["export"] for r in results), results
    # the received bytes: two buckets in flight, each at most a bucket or one merge's pieces (fc1: gate and up)
    assert all(0 < r["buffer"] <= 2 * (r["bucket"] + 2 * r["largest"]) for r in results), results
    assert all(0.6 * r["own"] < r["read"] <= r["own"] for r in results), results


@pytest.mark.parametrize("name", sorted(RL_LAYOUTS))
def test_an_rl_loop_keeps_the_rollout_model_in_sync(hf_dirs, name):
    results = _run(hf_dirs(name), name, RL_LAYOUTS[name][0], "rl")
    measured = [d for r in results for d in r["diffs"] if d is not None]
    assert len(measured) >= 2 and max(measured) < TOLERANCE, results
    assert all(r["moved"] > 1e-3 for r in results), results


def test_a_qlora_model_exports_its_dequantized_base_from_every_rank(tmp_path):
    from npu_dsv3.tiny_model import make_hf_model, save_hf
    from support.qlora import ALIGNED

    hf = save_hf(make_hf_model(seed=4, **ALIGNED), str(tmp_path / "hf"), with_mtp=True)
    results = _run(hf, "qlora", 4)
    assert all(r["export"] and r["received"] > 0 for r in results), results


if __name__ == "__main__":
    import npu_dsv3  # noqa: F401  (the patches)

    if sys.argv[2] == "qlora":
        _qlora_main(sys.argv[1])
    else:
        (_rl_main if sys.argv[3:] == ["rl"] else _rank_main)(sys.argv[1], sys.argv[2])
