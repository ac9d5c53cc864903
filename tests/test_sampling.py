"""Token sampling: inverse-CDF draws follow the (filtered, tempered) distribution, never pick a
filtered-out token, and a row's token depends only on its logits and its generator."""

import math

import torch

from megatron_k15.generation.sampling import (SamplingParams, filter_logits, inverse_cdf_sample,
                                              request_generator, sample_tokens)


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
