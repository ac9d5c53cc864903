"""Token sampling: inverse-CDF draws follow the (filtered, tempered) distribution, never pick a
filtered-out token, and a row's token depends only on its logits and its generator."""

import math

import pytest
import torch

from megatron_k15.generation.sampling import (SamplingParams, filter_logits, inverse_cdf_sample,
                                              request_generator, sample_tokens,
                                              sample_tokens_vocab_parallel)
from megatron_k15.testing import run_distributed


def test_draws_follow_the_tempered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    params = SamplingParams(temperature=0.7)
    want = torch.softmax(logits / 0.7, -1)[0]
    gen = request_generator(0, 0)
    n = 20000
    counts = torch.zeros(5)
    for _ in range(n):
        tok, logp = sample_tokens(logits, params, [gen])
        counts[tok] += 1
    # log-prob recorded under the untempered model
    assert math.isclose(float(logp), float(torch.log_softmax(logits, -1)[0, tok]), rel_tol=1e-6)
    assert counts[4] == 0
    # each count within 5 standard deviations of its binomial mean
    sd = (n * want * (1 - want)).sqrt()
    assert ((counts - n * want).abs() <= 5 * sd + 1).all(), (counts / n, want)


def test_filtered_tokens_are_never_drawn_even_at_the_cdf_edges():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0, 0.0]])
    for u in (0.0, 1e-18, 0.4999999, 0.5, 0.9999999999999999):
        toks = inverse_cdf_sample(probs, torch.tensor([u, u], dtype=torch.float64))
        assert probs[0, toks[0]] > 0 and toks[1] == 2
    assert inverse_cdf_sample(probs[:1], torch.tensor([0.25], dtype=torch.float64)).item() == 1
    assert inverse_cdf_sample(probs[:1], torch.tensor([0.75], dtype=torch.float64)).item() == 3
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    kept = filter_logits(logits, top_k=5, top_p=0.8) > float("-inf")
    gens = [request_generator(1, i) for i in range(3)]
    for _ in range(200):
        toks, _ = sample_tokens(logits, SamplingParams(1.0, top_p=0.8, top_k=5), gens)
        assert kept[torch.arange(3), toks].all()


def test_a_rows_token_depends_only_on_its_logits_and_generator():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=1.0)
    batch, _ = sample_tokens(logits, params, [request_generator(9, i) for i in range(6)])
    for i in range(6):
        alone, _ = sample_tokens(logits[i:i + 1], params, [request_generator(9, i)])
        assert alone.item() == batch[i].item()


def test_top_p_ties_at_the_cut_keep_the_lowest_indices():
    # ten equal tokens hold (almost) all the mass; top_p 0.35: masses before them are 0, .1,
    # .2, .3 (kept), .4 (dropped). An unstable sort (CPU's, at this width) keeps others.
    logits = torch.zeros(1, 97)
    logits[0, 46:56] = 10.0
    kept = filter_logits(logits, top_p=0.35)[0] > float("-inf")
    assert kept.nonzero()[:, 0].tolist() == [46, 47, 48, 49]


# -- vocabulary-parallel sampling: same tokens as sample_tokens on the gathered logits ----------
VP_DRAWS = 4
VP_SEED = 7


def _vocab_parallel_cases():
    """(name, full logits (b, V), params, extra kwargs): each row is drawn VP_DRAWS times."""
    g = torch.Generator().manual_seed(0)
    b, V = 8, 97

    def randn(*shape, scale=2.0):
        return torch.randn(*shape, generator=g) * scale

    normal = randn(b, V)
    integer = randn(b, V).round()  # many exact ties, also at top-k / top-p cut-offs
    integer[0, [3, 60, 90]] = integer[0].max() + 1  # a max tied across shards (all tp sizes)
    integer[1, :] = 0.0  # all tied
    integer[2, [95, 96]] = integer[2].max() + 1  # tie in the last (padded) shard
    peaked = randn(b, V)
    peaked[torch.arange(b), torch.arange(b) * 11] += 20.0  # top-p keeps one token
    flat = randn(b, 1000, scale=0.01)  # top-p keeps ~900 of 1000: candidate lists double
    ten_equal = torch.zeros(b, V)
    for row, first in enumerate([46, 30, 0, 87, 60, 62, 10, 20]):  # across shard boundaries
        ten_equal[row, first:first + 10] = 10.0  # top-p 0.35 keeps the 4 lowest ids of the 10
    tiny = randn(b, 4)  # at tp=3 the last shard is all padding
    return [
        ("greedy", normal, SamplingParams(temperature=0.0), {}),
        ("greedy ties", integer, SamplingParams(temperature=0.0), {}),
        ("temperature 0.7", normal, SamplingParams(temperature=0.7), {}),
        ("top-k 5", normal, SamplingParams(temperature=1.0, top_k=5), {}),
        ("top-k 5 ties", integer, SamplingParams(temperature=1.0, top_k=5), {}),
        ("top-p 0.9", normal, SamplingParams(temperature=1.0, top_p=0.9), {}),
        ("top-p 0.9 ties, C from 2", integer, SamplingParams(temperature=1.0, top_p=0.9),
         {"initial_candidates": 2}),
        ("top-k 5 + top-p 0.8", normal, SamplingParams(temperature=0.8, top_k=5, top_p=0.8), {}),
        ("top-k 20 + top-p 0.7 ties", integer,
         SamplingParams(temperature=1.3, top_k=20, top_p=0.7), {"initial_candidates": 3}),
        ("peaked top-p", peaked, SamplingParams(temperature=1.0, top_p=0.9), {}),
        ("flat top-p", flat, SamplingParams(temperature=1.0, top_p=0.9), {}),
        ("ten equal top-p", ten_equal, SamplingParams(temperature=1.0, top_p=0.35),
         {"initial_candidates": 1}),
        ("tiny vocab", tiny, SamplingParams(temperature=1.0), {}),
        ("tiny vocab greedy", tiny, SamplingParams(temperature=0.0), {}),
    ]


def _vocab_shard(full: torch.Tensor, rank: int, world_size: int):
    """This rank's columns of the vocabulary padded to world_size * ceil(V / world_size), the
    padding filled with large finite garbage that would win if it were not masked."""
    b, V = full.shape
    v_local = -(-V // world_size)
    padded = torch.randn(b, v_local * world_size, generator=torch.Generator().manual_seed(rank))
    padded = padded * 10 + 100
    padded[:, :V] = full
    return padded[:, rank * v_local:(rank + 1) * v_local].contiguous(), rank * v_local


def _sample_on_group(group):
    rank, world_size = group.rank(), group.size()
    out = []
    for _, full, params, kwargs in _vocab_parallel_cases():
        shard, start = _vocab_shard(full, rank, world_size)
        gens = [request_generator(VP_SEED, i) for i in range(full.shape[0])]
        out.append([sample_tokens_vocab_parallel(shard, params, gens, group, start, full.shape[1],
                                                 **kwargs) for _ in range(VP_DRAWS)])
    # no generators: the global RNG, seeded differently per rank; the group's first rank's
    # draws are used
    _, full, _, _ = _vocab_parallel_cases()[2]
    shard, start = _vocab_shard(full, rank, world_size)
    torch.manual_seed(1234 if rank == 0 else 99 + rank)
    out.append(sample_tokens_vocab_parallel(shard, SamplingParams(temperature=1.0), None, group,
                                            start, full.shape[1]))
    return out


def _sample_vocab_parallel_on_ranks(rank, world_size):
    """tp=3 on all ranks, then tp=2 on global ranks 1 and 2 (group rank != global rank)."""
    tp3 = _sample_on_group(torch.distributed.group.WORLD)
    pair = torch.distributed.new_group([1, 2])
    tp2 = _sample_on_group(pair) if rank in (1, 2) else None
    return {3: tp3, 2: tp2}


@pytest.mark.slow
def test_vocab_parallel_sampling_matches_full_logits():
    results = run_distributed(_sample_vocab_parallel_on_ranks, 3)
    cases = _vocab_parallel_cases()
    for tp, ranks in ((3, [0, 1, 2]), (2, [1, 2])):
        for c, (name, full, params, _) in enumerate(cases):
            gens = [request_generator(VP_SEED, i) for i in range(full.shape[0])]
            for draw in range(VP_DRAWS):
                want_tokens, want_logprobs = sample_tokens(full, params, gens)
                for rank in ranks:
                    tokens, logprobs = results[rank][tp][c][draw]
                    where = f"tp={tp}, {name}, draw {draw}, rank {rank}"
                    assert tokens.dtype == torch.int64 and logprobs.dtype == torch.float32
                    assert torch.equal(tokens, want_tokens), (where, tokens, want_tokens)
                    torch.testing.assert_close(logprobs, want_logprobs, rtol=1e-6, atol=1e-6,
                                               msg=where)
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            want_tokens, want_logprobs = sample_tokens(cases[2][1], SamplingParams(temperature=1.0))
        for rank in ranks:
            assert torch.equal(results[rank][tp][-1][0], want_tokens), (tp, rank)
            torch.testing.assert_close(results[rank][tp][-1][1], want_logprobs, rtol=1e-6, atol=1e-6)


def test_vocab_parallel_without_a_group_is_sample_tokens():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    padded = torch.cat([logits, torch.full((4, 2), 1e4)], dim=-1)
    params = SamplingParams(temperature=0.9, top_k=10, top_p=0.8)
    got = sample_tokens_vocab_parallel(padded, params, [request_generator(3, i) for i in range(4)],
                                       None, 0, 30)
    want = sample_tokens(logits, params, [request_generator(3, i) for i in range(4)])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
