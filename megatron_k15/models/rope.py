"""Rotary position embeddings (RoPE), in Hugging Face's rotate-half convention.

    inv_freq_i = 1 / theta^(2i/d)                          i = 0 .. d/2-1
    angle(p, i) = p * inv_freq_i ;  cos/sin over [angle, angle] (the two halves repeat)
    rope(x) = x * cos + rotate_half(x) * sin,  rotate_half([a, b]) = [-b, a]

Llama-3 scaling divides low frequencies (wavelength > original_ctx / low_freq_factor) by
``factor``, keeps high frequencies (wavelength < original_ctx / high_freq_factor), and
interpolates smoothly in between. Angles are computed in fp32 from the *original* token
positions, so context-parallel chunks and packed sequences get the right rotation.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict] = None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen, high_freq_wavelen = original / low, original / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Produces cos/sin for given positions; holds only the (d/2,) inverse frequencies."""

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict] = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids (b, s) -> cos, sin of shape (s, b, 1, head_dim) in ``dtype``."""
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            angles = position_ids.to(torch.float32)[..., None] * self.inv_freq.to(position_ids.device)
            emb = torch.cat((angles, angles), dim=-1)  # (b, s, d)
            cos, sin = emb.cos(), emb.sin()
        cos = cos.transpose(0, 1).unsqueeze(2).to(dtype)
        sin = sin.transpose(0, 1).unsqueeze(2).to(dtype)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (s, b, heads, d); cos/sin (s, b, 1, d)."""
    return x * cos + rotate_half(x) * sin
