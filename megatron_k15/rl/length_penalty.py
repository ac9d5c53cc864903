"""Kimi k1.5 length penalty (DESIGN.md section 3).

For the k responses of one prompt with token lengths len_i:

    lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len)
    len_reward_i = lambda_i if correct_i else min(0, lambda_i)

and all zero when max_len == min_len. The shortest response gets +0.5, the longest -0.5;
wrong answers are never rewarded for being short. The result is added to the task reward
with weight ``--length-penalty-weight`` from ``--length-penalty-start-iter`` on.

DAPO's soft overlong punishment (a baseline's shaping, ``--overlong-buffer-tokens L``), for a
response budget L_max (``--rollout-max-tokens``):

    overlong_i = 0                                   if len_i <= L_max - L
               = -factor * (len_i - (L_max - L)) / L  otherwise (-factor at the budget)
"""

from __future__ import annotations

from collections import defaultdict
from typing import Hashable, Sequence

import torch

__all__ = ["length_rewards", "apply_length_penalty", "overlong_penalty"]


def _to_list(x) -> list:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    return list(x)


def length_rewards(lengths: Sequence[int], correct: Sequence[bool]) -> list[float]:
    """Length rewards of one prompt's k samples (see module docstring)."""
    lengths = [float(v) for v in _to_list(lengths)]
    correct = [bool(c) for c in _to_list(correct)]
    if len(lengths) != len(correct):
        raise ValueError(f"{len(lengths)} lengths but {len(correct)} correctness flags")
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    out = []
    for n, ok in zip(lengths, correct):
        lam = 0.5 - (n - lo) / (hi - lo)
        out.append(lam if ok else min(0.0, lam))
    return out


def apply_length_penalty(rewards, lengths, correct, group_ids, weight: float, iteration: int,
                         start_iter: int = 0):
    """Return ``rewards + weight * length_rewards`` computed per group (prompt), or the rewards
    unchanged before ``start_iter`` or when ``weight == 0``.

    ``rewards``, ``lengths``, ``correct``, ``group_ids`` are per-sample sequences or 1-D
    tensors of the same length; group ids are any hashables. The result has the type of
    ``rewards`` (a float tensor on its device, or a list of floats).
    """
    r_list = [float(v) for v in _to_list(rewards)]
    lengths, correct, group_ids = _to_list(lengths), _to_list(correct), _to_list(group_ids)
    if not (len(r_list) == len(lengths) == len(correct) == len(group_ids)):
        raise ValueError("rewards, lengths, correct and group_ids must have the same length")
    out = list(r_list)
    if weight and iteration >= start_iter:
        groups: dict[Hashable, list[int]] = defaultdict(list)
        for i, g in enumerate(group_ids):
            groups[g].append(i)
        for idx in groups.values():
            lr = length_rewards([lengths[i] for i in idx], [correct[i] for i in idx])
            for i, v in zip(idx, lr):
                out[i] += weight * v
    if isinstance(rewards, torch.Tensor):
        dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
        return torch.tensor(out, dtype=dtype, device=rewards.device)
    return out


def overlong_penalty(lengths: Sequence[int], max_tokens: int, buffer_tokens: int,
                     factor: float = 1.0) -> list[float]:
    """DAPO's soft overlong punishment per response (module docstring): 0 up to
    ``max_tokens - buffer_tokens``, then linear down to ``-factor`` at ``max_tokens``."""
    if buffer_tokens <= 0 or buffer_tokens > max_tokens:
        raise ValueError(f"buffer_tokens must be in [1, max_tokens={max_tokens}], got {buffer_tokens}")
    start = max_tokens - buffer_tokens
    return [-factor * min(max(0, int(n) - start), buffer_tokens) / buffer_tokens for n in _to_list(lengths)]
