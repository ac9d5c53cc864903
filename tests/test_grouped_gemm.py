"""Grouped GEMM (kernels/grouped_gemm.py) under the Triton interpreter: y, dx and dW against a
float64 loop of one matmul per group, for the routings an MoE layer meets (empty groups, one
row, every row in one group, no rows at all), and the MoE layer with it against the loop."""

from __future__ import annotations

import pytest
import torch

from megatron_k15.kernels import grouped_gemm as gg
from megatron_k15.kernels.grouped_gemm import grouped_linear

pytestmark = pytest.mark.skipif(not gg.grouped_gemm_available(torch.device("cuda" if torch.cuda.is_available()
                                                                            else "cpu")),
                                reason="the grouped GEMM kernels need CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# |got - fp64| <= TOL * max |fp64| per tensor: fp32 accumulation; 16-bit outputs rounded once
# (the interpreter's bf16 cast truncates: up to one bf16 ulp, 2**-7 relative)
TOL = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def _reference(x, w, counts, dy):
    """float64 loop: y_g = x_g w_g^T, dx_g = dy_g w_g, dW_g = dy_g^T x_g."""
    x64, w64, dy64 = x.double(), w.double(), dy.double()
    ys, dxs, dws, start = [], [], [], 0
    for g, n in enumerate(counts):
        xs, dys = x64[start:start + n], dy64[start:start + n]
        ys.append(xs @ w64[g].T)
        dxs.append(dys @ w64[g])
        dws.append(dys.T @ xs)
        start += n
    return torch.cat(ys), torch.cat(dxs), torch.stack(dws)


def _check(got, want, dtype, what):
    scale = max(float(want.abs().max()), 1e-30)
    err = float((got.detach().double() - want).abs().max())
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]:.3g} x {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("counts, k, m", [
    ([5, 0, 70, 1, 16, 0], 48, 40),  # empty groups, one-row group, groups of 1-3 row tiles (32 rows)
    ([0, 0, 33], 16, 8),             # every row in the last group; k and m at one tile or less
    ([1], 96, 72),                   # one row, one group; k in 2 steps (64) with a ragged tail
    ([7, 9, 0, 0, 0, 0, 0, 2], 40, 33),  # eight groups, most empty; odd widths
])
def test_matches_float64_loop(dtype, counts, k, m):
    g = torch.Generator().manual_seed(sum(counts) + k)
    x = torch.randn(sum(counts), k, generator=g).to(dtype).to(DEVICE).requires_grad_()
    w = (torch.randn(len(counts), m, k, generator=g) / k ** 0.5).to(dtype).to(DEVICE).requires_grad_()
    dy = torch.randn(sum(counts), m, generator=g).to(dtype).to(DEVICE)
    ends = torch.tensor(counts, device=DEVICE).cumsum(0)
    y = grouped_linear(x, w, ends, impl="triton")
    y.backward(dy)
    assert y.dtype == dtype and x.grad.dtype == dtype and w.grad.dtype == dtype
    ref_y, ref_dx, ref_dw = _reference(x.detach().cpu(), w.detach().cpu(), counts, dy.cpu())
    _check(y.cpu(), ref_y, dtype, "y")
    _check(x.grad.cpu(), ref_dx, dtype, "dx")
    _check(w.grad.cpu(), ref_dw, dtype, "dW")
    for e, n in enumerate(counts):  # a group without rows gets an exact zero gradient
        if n == 0:
            assert not w.grad[e].any()


def test_no_rows_still_gives_weight_gradient():
    """Expert parallelism: a rank whose experts received no rows still runs them, so its
    backward reaches the weights (zeros) and joins the other ranks' collectives."""
    x = torch.zeros(0, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(3, 4, 8, device=DEVICE, requires_grad=True)
    y = grouped_linear(x, w, torch.zeros(3, dtype=torch.int64, device=DEVICE), impl="triton")
    assert y.shape == (0, 4) and y.requires_grad
    y.sum().backward()
    assert w.grad is not None and not w.grad.any() and x.grad.shape == (0, 8)


def test_strided_operands_and_reference_impl():
    """A non-contiguous input (a column slice, as the MoE's up/gate chunks are) and a weight
    seen through a transpose give, forward and backward, what contiguous copies give through
    impl="torch" (the loop)."""
    g = torch.Generator().manual_seed(5)
    wide = torch.randn(20, 64, generator=g).to(DEVICE)
    base = torch.randn(2, 32, 24, generator=g).to(DEVICE)
    dy = torch.randn(20, 24, generator=g).to(DEVICE)
    ends = torch.tensor([12, 20], device=DEVICE)
    results = []
    for impl in ("triton", "torch"):
        w = base.clone().requires_grad_()
        x = wide.clone().requires_grad_()
        xs, w_t = x[:, 16:48], w.transpose(1, 2)  # (20, 32) and (2, 24, 32), both strided
        if impl == "torch":
            xs, w_t = xs.contiguous(), w_t.contiguous()
        grouped_linear(xs, w_t, ends, impl=impl).backward(dy)
        results.append((x.grad, w.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_named():
    x, w = torch.randn(4, 8), torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"x \(N, K\) and weight \(G, M, K\)"):
        grouped_linear(x, torch.randn(2, 3, 7), torch.tensor([2, 4]))
    with pytest.raises(ValueError, match="one group end per weight"):
        grouped_linear(x, w, torch.tensor([4]))
    with pytest.raises(ValueError, match="stop at row 3, x has 4 rows"):
        grouped_linear(x, w, torch.tensor([1, 3]), impl="torch")
    with pytest.raises(ValueError, match="one dtype"):
        grouped_linear(x, w.double(), torch.tensor([2, 4]), impl="triton")
    for short_or_long in ([1, 3], [2, 5]):  # rows left unwritten, or read past x's end
        with pytest.raises(RuntimeError, match="must stop at x's last row"):
            grouped_linear(x.to(DEVICE), w.to(DEVICE), torch.tensor(short_or_long, device=DEVICE), impl="triton")


def test_moe_layer_with_grouped_gemm_equals_the_loop():
    """A two-layer MoE model built from the flags (``--moe-grouped-gemm`` / the default, which
    on CPU tensors is the per-expert loop): logits and every gradient equal (fp32), with
    routing that leaves some of the 8 experts without tokens."""
    from megatron_k15.arguments import build_parser, validate_args
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.training import ParallelContext, build_stage_model, stage_layer_ranges

    initialize_model_parallel(1)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(7))
    results = []
    for flag in ([], ["--moe-grouped-gemm"]):
        args = build_parser(groups=("model", "parallel", "precision")).parse_args(
            ["--model-preset", "tiny", "--num-layers", "2", "--num-experts", "8", "--moe-router-topk", "2",
             "--moe-ffn-hidden-size", "40", "--init-method-std", "0.2", "--attention-backend", "sdpa", *flag])
        validate_args(args, world_size=1)
        cfg = args.model_config
        model = build_stage_model(args, cfg, ParallelContext.from_parallel_state(), stage_layer_ranges(cfg, 1))
        model.reset_parameters(3)
        model.train()
        want = True if flag else None  # None: by device, the loop on CPU tensors
        assert model.moe_grouped_gemm is want and all(m.grouped_gemm is want for m in model.moe_layers())
        logits = model(ids)
        logits.float().pow(2).mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (ref_logits, ref_grads), (logits, grads) = results
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():  # fp32 sums in other orders: ~1e-6 of the largest
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=4e-6 * float(ref_grads[name].abs().max()),
                                   msg=name)
