"""The README's first command: `npu-dsv3 demo` runs the whole job (tokenizer, tiny model, data,
4-process TP x PP x EP pretraining, HF export, both parity checks, LoRA fine-tuning, its PEFT adapter and
the PEFT parity check) and says where everything is."""

import json
import os
import subprocess
import sys

import pytest

from npu_dsv3.demo import LORA_ITERS


@pytest.mark.slow
def test_demo_trains_saves_and_exports(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "npu_dsv3", "demo", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["passed"] and summary["lm_loss_last5"] < 0.8 * summary["lm_loss_first5"]
    assert summary["parity_start_rel_diff"] < 1e-5 and summary["parity_trained_rel_diff"] < 1e-5
    records = [json.loads(line) for line in open(summary["metrics"])]
    assert [r["iteration"] for r in records] == list(range(1, 41))
    with open(os.path.join(summary["checkpoint"], "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "40"
    assert os.path.isfile(os.path.join(summary["hf_export"], "config.json"))
    assert os.path.isfile(os.path.join(summary["hf_export"], "tokenizer.json"))
    # LoRA: the adapters learned, PEFT loads them and gives our logits
    assert summary["lora_peft_rel_diff"] < 1e-5
    lora = [json.loads(line)["lm_loss"] for line in open(os.path.join(os.path.dirname(summary["metrics"]),
                                                                      "lora_metrics.jsonl"))]
    assert len(lora) == LORA_ITERS and lora[-1] < lora[0]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(summary["lora_adapter"]))
    # every iteration's Megatron-style line reached the terminal
    assert sum(" iteration " in line for line in proc.stdout.splitlines()) == 40 + LORA_ITERS
