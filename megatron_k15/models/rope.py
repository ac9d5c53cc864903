"""Rotary position embeddings (RoPE), in Hugging Face's rotate-half convention.

    inv_freq_i = 1 / theta^(2i/d)                          i = 0 .. d/2-1
    angle(p, i) = p * inv_freq_i ;  cos/sin over [angle, angle] (the two halves repeat)
    rope(x) = x * cos + rotate_half(x) * sin,  rotate_half([a, b]) = [-b, a]

Llama-3 scaling divides low frequencies (wavelength > original_ctx / low_freq_factor) by
``factor``, keeps high frequencies (wavelength < original_ctx / high_freq_factor), and
interpolates smoothly in between.

YaRN (Qwen2.5's 128K recipe, ``rope_type: yarn``) blends, per frequency pair i, the original
inv_freq (extrapolation) with inv_freq / factor (interpolation) by a linear ramp over the pair
index between the dimensions that complete ``beta_fast`` and ``beta_slow`` rotations over the
original context, d_r = d ln(ctx / (2 pi r)) / (2 ln theta); pairs below the ramp keep their
frequency, pairs above are interpolated. cos and sin are multiplied by the attention factor
0.1 ln(factor) + 1 (or mscale / mscale_all_dim's ratio, or an explicit ``attention_factor``). Angles are computed in fp32 from the *original* token
positions, so context-parallel chunks and packed sequences get the right rotation.

LongRoPE (Phi-3.5-mini, Phi-4-mini: ``rope_type: longrope``) divides each frequency by its own
searched factor, inv_freq_i = 1 / (f_i theta^(2i/d)), from one of two lists: ``short_factor``
for sequences within the pretraining context ``original_max_position_embeddings`` and
``long_factor`` beyond it; cos and sin are multiplied by sqrt(1 + ln(factor) / ln(original))
(factor = max_position_embeddings / original unless given). transformers switches lists per
forward call by the longest position in it, so a sequence that grows past the original context
during generation has keys rotated with the short factors and later queries with the long ones,
and its log-probs differ from a forward over the whole sequence. We pick one list per run
(``longrope_factors``): the long one when the run's sequences may exceed the original context,
so rollouts and training see the same rotation; HF's choice for every sequence on that side.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from megatron_k15.models.config import yarn_mscale


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict] = None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    if rope_type(scaling) == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, scaling)
    if rope_type(scaling) == "linear":  # position interpolation: every frequency / factor
        return inv_freq / float(scaling["factor"])
    if rope_type(scaling) == "longrope":  # one searched divisor per frequency (computed as HF does)
        factors = torch.tensor(scaling[longrope_list(scaling)], dtype=torch.float32)
        return 1.0 / (factors * theta ** exponents)
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


def rope_type(scaling: Optional[dict]) -> str:
    """``default``, ``llama3`` (also for older configs without a type), ``yarn``, ``linear`` or
    ``longrope``."""
    if not scaling:
        return "default"
    return scaling.get("rope_type", "llama3")


def _yarn_inv_freq(inv_freq: torch.Tensor, head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    factor = float(scaling["factor"])
    original = float(scaling["original_max_position_embeddings"])
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def dim_of(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, head_dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    return inv_freq / factor * ramp + inv_freq * (1 - ramp)


LONGROPE_CHOICES = ("auto", "short", "long")


def longrope_list(scaling: dict) -> str:
    """``short_factor`` or ``long_factor``: the list ``scaling["factors"]`` names (set by
    ``with_longrope_choice``; the long one, for the whole context, when unset)."""
    return "short_factor" if scaling.get("factors") == "short" else "long_factor"


def with_longrope_choice(scaling: Optional[dict], choice: str = "auto",
                         max_length: Optional[int] = None) -> Optional[dict]:
    """``scaling`` with LongRoPE's list for this run fixed (other types unchanged): ``short`` or
    ``long`` as given; ``auto``: long when ``max_length`` (the run's longest sequence; None: the
    model's whole context) exceeds ``original_max_position_embeddings``, as transformers decides
    for one sequence of that length."""
    if rope_type(scaling) != "longrope":
        return scaling
    if choice not in LONGROPE_CHOICES:
        raise ValueError(f"--longrope-factors must be one of {LONGROPE_CHOICES}, got {choice!r}")
    if choice == "auto":
        choice = ("long" if max_length is None or max_length > int(scaling["original_max_position_embeddings"])
                  else "short")
    return {**scaling, "factors": choice}


def rope_attention_factor(scaling: Optional[dict]) -> float:
    """The factor YaRN and LongRoPE multiply cos and sin by (1 for the other types)."""
    kind = rope_type(scaling)
    if kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = float(scaling["factor"])
    if kind == "longrope":
        original = float(scaling["original_max_position_embeddings"])
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return yarn_mscale(factor, float(scaling["mscale"])) / yarn_mscale(factor, float(scaling["mscale_all_dim"]))
    return yarn_mscale(factor)


class RotaryEmbedding(torch.nn.Module):
    """Produces cos/sin for given positions; holds only the (d/2,) inverse frequencies."""

    def __init__(self, head_dim: int, theta: float, scaling: Optional[dict] = None):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(head_dim, theta, scaling), persistent=False)
        self.attention_factor = rope_attention_factor(scaling)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids (b, s) -> cos, sin of shape (s, b, 1, head_dim) in ``dtype``."""
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            angles = position_ids.to(torch.float32)[..., None] * self.inv_freq.to(position_ids.device)
            emb = torch.cat((angles, angles), dim=-1)  # (b, s, d)
            cos, sin = emb.cos(), emb.sin()
            if self.attention_factor != 1.0:
                cos, sin = cos * self.attention_factor, sin * self.attention_factor
        cos = cos.transpose(0, 1).unsqueeze(2).to(dtype)
        sin = sin.transpose(0, 1).unsqueeze(2).to(dtype)
        return cos, sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (s, b, heads, d); cos/sin (s, b, 1, r): the first r channels of each head rotate
    (partial RoPE when r < d, as GLM-4's), the others pass through."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot = x[..., :r]
    return torch.cat([rot * cos + rotate_half(rot) * sin, x[..., r:]], dim=-1)
