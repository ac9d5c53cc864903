"""The optimizer's AdamW kernels (``parallel.adam``) against ``torch.optim.AdamW``: weight decay
on matrices only, gradient clipping by the global norm, several steps."""

import pytest
import torch

from megatron_k15.parallel.adam import ADAM_IMPLS, apex_available, resolve_adam_impl
from megatron_k15.parallel.data import DistributedOptimizer

IMPLS = ["unfused", "fused"] + (["apex"] if torch.cuda.is_available() and apex_available() else [])


def _params(device):
    gen = torch.Generator().manual_seed(0)
    shapes = {"norm.weight": (7,), "linear.weight": (5, 7), "linear.bias": (5,), "head.weight": (3, 5)}
    return {n: torch.randn(s, generator=gen).to(device) for n, s in shapes.items()}


def _grads(step, params):
    gen = torch.Generator().manual_seed(100 + step)
    return {n: 3.0 * torch.randn(p.shape, generator=gen).to(p.device) for n, p in params.items()}


@pytest.mark.parametrize("impl", IMPLS)
def test_adamw_kernels_equal_torch_adamw(impl):
    device = torch.device("cuda" if impl == "apex" else "cpu")
    lr, wd, betas, eps, clip = 0.01, 0.1, (0.9, 0.95), 1e-8, 1.0
    ours = {n: torch.nn.Parameter(p.clone()) for n, p in _params(device).items()}
    ref = {n: torch.nn.Parameter(p.clone()) for n, p in _params(device).items()}
    # small buckets: the decay ranges fall inside buckets and across them
    opt = DistributedOptimizer(list(ours.items()), lr=lr, weight_decay=wd, betas=betas, eps=eps,
                               clip_grad=clip, bucket_numel=40, overlap=False, adam_impl=impl)
    assert opt.adam_impl == impl
    torch_opt = torch.optim.AdamW([
        {"params": [p for p in ref.values() if p.dim() > 1], "weight_decay": wd},
        {"params": [p for p in ref.values() if p.dim() <= 1], "weight_decay": 0.0},
    ], lr=lr, betas=betas, eps=eps)
    for step in range(5):
        grads = _grads(step, ours)
        opt.zero_grad()
        opt.prepare_for_backward(True)
        for n, p in ours.items():
            p.grad.copy_(grads[n])
        opt.finish_grad_sync()
        norm = opt.step()
        for n, p in ref.items():
            p.grad = grads[n].clone()
        ref_norm = torch.nn.utils.clip_grad_norm_(list(ref.values()), clip)
        torch_opt.step()
        assert abs(norm - float(ref_norm)) <= 1e-5 * float(ref_norm)
        for n in ours:
            assert torch.allclose(ours[n].data, ref[n].data, rtol=1e-5, atol=1e-6), (step, n)


def test_a_non_finite_gradient_skips_the_update():
    """NaN (or inf) anywhere in the gradient: no weight, moment or step count changes, and the
    next finite step is the one a fresh optimizer would take."""
    import math

    params = {n: torch.nn.Parameter(p.clone()) for n, p in _params("cpu").items()}
    fresh = {n: torch.nn.Parameter(p.clone()) for n, p in _params("cpu").items()}
    opt = DistributedOptimizer(list(params.items()), lr=0.01, clip_grad=1.0, bucket_numel=40, overlap=False)
    ref = DistributedOptimizer(list(fresh.items()), lr=0.01, clip_grad=1.0, bucket_numel=40, overlap=False)

    def step(o, ps, grads):
        o.zero_grad()
        o.prepare_for_backward(True)
        for n, p in ps.items():
            p.grad.copy_(grads[n])
        o.finish_grad_sync()
        return o.step()

    before = {n: p.detach().clone() for n, p in params.items()}
    for bad in (float("nan"), float("inf")):
        grads = _grads(0, params)
        grads["linear.bias"][2] = bad
        assert not math.isfinite(step(opt, params, grads))
        assert all(torch.equal(params[n], before[n]) for n in params)
    assert opt.step_count == 0
    assert all(not m.any() for m in opt.exp_avg + opt.exp_avg_sq)
    assert step(opt, params, _grads(1, params)) == step(ref, fresh, _grads(1, fresh))
    assert all(torch.equal(params[n], fresh[n]) for n in params)


def test_resolve_adam_impl():
    assert resolve_adam_impl("unfused", torch.device("cpu")) == "unfused"
    assert resolve_adam_impl("auto", torch.device("cpu")) in ("fused", "unfused")
    with pytest.raises(ValueError, match="--adam-impl"):
        resolve_adam_impl("sgd", torch.device("cpu"))
    if not (torch.cuda.is_available() and apex_available()):
        with pytest.raises(ValueError, match="apex"):
            resolve_adam_impl("apex", torch.device("cpu"))
    assert set(IMPLS) <= set(ADAM_IMPLS)


@pytest.mark.parametrize("fp32_accumulation", [True, False])
def test_bf16_gradients_accumulate_over_microbatches_in_fp32(fp32_accumulation):
    """A bf16 model over 16 microbatches: with fp32 accumulation (the default, Megatron's
    --accumulate-allreduce-grads-in-fp32) the reduced gradient is exactly the fp32 sum of the
    microbatches' bf16 gradients and no bf16 .grad is left behind; with 16-bit buckets it is
    their sum rounded to bf16 after every addition, which is off by a visible amount."""
    gen = torch.Generator().manual_seed(3)
    w0 = torch.randn(32, 48, generator=gen)
    xs = [torch.randn(8, 48, generator=gen) * (1 + 10 * (i % 2)) for i in range(16)]  # uneven sizes
    w = torch.nn.Parameter(w0.to(torch.bfloat16))
    opt = DistributedOptimizer([("linear.weight", w)], lr=0.0, overlap=True,
                               fp32_grad_accumulation=fp32_accumulation)
    opt.zero_grad()
    per_microbatch = []
    for i, x in enumerate(xs):
        opt.prepare_for_backward(i == len(xs) - 1)
        loss = torch.nn.functional.linear(x.to(torch.bfloat16), w).float().pow(2).mean()
        per_microbatch.append(torch.autograd.grad(loss, w, retain_graph=True)[0])
        loss.backward()
    opt.finish_grad_sync()
    got = opt.buckets[0].shard_grad[:w.numel()].view_as(w)
    fp32_sum, bf16_sum = torch.zeros_like(w0), torch.zeros_like(w)
    for g in per_microbatch:
        fp32_sum += g.float()
        bf16_sum += g
    if fp32_accumulation:
        assert w.grad is None and w.main_grad.dtype == torch.float32
        assert torch.equal(got, fp32_sum)
    else:
        assert w.grad.dtype == torch.bfloat16
        assert torch.equal(got, bf16_sum.float())
    # the two differ by far more than one final bf16 rounding would explain (mean errors)
    assert (bf16_sum.float() - fp32_sum).abs().mean() > 2 * (fp32_sum.bfloat16().float() - fp32_sum).abs().mean()


def _dp2_bf16_worker(rank, world_size):
    """Rank r trains on microbatches r, r + 2, ...: the reduce-scatter (overlapped with the last
    backward) must carry every microbatch's bf16 gradient added in fp32."""
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(7)
    w0 = torch.randn(16, 24, generator=gen)
    b0 = torch.randn(16, generator=gen)
    xs = [torch.randn(6, 24, generator=gen) for _ in range(8)]
    w = torch.nn.Parameter(w0.to(torch.bfloat16))
    b = torch.nn.Parameter(b0.to(torch.bfloat16))
    opt = DistributedOptimizer([("linear.weight", w), ("linear.bias", b)], lr=0.0, overlap=True,
                               dp_group=dist.group.WORLD, bucket_numel=200)  # two buckets
    opt.zero_grad()
    mine = xs[rank::world_size]
    for i, x in enumerate(mine):
        opt.prepare_for_backward(i == len(mine) - 1)
        torch.nn.functional.linear(x.to(torch.bfloat16), w, b).float().pow(2).mean().backward()
    opt.finish_grad_sync()
    # every microbatch's gradient, as each rank would compute it, summed in fp32 in rank order
    want = {"linear.weight": torch.zeros(16, 24), "linear.bias": torch.zeros(16)}
    for x in xs:
        wr, br = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        gw, gb = torch.autograd.grad(torch.nn.functional.linear(x.to(torch.bfloat16), wr, br).float().pow(2).mean(),
                                     (wr, br))
        want["linear.weight"] += gw.float()
        want["linear.bias"] += gb.float()
    got = []
    for bucket in opt.buckets:
        full = torch.zeros(bucket.numel)
        dist.all_gather_into_tensor(full, bucket.shard_grad)
        got += [(n, full[off:off + p.numel()].view_as(p)) for n, p, off in bucket.params]
    return {n: (g, want[n]) for n, g in got}


@pytest.mark.slow
def test_bf16_fp32_accumulation_under_data_parallelism_with_overlap():
    """dp = 2, bf16 parameters, four microbatches per rank, buckets reduced as soon as the last
    backward completes them: each reduced gradient equals the fp32 sum of all eight
    microbatches' bf16 gradients (to fp32 summation order). Were the fp32 accumulation to run
    after a bucket's reduction is launched, the last microbatch would be missing (~1/4 off)."""
    from megatron_k15.testing import run_distributed

    for result in run_distributed(_dp2_bf16_worker, 2, timeout=120):
        for name, (got, want) in result.items():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=name)


def test_grad_num_zeros_counts_every_element_once():
    """--log-num-zeros-in-grad: the zeros of the gradient the step used (set by hand here: one
    whole parameter, a few scattered elements), each counted once however the buckets and shards
    cut the parameters; clipping keeps them."""
    params = {n: torch.nn.Parameter(p.clone()) for n, p in _params("cpu").items()}
    opt = DistributedOptimizer(list(params.items()), lr=0.01, clip_grad=1e-3, bucket_numel=40, overlap=False)
    grads = _grads(0, params)
    first = next(iter(grads))
    grads[first].zero_()
    grads["linear.bias"][:2] = 0.0
    want = sum(int((g == 0).sum()) for g in grads.values())
    assert want >= grads[first].numel() + 2
    opt.zero_grad()
    opt.prepare_for_backward(True)
    for n, p in params.items():
        p.grad.copy_(grads[n])
    opt.finish_grad_sync()
    assert opt.grad_num_zeros() == want
    opt.step()  # clipped hard: the zeros stay, nothing else becomes 0
    assert opt.grad_num_zeros() == want
