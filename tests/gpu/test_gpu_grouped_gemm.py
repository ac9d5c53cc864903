"""MoE grouped GEMM (kernels/grouped_gemm.py) at Qwen3-30B-A3B's expert shapes (hidden 2048,
expert ffn 768: fc1 2048 -> 1536, 128 experts), bf16 and fp16, against an fp32 loop of one
matmul per expert (TF32 off).

Two routings: "train" (8K tokens x top-8 = 64K rows, skewed: expert e gets a share ~ 1 / (e + 1),
16 experts get none) and "decode" (64 tokens x top-8 = 512 rows: most experts get 0-8 rows).
Tolerances: y, max abs error; dx and dW, the row-relative error (``gpu_refs.row_err``); each at
most 2 x that of PyTorch's own per-expert ``F.linear`` loop in the same dtype + the slack of
``low_precision_bound``. Experts without rows must get an exactly zero weight gradient.
"""

from __future__ import annotations

import pytest
import torch

from gpu_refs import DEVICE, amax, gpu_marks, low_precision_bound, max_err, real_or_tiny, row_err

pytestmark = gpu_marks()

H, F2, E = real_or_tiny((2048, 1536, 128), (64, 48, 8))
ROWS = {"train": real_or_tiny(65536, 200), "decode": real_or_tiny(512, 24)}


def _counts(rows: int, routing: str, gen) -> torch.Tensor:
    if routing == "train":  # skewed, the last eighth of the experts empty
        share = 1.0 / torch.arange(1, E + 1, dtype=torch.float64)
        share[E - E // 8:] = 0
    else:
        share = torch.rand(E, generator=gen, dtype=torch.float64)
    counts = torch.floor(share / share.sum() * rows).long()
    counts[0] += rows - counts.sum()
    return counts


def _loop(x, w, counts, dy):
    """y, dx, dW of the per-expert loop, in x's dtype (autograd through F.linear)."""
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = torch.cat([torch.nn.functional.linear(xs, w[e]) for e, xs in enumerate(x.split(counts.tolist()))])
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y.detach(), dx, dw


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("routing", ["train", "decode"])
def test_grouped_gemm_qwen3_moe_experts(dtype, routing, check):
    from megatron_k15.kernels.grouped_gemm import grouped_linear

    gen = torch.Generator().manual_seed(5)
    counts = _counts(ROWS[routing], routing, gen)
    n = int(counts.sum())
    x32 = torch.randn(n, H, generator=gen).to(DEVICE)
    w32 = (torch.randn(E, F2, H, generator=gen) / H ** 0.5).to(DEVICE)
    dy32 = torch.randn(n, F2, generator=gen).to(DEVICE)
    x, w, dy = x32.to(dtype), w32.to(dtype), dy32.to(dtype)

    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = grouped_linear(xg, wg, counts.to(DEVICE).cumsum(0), impl="triton")
    dx, dw = torch.autograd.grad(y, (xg, wg), dy)
    assert y.dtype == dx.dtype == dw.dtype == dtype

    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:  # the reference: the same rounded inputs, fp32 math
        ref = _loop(x.float(), w.float(), counts, dy.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    lowp = _loop(x, w, counts, dy)

    check("y", max_err(y, ref[0]), low_precision_bound(max_err(lowp[0], ref[0]), amax(ref[0]), dtype))
    for name, ours, lo, r in (("dx", dx, lowp[1], ref[1]), ("dW", dw, lowp[2], ref[2])):
        check(f"{name} (row-relative)", row_err(ours, r), low_precision_bound(row_err(lo, r), 1.0, dtype, grad=True))
    empty = (counts == 0).nonzero().flatten().tolist()
    check("dW of experts without rows", float(dw[empty].abs().max()) if empty else 0.0, 0.0)
    check.done()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_every_autotune_candidate(dtype, check):
    """Each Hopper candidate config of both kernels, launched directly (the autotuner runs only
    its winner): forward, dX (transposed weight) and dW against the fp32 loop, skewed routing
    with empty experts and groups that end mid-tile. Bound: |err| <= 2 ulp of the dtype x the
    reference's largest value x sqrt(K) (fp32 accumulation of K products, rounded once)."""
    from megatron_k15.kernels import grouped_gemm as gg

    h, f2, e = real_or_tiny((1024, 768, 16), (48, 40, 4))
    gen = torch.Generator().manual_seed(9)
    counts = torch.tensor(real_or_tiny([0, 2000, 1, 3999] + [0] * 11 + [77], [0, 37, 1, 52]))
    n = int(counts.sum())
    x = torch.randn(n, h, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(e, f2, h, generator=gen) / h ** 0.5).to(DEVICE, dtype)
    dy = torch.randn(n, f2, generator=gen).to(DEVICE, dtype)
    ends = counts.to(DEVICE).cumsum(0)
    starts = ends - counts.to(DEVICE)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = _loop(x.float(), w.float(), counts, dy.float())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    ulp = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 2 ** -22}[dtype]
    kind = "ieee" if dtype == torch.float32 else "tc"
    for spec in gg._HOPPER_GEMM[kind]:
        name = "x".join(map(str, spec))
        y = gg._gemm(x, (w.stride(0), w.stride(1), w.stride(2)), w, ends, f2, h, config=spec)
        dx = gg._gemm(dy, (w.stride(0), w.stride(2), w.stride(1)), w, ends, h, f2, config=spec)
        check(f"y {name}", max_err(y, ref[0]), 2 * ulp * amax(ref[0]) * h ** 0.5)
        check(f"dx {name}", max_err(dx, ref[1]), 2 * ulp * amax(ref[1]) * f2 ** 0.5)
    for spec in gg._HOPPER_WGRAD[kind]:
        dw = gg._wgrad(dy, x, starts, ends, tuple(w.shape), dtype, config=spec)
        check(f"dW {'x'.join(map(str, spec))}", max_err(dw, ref[2]), 2 * ulp * amax(ref[2]) * n ** 0.5)
    check.done()
