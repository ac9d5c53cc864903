"""The simplest correct generator: recompute the whole sequence for every new token.

O(n^2) per sequence and no KV cache — it is the reference the fast engine (paged KV cache,
continuous batching) is tested against, and it runs any tp layout. Rows are right-padded;
with causal attention the padding after a row's last token cannot change that token's logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_k15.generation.sampling import SamplingParams, sample_tokens


@dataclass
class GenerationResult:
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    stop_reason: str = ""


def _broadcast_from_tp_rank0(t: torch.Tensor, model) -> torch.Tensor:
    """All tp ranks must continue with identical tokens."""
    if model.tp_size > 1:
        src = dist.get_global_rank(model.tp_group, 0)
        dist.broadcast(t, src=src, group=model.tp_group)
    return t


@torch.no_grad()
def generate_recompute(model, prompts: list[list[int]], max_new_tokens, params: SamplingParams,
                       generators: list[torch.Generator], eos_ids: list[int],
                       repeat_detector: Optional[Callable[[], object]] = None) -> list[GenerationResult]:
    """``max_new_tokens``: one budget for all, or one per request. ``repeat_detector()`` makes a
    per-request detector whose ``push(token)`` returns True when the tail repeats (stop
    reason ``repeat``) or a stop reason of its own (a string)."""
    device = next(model.parameters()).device
    budgets = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    detectors = [repeat_detector() for _ in prompts] if repeat_detector is not None else None
    pad_to = model.tp_size if model.sequence_parallel else 1
    eos = set(eos_ids)
    seqs = [list(p) for p in prompts]
    results = [GenerationResult() for _ in prompts]
    for i, budget in enumerate(budgets):
        if budget <= 0:
            results[i].stop_reason = "length"
    for _ in range(max(budgets, default=0)):
        active = [i for i, r in enumerate(results) if not r.stop_reason]
        if not active:
            break
        lengths = [len(seqs[i]) for i in active]
        width = int(math.ceil(max(lengths) / pad_to) * pad_to)
        ids = torch.zeros((len(active), width), dtype=torch.long)
        for row, i in enumerate(active):
            ids[row, : lengths[row]] = torch.tensor(seqs[i])
        last = torch.tensor(lengths, device=device) - 1
        logits = model.last_token_logits(ids.to(device), last)
        tokens, logprobs = sample_tokens(logits, params, [generators[i] for i in active])
        tokens = _broadcast_from_tp_rank0(tokens.contiguous(), model)
        logprobs = _broadcast_from_tp_rank0(logprobs.float().contiguous(), model)
        # one device->host copy per step, not one sync per token
        token_list, logprob_list = tokens.tolist(), logprobs.tolist()
        for row, i in enumerate(active):
            tok = token_list[row]
            seqs[i].append(tok)
            r = results[i]
            r.output_ids.append(tok)
            r.output_logprobs.append(logprob_list[row])
            why = detectors[i].push(tok) if detectors is not None and detectors[i] is not None and tok not in eos else None
            if tok in eos:
                r.stop_reason = "eos"
            elif why:
                r.stop_reason = why if isinstance(why, str) else "repeat"
            elif len(r.output_ids) >= budgets[i]:
                r.stop_reason = "length"
    for r in results:
        r.stop_reason = r.stop_reason or "length"
    return results
