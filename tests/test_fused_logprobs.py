"""fused_logprobs vs log_softmax + gather: values and gradients, tp=1 and tp=2 (gloo)."""

import pytest
import torch

from megatron_k15.kernels import fused_logprobs as fl
from megatron_k15.kernels.fused_logprobs import fused_logprobs, fused_logprobs_torch, reference_logprobs
from megatron_k15.testing import run_distributed

IMPLS = ["torch"] + (["triton"] if fl.HAVE_TRITON else [])


def _problem(N=37, H=40, V=101, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = (0.5 * torch.randn(V, H, generator=g)).to(dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    g_logp = torch.randn(N, generator=g)
    g_ent = torch.randn(N, generator=g)
    return hidden, weight, targets, g_logp, g_ent


def _reference(hidden, weight, targets, g_logp, g_ent):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent = reference_logprobs(h, w, targets, return_entropy=True)
    ((logp * g_logp).sum() + (ent * g_ent).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def _fused(hidden, weight, targets, g_logp, g_ent, impl, tp_group=None, entropy=True, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fused_logprobs(h, w, targets, tp_group=tp_group, return_entropy=entropy, impl=impl, **kw)
    if entropy:
        logp, ent = out
        loss = (logp * g_logp).sum() + (ent * g_ent).sum()
    else:
        logp, ent = out, None
        loss = (logp * g_logp).sum()
    loss.backward()
    return logp.detach(), (ent.detach() if ent is not None else None), h.grad, w.grad


@pytest.mark.parametrize("impl", IMPLS)
def test_values_and_grads_tp1(impl):
    prob = _problem()
    ref = _reference(*prob)
    # small chunks so the backward loops over several token and vocab chunks (and a ragged tail)
    got = _fused(*prob, impl=impl, chunk_tokens=16, chunk_vocab=32)
    for name, a, b in zip(["logp", "entropy", "d_hidden", "d_weight"], got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)
    assert got[0].dtype == torch.float32 and got[0].shape == (37,)


@pytest.mark.parametrize("impl", IMPLS)
def test_softcapped_logits(impl):
    """Gemma 2's final soft cap (z -> cap * tanh(z / cap)): log-probs, entropy and both
    gradients against autograd through the explicit formula, with a cap that binds."""
    hidden, weight, targets, g_logp, g_ent = _problem()
    hidden = hidden * 3  # logits of O(10): the cap of 2 changes them by O(1)
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    z = 2.0 * torch.tanh((h @ w.t()) / 2.0)
    logsm = torch.log_softmax(z, -1)
    ref_logp = logsm.gather(1, targets[:, None])[:, 0]
    ref_ent = -(logsm.exp() * logsm).sum(-1)
    ((ref_logp * g_logp.double()).sum() + (ref_ent * g_ent.double()).sum()).backward()
    got = _fused(hidden, weight, targets, g_logp, g_ent, impl=impl, chunk_tokens=16, chunk_vocab=32, softcap=2.0)
    for name, a, b in zip(["logp", "entropy", "d_hidden", "d_weight"], got, (ref_logp, ref_ent, h.grad, w.grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=name)
    assert (reference_logprobs(hidden, weight, targets) - got[0]).abs().max() > 0.5  # the cap binds
    assert torch.allclose(reference_logprobs(hidden, weight, targets, softcap=2.0), got[0], atol=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_logp_only_gradient(impl):
    hidden, weight, targets, g_logp, _ = _problem(N=20, H=24, V=70, seed=1)
    ref = _reference(hidden, weight, targets, g_logp, torch.zeros(20))
    logp, ent, dh, dw = _fused(hidden, weight, targets, g_logp, None, impl=impl, entropy=False)
    assert ent is None
    torch.testing.assert_close(logp, ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dh, ref[2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw, ref[3], rtol=1e-4, atol=1e-4)


def test_large_logits_are_stable():
    # logits of order 1e3 overflow a naive exp; the online logsumexp must not
    hidden, weight, targets, g_logp, g_ent = _problem(N=8, H=16, V=50, seed=2)
    hidden = hidden * 200.0
    ref = _reference(hidden, weight, targets, g_logp, g_ent)
    for impl in IMPLS:
        got = _fused(hidden, weight, targets, g_logp, g_ent, impl=impl, chunk_vocab=16)
        assert torch.isfinite(got[0]).all()
        torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-3)


def test_bf16_inputs():
    hidden, weight, targets, g_logp, g_ent = _problem(N=16, H=32, V=64, seed=3, dtype=torch.bfloat16)
    ref = _reference(hidden.float(), weight.float(), targets, g_logp, g_ent)
    for impl in IMPLS:
        logp, ent, dh, dw = _fused(hidden, weight, targets, g_logp, g_ent, impl=impl)
        assert logp.dtype == torch.float32 and dh.dtype == torch.bfloat16 and dw.dtype == torch.bfloat16
        torch.testing.assert_close(logp, ref[0], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(dh.float(), ref[2], rtol=5e-2, atol=5e-2)


def test_torch_fallback_alias_and_no_grad():
    hidden, weight, targets, _, _ = _problem(N=10, H=8, V=30, seed=4)
    with torch.no_grad():
        a = fused_logprobs_torch(hidden, weight, targets)
    torch.testing.assert_close(a, reference_logprobs(hidden, weight, targets), rtol=1e-5, atol=1e-5)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        fused_logprobs(torch.zeros(4, 8), torch.zeros(10, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        fused_logprobs(torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(5, dtype=torch.long))


def _tp_worker(rank, world_size, impls):
    group = torch.distributed.group.WORLD
    hidden, weight, targets, g_logp, g_ent = _problem(N=19, H=24, V=2 * 37, seed=5)
    v_local = weight.shape[0] // world_size
    shard = weight[rank * v_local:(rank + 1) * v_local].contiguous()
    out = {}
    for impl in impls:
        out[impl] = _fused(hidden, shard, targets, g_logp, g_ent, impl=impl, tp_group=group,
                           chunk_tokens=8, chunk_vocab=16)
        # the caller-side reduction option leaves d_hidden partial
        out[impl + "_partial_dh"] = _fused(hidden, shard, targets, g_logp, g_ent, impl=impl,
                                           tp_group=group, reduce_hidden_grad=False)[2]
    return out


@pytest.mark.slow
def test_tp2_matches_unsharded():
    world = 2
    results = run_distributed(_tp_worker, world, IMPLS)
    hidden, weight, targets, g_logp, g_ent = _problem(N=19, H=24, V=2 * 37, seed=5)
    ref_logp, ref_ent, ref_dh, ref_dw = _reference(hidden, weight, targets, g_logp, g_ent)
    v_local = weight.shape[0] // world
    for impl in IMPLS:
        # every target lands on one rank or the other (both shards own some targets)
        owners = set((targets // v_local).tolist())
        assert owners == {0, 1}
        for rank, res in enumerate(results):
            logp, ent, dh, dw = res[impl]
            torch.testing.assert_close(logp, ref_logp, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ent, ref_ent, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(dh, ref_dh, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(dw, ref_dw[rank * v_local:(rank + 1) * v_local], rtol=1e-4, atol=1e-4)
        partial = results[0][impl + "_partial_dh"] + results[1][impl + "_partial_dh"]
        torch.testing.assert_close(partial, ref_dh, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(results[0][impl + "_partial_dh"], ref_dh, atol=1e-3)
