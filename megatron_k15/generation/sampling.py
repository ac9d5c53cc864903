"""Token sampling with per-request random generators.

Each request owns a ``torch.Generator`` seeded from (seed, request index), so what it samples
does not depend on the batch it shares or on the tp size. Log-probs are recorded from the
untempered fp32 distribution: log p(token) = log_softmax(logits)[token].

    temperature == 0  -> argmax (greedy)
    otherwise         -> softmax(logits / T), restricted to the top-k tokens and to the
                         smallest set whose probability reaches top-p, then one draw

The draw is by inverse CDF: each request's generator gives one uniform u (on the host, a few
bytes), and the token is the first index whose cumulative probability (float64, on the
logits' device) exceeds u times the total. So the whole vocabulary never leaves the device,
and a row's token depends only on its own logits and generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def validate(self) -> "SamplingParams":
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0, got {self.top_k}")
        return self


def request_generator(seed: int, request_index: int) -> torch.Generator:
    """A CPU generator that depends only on the run seed and the request's index."""
    return torch.Generator().manual_seed((seed * 1_000_003 + request_index) % (2**63))


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside top-k / the top-p nucleus to -inf (rows of a (b, V) tensor)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: SamplingParams,
                  generators: Optional[list[torch.Generator]] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (b, V) fp32 -> (tokens (b,), log-probs of those tokens under the untempered model)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        filtered = filter_logits(logits / params.temperature, params.top_k, params.top_p)
        probs = torch.softmax(filtered, dim=-1)
        u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in
                         (generators if generators is not None else [None] * probs.shape[0])])
        tokens = inverse_cdf_sample(probs, u.to(probs.device))
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def inverse_cdf_sample(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row i's token: the first index whose float64 cumulative probability exceeds
    ``u[i] * total`` (u in [0, 1)). A token with zero probability is never picked: it adds
    nothing to the cumulative sum, and the result is capped at the row's last positive entry."""
    cdf = probs.double().cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    positive = probs > 0
    last = probs.shape[-1] - 1 - positive.flip(-1).int().argmax(dim=-1)
    return torch.minimum(idx, last)
