"""Model FLOPs of the training and forward passes: throughput in TFLOP/s per GPU and MFU.

For one sequence of s tokens through the model (PaLM's model-FLOPs convention: what the model
needs, not what recompute or padding adds):

    forward FLOPs  = 2 * N * s  +  2 * L * s^2 * h_q
    training FLOPs = 3 x forward (the backward costs two forwards)

    N    parameters in matmuls: every layer's weight matrices (MoE: the router and the top-k
         experts a token passes) and the output layer (V x h; the input embedding is a lookup,
         and a tied embedding counts once)
    L    layers; h_q = heads * head_dim (the query width; MLA: QK^T spans heads * (qk_head_dim
         + qk_pos_emb_head_dim) and PV heads * v_head_dim, so 2 * h_q is their sum)
    2 * L * s^2 * h_q: causal attention (QK^T and PV, 2 * 2 * s^2 * h_q per layer, halved by
         the mask); a sliding-window layer (window W < s) attends W^2 / 2 + (s - W) W query-key
         pairs instead of s^2 / 2

A packed row of several sequences costs the sum over its sequences (attention stops at the
boundaries); padding costs nothing. MFU divides the achieved rate by the GPU's dense bf16/fp16
peak, known here for the usual data-centre GPUs (none for fp32 or an unknown device).
"""

from __future__ import annotations

from typing import Iterable, Optional

# dense bf16/fp16 tensor-core peak in TFLOP/s, the first name contained in the device's name wins
PEAK_HALF_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("H800", 989.4), ("H20", 148.0), ("A100", 312.0), ("A800", 312.0), ("B200", 2250.0),
                    ("L40S", 362.0))


def matmul_parameters(cfg) -> int:
    """N of 2*N*s: the weight matrices a token passes."""
    attention = cfg.attention_parameters(matrices_only=True)
    return sum(attention + cfg.active_mlp_parameters(i, biases=False)
               for i in range(cfg.num_layers)) + cfg.vocab_size * cfg.hidden_size


def attended_pairs(s: int, window: Optional[int] = None) -> float:
    """Query-key pairs a causal layer computes over s tokens (s^2 / 2, the convention), or
    through a sliding window of ``window`` tokens."""
    if window is None or s <= window:
        return s * s / 2.0
    return window * window / 2.0 + (s - window) * window


def forward_flops(cfg, seq_lengths: Iterable[int]) -> float:
    """Model FLOPs of one forward pass over independent causal sequences of these lengths."""
    lengths = [int(s) for s in seq_lengths]
    sliding = sum(cfg.is_sliding_layer(i) for i in range(cfg.num_layers))
    pairs = sum((cfg.num_layers - sliding) * attended_pairs(s) + sliding * attended_pairs(s, cfg.sliding_window)
                for s in lengths)
    return 2.0 * matmul_parameters(cfg) * sum(lengths) + 2.0 * (qk_width(cfg) + cfg.value_projection_size) * pairs


def qk_width(cfg) -> int:
    """Channels of all heads that a query-key product spans (MLA: without the v padding)."""
    if cfg.multi_latent_attention:
        return cfg.num_attention_heads * (cfg.qk_head_dim + cfg.qk_pos_emb_head_dim)
    return cfg.query_projection_size


def training_flops(cfg, seq_lengths: Iterable[int]) -> float:
    """Forward + backward model FLOPs (3 x forward)."""
    return 3.0 * forward_flops(cfg, seq_lengths)


def peak_tflops(device_name: str, dtype) -> Optional[float]:
    """The device's dense peak for ``dtype`` (bf16/fp16 only), or None when unknown."""
    import torch

    if dtype not in (torch.bfloat16, torch.float16, "bf16", "fp16"):
        return None
    return next((v for key, v in PEAK_HALF_TFLOPS if key in device_name), None)


def device_peak_tflops(dtype) -> Optional[float]:
    """``peak_tflops`` of this process's GPU (None without one)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_tflops(torch.cuda.get_device_name(), dtype)


def throughput_metrics(flops: float, seconds: float, world_size: int, peak: Optional[float],
                       prefix: str = "") -> dict:
    """``{prefix}tflops_per_gpu`` (and ``{prefix}mfu`` in [0, 1] when the peak is known) for
    ``flops`` done by ``world_size`` GPUs in ``seconds``."""
    per_gpu = flops / max(seconds, 1e-9) / world_size / 1e12
    out = {f"{prefix}tflops_per_gpu": per_gpu}
    if peak:
        out[f"{prefix}mfu"] = per_gpu / peak
    return out


def format_throughput(metrics: dict, prefix: str = "") -> str:
    """``12.3 TFLOP/s/GPU`` (``, MFU 41.2%`` when known) for a log line."""
    text = f"{metrics[f'{prefix}tflops_per_gpu']:.3g} TFLOP/s/GPU"
    if f"{prefix}mfu" in metrics:
        text += f", MFU {100 * metrics[f'{prefix}mfu']:.1f}%"
    return text
