"""Per-iteration metrics: log line, JSONL record, throughput and the stop on a non-finite loss."""

import json
import math

import pytest

from npu_dsv3.config import hf_to_mcore_config_dpskv3
from npu_dsv3.tiny_model import TINY_CONFIG
from npu_dsv3.training.flops import train_flops
from npu_dsv3.training.metrics import (IterationMetrics, JsonlLog, NonFiniteLossError, check_finite, format_line,
                                       throughput)


def _metrics(**overrides):
    values = dict(iteration=7, train_iters=100, consumed_samples=56, global_batch_size=8, lm_loss=2.5,
                  grad_norm=1.25, lr=3e-4, ms_per_iter=812.5, tokens_per_sec=1234.0, tflops_per_device=0.5,
                  memory_gb=1.5, mtp_loss=2.75, load_balancing_loss=0.01)
    return IterationMetrics(**{**values, **overrides})


def test_log_line_has_megatrons_fields_and_the_moe_and_mtp_losses():
    line = format_line(_metrics())
    for text in ("iteration        7/     100", "consumed samples:           56", "lm loss: 2.500000E+00",
                 "mtp loss: 2.750000E+00", "load balancing loss: 1.000000E-02", "grad norm: 1.250",
                 "learning rate: 3.000000E-04", "elapsed time per iteration (ms): 812.5",
                 "tokens/s/device: 1234.0", "TFLOP/s/device): 0.50"):
        assert text in line, text
    assert "mtp loss" not in format_line(_metrics(mtp_loss=None))


def test_jsonl_has_one_record_per_iteration_and_appends(tmp_path):
    path = tmp_path / "logs" / "metrics.jsonl"
    for run in range(2):  # a resumed run appends to the same file
        log = JsonlLog(str(path))
        log.write(_metrics(iteration=run + 1, extra={"tokens": 4096}))
        log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["iteration"] for r in records] == [1, 2]
    for key in ("iteration", "lm_loss", "grad_norm", "lr", "tokens_per_sec", "tflops_per_device"):
        assert key in records[0]
    assert records[0]["tokens"] == 4096


@pytest.mark.parametrize("field", ["lm_loss", "grad_norm", "mtp_loss"])
def test_a_non_finite_value_stops_with_its_name_and_iteration(field):
    check_finite(_metrics())
    for bad in (math.nan, math.inf):
        with pytest.raises(NonFiniteLossError, match=f"{field.replace('_', ' ')} is {bad} at iteration 7"):
            check_finite(_metrics(**{field: bad}))


def test_throughput_is_tokens_and_model_flops_per_device_second():
    config = hf_to_mcore_config_dpskv3({**TINY_CONFIG, "model_type": "deepseek_v3"})
    tokens_per_sec, tflops = throughput(config, seq_length=64, global_batch_size=8, seconds=2.0, world_size=4)
    assert tokens_per_sec == 8 * 64 / 2.0 / 4
    assert tflops == pytest.approx(train_flops(config, 64, 8 * 64) / 2.0 / 4 / 1e12)
