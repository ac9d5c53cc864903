"""Model FLOPs (megatron_k15.flops) against PyTorch's FLOP counter on the model's own forward,
and train_sft's logged TFLOP/s/GPU against the FLOPs of the samples it trained on."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_k15.flops import forward_flops, peak_tflops, throughput_metrics, training_flops
from megatron_k15.initialize import initialize_model_parallel
from megatron_k15.models.config import preset
from megatron_k15.models.gpt import GPTModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_checkpointing import ROOT, _make_sft_data, _sft_cmd  # noqa: E402


def _attention_flops(cfg, lengths):
    """Causal attention counted on a plain q @ k^T / p @ v per sequence (the counter sees the
    full square; the mask keeps half of it)."""
    total = 0
    for s in lengths:
        q = torch.zeros(1, cfg.num_attention_heads, s, cfg.kv_channels)
        with FlopCounterMode(display=False) as fc:
            torch.softmax(q @ q.transpose(-1, -2), -1) @ q
        total += fc.get_total_flops() / 2
    return cfg.num_layers * total


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("lengths", [[48], [5, 25, 18]])
def test_forward_flops_equal_the_counted_forward(moe, lengths):
    initialize_model_parallel(1)
    kw = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32) if moe else {}
    cfg = preset("tiny", num_layers=2, num_query_groups=2, **kw)
    model = GPTModel(cfg, attention_backend="sdpa")
    s = sum(lengths)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    with FlopCounterMode(display=False) as fc:
        model(torch.randint(0, cfg.vocab_size, (1, s)), cu_seqlens=cu if len(lengths) > 1 else None)
    counted = fc.get_flop_counts()["Global"]
    assert not [op for op in counted if "attention" in str(op)]  # CPU SDPA is not counted: added below
    # the output layer's padding columns (vocabulary rounded up) are computed, not model FLOPs
    padding = 2 * s * cfg.hidden_size * (cfg.padded_vocab_size() - cfg.vocab_size)
    assert padding > 0
    expected = fc.get_total_flops() - padding + _attention_flops(cfg, lengths)
    assert forward_flops(cfg, lengths) == expected
    assert training_flops(cfg, lengths) == 3 * expected


def test_sliding_window_layers_count_the_pairs_in_their_window():
    """By hand: 48 tokens through a 16-token window attend 16^2/2 + 32*16 = 640 query-key pairs
    instead of 48^2/2 = 1152; each pair costs 4 * h_q FLOPs (QK^T and PV). Only the sliding
    layer changes; a window longer than the sequence changes nothing."""
    full = preset("tiny", num_layers=2)
    mixed = preset("tiny", num_layers=2, sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    h_q = full.query_projection_size
    assert forward_flops(full, [48]) - forward_flops(mixed, [48]) == 4 * h_q * (1152 - 640)
    assert forward_flops(mixed, [16, 10]) == forward_flops(full, [16, 10])


def test_throughput_and_peaks():
    m = throughput_metrics(4e12, 2.0, 2, 989.4, prefix="train_")
    assert m == {"train_tflops_per_gpu": 1.0, "train_mfu": 1.0 / 989.4}
    assert "mfu" not in throughput_metrics(1e12, 1.0, 1, None)
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", torch.float32) is None
    assert peak_tflops("a CPU", torch.bfloat16) is None


@pytest.mark.slow
def test_sft_logs_the_flops_of_its_samples(tmp_path):
    """One iteration over every row of the first epoch: the logged TFLOP/s/GPU x time is the
    training FLOPs of every sample (its tokens up to --seq-length), padding not counted."""
    from megatron_k15.data.indexed import load_sft_dataset
    from megatron_k15.data.sft import PackedSFTStream

    data = _make_sft_data(tmp_path)
    dataset = load_sft_dataset(data)
    rows = PackedSFTStream(dataset, 64, seed=1234, lengths=dataset.lengths).rows_in_epoch(0)
    tb = tmp_path / "tb"
    cmd = _sft_cmd(data, str(tmp_path / "ck"), str(tb), ["--train-iters", "1", "--micro-batch-size", "1",
                                                           "--global-batch-size", str(rows), "--lr-warmup-iters", "0",
                                                           "--log-params-norm", "--log-num-zeros-in-grad"])
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    (m,) = [json.loads(line) for line in open(tb / "metrics.jsonl")]
    cfg = preset("tiny", num_layers=4)
    expected = training_flops(cfg, [min(len(dataset[i].tokens) - 1, 64) for i in range(len(dataset))])
    assert m["tflops_per_gpu"] * m["iteration_time_s"] * 1e12 == pytest.approx(expected, rel=1e-9)
    assert "TFLOP/s/GPU" in res.stdout and "mfu" not in m  # no GPU: no peak to compare with
    assert m["params_norm"] > 0  # --log-params-norm (its value: tests/test_training_parallel.py)
    # --log-num-zeros-in-grad: at least the padded vocabulary rows (260 -> 384) of the tied embedding
    assert m["num_zeros_in_grad"] >= (cfg.padded_vocab_size(1) - cfg.vocab_size) * cfg.hidden_size > 0
