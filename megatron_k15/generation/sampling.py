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

Under tensor parallelism ``sample_tokens_vocab_parallel`` draws the same tokens from
vocabulary shards, exchanging only per-row scalars and short candidate lists between ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


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
        # stable: among equal logits the lower index comes first, so which of several tokens
        # tied at the cut-off survive is defined (and reproducible under vocab parallelism)
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
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


# -- vocabulary-parallel sampling ---------------------------------------------------------------
def sample_tokens_vocab_parallel(local_logits: torch.Tensor, params: SamplingParams,
                                 generators: Optional[list[torch.Generator]], group,
                                 vocab_start: int, vocab_size: int, *,
                                 initial_candidates: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_tokens`` on logits split by vocabulary over ``group``, without gathering them.

    ``local_logits`` (b, V_local) holds global columns vocab_start .. vocab_start+V_local-1;
    columns >= ``vocab_size`` are padding and count as -inf. Every rank returns the same
    (tokens (b,) int64 global ids, log-probs (b,) fp32), equal to ``sample_tokens`` on the
    concatenated logits with the same generators (all ranks hold identically seeded ones and
    each consumes one draw per row, as there; ``None`` draws from the global RNG on the
    group's first rank and broadcasts). Only O(b * tp) values, or O(b * C * tp) top-k / top-p
    candidates, cross ranks:

        M = max_r max_j x_rj (all-reduce),  S = sum_r sum_j exp(x_rj - M) (all-reduce)
        log p(token) = x_token - M - log S  (x_token from the rank that owns it)
        greedy: argmax over ranks of (local max, local argmax), ties -> lowest global index
        sampling: w = exp(x/T - max(x/T)) after filtering; W_r = sum_j w_rj (all-gather);
            token = first global index whose cumulative weight, sum_{s<r} W_s + cumsum_r w,
            exceeds u * sum_r W_r; only the rank whose interval holds it searches.
        top-k: the k-th largest of the gathered local top-k lists is the global threshold.
        top-p: see ``_top_p_filter_vocab_parallel``.

    Tie rule (as ``filter_logits``, whose sort is stable): top-k keeps every token >= the
    k-th value; top-p keeps the tokens above the cut-off value and, of those equal to it, as
    many as the descending order keeps, lowest global index first. The top-p cut compares
    cumulative masses computed from a distributed softmax normaliser, so it can differ from
    ``filter_logits`` only when the mass lands within float rounding (~1e-7) of ``top_p``; the
    inverse-CDF draw likewise only when u * total lands that close to a boundary.
    ``initial_candidates`` is the first top-p candidate count per rank (it doubles as needed).
    """
    if group is None or dist.get_world_size(group) == 1:
        return sample_tokens(local_logits[:, :vocab_size], params, generators)
    logits = _mask_vocab_padding(local_logits.float(), vocab_start, vocab_size)
    if params.temperature == 0:
        return _greedy_vocab_parallel(logits, vocab_start, group)
    scaled = logits / params.temperature
    maxes = _all_reduce(torch.stack([logits.max(-1).values, scaled.max(-1).values], -1),
                        dist.ReduceOp.MAX, group)
    logit_max, scaled_max = maxes[:, 0], maxes[:, 1]
    if params.top_k and params.top_k < vocab_size:
        scaled = _top_k_filter_vocab_parallel(scaled, params.top_k, group)
    sums = _all_reduce(torch.stack([torch.exp(logits - logit_max[:, None]).sum(-1),
                                    torch.exp(scaled - scaled_max[:, None]).sum(-1)], -1),
                       dist.ReduceOp.SUM, group)
    if params.top_p < 1.0:
        scaled = _top_p_filter_vocab_parallel(scaled, scaled_max, sums[:, 1], params.top_p, group,
                                              initial_candidates)
    u = _uniforms(generators, logits.shape[0], group, logits.device)
    tokens = _inverse_cdf_vocab_parallel(torch.exp(scaled - scaled_max[:, None]), u, vocab_start,
                                         group)
    token_logits = _owned_logit(logits, tokens, vocab_start, group)
    return tokens, (token_logits - logit_max) - torch.log(sums[:, 0])


def _mask_vocab_padding(logits: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    """Padding columns (global id >= vocab_size) hold whatever the padded head computed; as
    -inf they get no probability and never win the argmax."""
    ids = torch.arange(vocab_start, vocab_start + logits.shape[-1], device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    tensor = tensor.contiguous()
    dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _all_gather(tensor: torch.Tensor, group) -> torch.Tensor:
    """(tp, *tensor.shape), rank order; the list form, because gloo has no all_gather_into_tensor."""
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor, group=group)
    return torch.stack(parts)


def _greedy_vocab_parallel(logits: torch.Tensor, vocab_start: int, group):
    """Gather each rank's (max, global argmax) in float64 (exact for fp32 values and ids); the
    first rank holding the global max wins, so ties go to the lowest global index as argmax."""
    local_max = logits.max(-1).values
    local_ids = logits.argmax(-1) + vocab_start
    gathered = _all_gather(torch.stack([local_max.double(), local_ids.double()], -1), group)
    best = gathered[..., 0].max(0).values
    winner = (gathered[..., 0] == best).int().argmax(0)
    tokens = gathered[..., 1].gather(0, winner[None])[0].long()
    logit_max = best.float()
    norm = _all_reduce(torch.exp(logits - logit_max[:, None]).sum(-1), dist.ReduceOp.SUM, group)
    return tokens, -torch.log(norm)  # the token holds the max: log p = (M - M) - log S


def _top_k_filter_vocab_parallel(scaled: torch.Tensor, top_k: int, group) -> torch.Tensor:
    """The global top k are among the union of the local top-k lists, so the k-th largest of
    the gathered lists is the global k-th value; tokens below it become -inf."""
    local_top = torch.topk(scaled, min(top_k, scaled.shape[-1]), dim=-1).values
    gathered = _all_gather(local_top, group).permute(1, 0, 2).reshape(scaled.shape[0], -1)
    kth = torch.topk(gathered, top_k, dim=-1).values[:, -1:]
    return scaled.masked_fill(scaled < kth, float("-inf"))


def _top_p_filter_vocab_parallel(scaled: torch.Tensor, scaled_max: torch.Tensor,
                                 mass: torch.Tensor, top_p: float, group,
                                 initial_candidates: int) -> torch.Tensor:
    """Drop a token when the probability strictly before it (descending) reaches top_p.

    Each rank offers its top C values; with m = max over ranks of each rank's C-th value,
    the offered values > m are exactly the global values > m (a rank's values above its C-th
    are all offered). p = exp(v - max) / mass (``mass`` = the all-reduced softmax
    normaliser). If their descending cumulative mass reaches top_p, the cut lies among them;
    else C doubles (C = V_local is a full gather, the worst case). The cut-off value v* is
    the last kept one; ties at v* are kept lowest global index first, as many as the
    descending order keeps (the counts per rank are read from the gathered lists).
    """
    b, v_local = scaled.shape
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    cutoff = torch.full((b,), float("-inf"), device=scaled.device)
    tie_quota = torch.full((b,), v_local, dtype=torch.long, device=scaled.device)
    pending = torch.arange(b, device=scaled.device)
    c = max(1, min(initial_candidates, v_local))
    while pending.numel():
        offered = torch.topk(scaled[pending], c, dim=-1).values
        gathered = _all_gather(offered, group)  # (tp, n, c), descending per rank
        floor = gathered[:, :, -1].max(0).values
        if c == v_local:
            floor = torch.full_like(floor, float("-inf"))
        rows = gathered.permute(1, 0, 2).reshape(pending.numel(), tp * c)
        rows = rows.masked_fill(rows <= floor[:, None], float("-inf"))
        ordered = torch.sort(rows, dim=-1, descending=True).values
        probs = torch.exp(ordered - scaled_max[pending, None]) / mass[pending, None]
        drop = (probs.cumsum(-1) - probs) >= top_p
        cut = drop.any(-1)
        decided = cut | (floor == float("-inf"))
        first_drop = drop.int().argmax(-1)
        value = ordered.gather(-1, (first_drop - 1).clamp(min=0)[:, None])[:, 0]
        kept_ties = ((ordered == value[:, None])
                     & (torch.arange(tp * c, device=scaled.device) < first_drop[:, None])).sum(-1)
        ties_below = (gathered[:rank] == value[None, :, None]).sum(-1).sum(0)
        done = pending[cut]
        cutoff[done] = value[cut]
        tie_quota[done] = (kept_ties - ties_below)[cut].clamp(min=0)
        pending = pending[~decided]
        c = min(2 * c, v_local)
    is_tie = scaled == cutoff[:, None]
    tie_rank = is_tie.long().cumsum(-1) - 1
    keep = (scaled > cutoff[:, None]) | (is_tie & (tie_rank < tie_quota[:, None]))
    return scaled.masked_fill(~keep, float("-inf"))


def _uniforms(generators: Optional[list[torch.Generator]], b: int, group,
              device: torch.device) -> torch.Tensor:
    """One float64 uniform per row, as ``sample_tokens`` draws it. Per-row generators are
    seeded alike on every rank; the global RNG need not be, so when any row draws from it
    (``None``, or a None entry) the group's first rank's draws are used for every row."""
    generators = generators if generators is not None else [None] * b
    u = torch.stack([torch.rand((), generator=g, dtype=torch.float64) for g in generators]).to(device)
    if any(g is None for g in generators):
        dist.broadcast(u, src=dist.get_global_rank(group, 0), group=group)
    return u


def _inverse_cdf_vocab_parallel(weights: torch.Tensor, u: torch.Tensor, vocab_start: int,
                                group) -> torch.Tensor:
    """``inverse_cdf_sample`` over the concatenated shards: the first global index whose
    float64 cumulative weight exceeds u * total. Every rank computes the same shard ends
    E_r = E_{r-1} + W_r from the gathered shard totals; the owner is the first rank with
    E_r > u * E_last (else, by rounding, the last rank with weight, which then returns its
    last positive entry); it searches E_{r-1} + its local cumsum, and an all-reduce shares
    the token."""
    cdf = weights.double().cumsum(-1)
    totals = _all_gather(cdf[:, -1], group)  # (tp, b)
    ends, running = [], torch.zeros_like(totals[0])
    for total in totals:  # explicit order: the owner's E_{r-1} + cdf[-1] is exactly E_r
        running = running + total
        ends.append(running)
    ends = torch.stack(ends)
    target = u * ends[-1]
    holds = ends > target[None]
    last_with_weight = totals.shape[0] - 1 - (totals > 0).flip(0).int().argmax(0)
    owner = torch.where(holds.any(0), holds.int().argmax(0), last_with_weight)
    rank = dist.get_rank(group)
    offset = ends[rank - 1] if rank > 0 else torch.zeros_like(target)
    idx = torch.searchsorted(offset[:, None] + cdf, target[:, None], right=True)[:, 0]
    positive = weights > 0
    last_positive = weights.shape[-1] - 1 - positive.flip(-1).int().argmax(-1)
    idx = torch.minimum(idx, last_positive)
    mine = torch.where(owner == rank, idx + vocab_start, torch.zeros_like(idx))
    return _all_reduce(mine, dist.ReduceOp.SUM, group)


def _owned_logit(logits: torch.Tensor, tokens: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    """Each row's token logit, from the one rank whose shard holds the token (others add 0)."""
    local = tokens - vocab_start
    owned = (local >= 0) & (local < logits.shape[-1])
    values = logits.gather(-1, local.clamp(0, logits.shape[-1] - 1)[:, None])[:, 0]
    return _all_reduce(torch.where(owned, values, torch.zeros_like(values)), dist.ReduceOp.SUM, group)
