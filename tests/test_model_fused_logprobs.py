"""--logprob-impl fused (the chunked kernel) equals vocab-parallel cross-entropy in the model:
log-probs and every gradient, with vocabulary padding, at tp=1 and at tp=2 with SP."""

import copy

import pytest
import torch

from megatron_k15.models.config import preset
from megatron_k15.testing import run_distributed


def _compare(tp):
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.gpt import GPTModel

    initialize_model_parallel(tp)
    torch.manual_seed(0)
    cfg = preset("tiny", num_layers=2, init_method_std=0.3, make_vocab_size_divisible_by=64)
    ce = GPTModel(cfg, attention_backend="sdpa", logprob_impl="ce")
    ce.reset_parameters(3)
    fused = GPTModel(cfg, attention_backend="sdpa", logprob_impl="fused")
    fused.load_state_dict(copy.deepcopy(ce.state_dict()))
    assert ce.padded_vocab_size > cfg.vocab_size  # padding rows exist
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=gen)
    labels = torch.roll(ids, -1, dims=1)
    weights = torch.randn(2, 24, generator=gen)
    out = {}
    for name, model in (("ce", ce), ("fused", fused)):
        logp = model(ids, labels=labels)
        (weights * logp).sum().backward()
        from megatron_k15.parallel.tensor import allreduce_sequence_parallel_grads

        allreduce_sequence_parallel_grads(model, model.tp_group)
        out[name] = (logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    return out


def fused_worker(rank, world_size):
    return _compare(world_size)


@pytest.mark.parametrize("tp", [1, 2])
def test_fused_logprobs_equal_cross_entropy(tp):
    results = [_compare(1)] if tp == 1 else run_distributed(fused_worker, 2)
    for out in results:
        (lp_ce, g_ce), (lp_f, g_f) = out["ce"], out["fused"]
        assert (lp_ce - lp_f).abs().max() <= 1e-5
        for name, g in g_ce.items():
            scale = max(1.0, g.abs().max().item())
            assert (g - g_f[name]).abs().max() <= 1e-5 * scale, name
