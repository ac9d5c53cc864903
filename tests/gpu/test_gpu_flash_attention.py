"""Triton flash attention (``flash_attn_func``, ``flash_attn_varlen_func``) at real sizes, compiled,
bf16 and fp16, forward and backward, against a float64 reference computed in chunks.

Tolerances (against the float64 reference, ``gpu_refs.low_precision_bound``):
  out, dq, dk, dv: the row-relative error (``gpu_refs.row_err``: per token and head, max abs
  error / max abs reference value of that row) <= 2 x that of PyTorch's own SDPA in the same
  dtype (flash/cuDNN kernels, kv heads repeated) + 1e-2 (bf16) / 2e-3 (fp16) for out,
  + 5e-2 / 5e-3 for the gradients (``gpu_refs.GRAD_SLACK`` says why);
  lse (fp32 output): <= 1e-2 absolute.
Shapes share compiled variants with the other GPU stages where they can (head_dim 128 with GQA
4:1 as in the ring test; head_dim 64 with GQA 7:1 as Qwen2.5-0.5B in the model, generation,
RL and train_step runs), since every new (dtype, head_dim, causal, varlen) compiles ~24
autotune candidates.
"""

from __future__ import annotations

import pytest
import torch

from gpu_refs import (DEVICE, attention_reference_chunked, gpu_marks, low_precision_bound,
                      max_err, real_or_tiny, row_err, sdpa_fwd_bwd, sdpa_varlen_fwd_bwd,
                      varlen_attention_reference_chunked)

pytestmark = gpu_marks()

LSE_TOL = 1e-2
NAMES = ("out", "dq", "dk", "dv")


def _randn(shape, dtype, gen):
    return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(dtype)


def _compare(check, ours, lse, lowp, ref, dtype):
    """ours/lowp: (out, dq, dk, dv); ref: (out, lse, dq, dk, dv) in float64."""
    ref_t = (ref[0], ref[2], ref[3], ref[4])
    for name, o, lo, r in zip(NAMES, ours, lowp, ref_t):
        check(name, row_err(o, r), low_precision_bound(row_err(lo, r), 1.0, dtype,
                                                        grad=name != "out"))
    check("lse", max_err(lse, ref[1]), LSE_TOL)
    check.done()


# (dtype, batch, seqlen, heads, kv heads, head_dim, causal)
DENSE = real_or_tiny({
    "bf16-16k-d128-gqa4-causal": (torch.bfloat16, 1, 16384, 8, 2, 128, True),
    "bf16-8k-d64-gqa7-causal": (torch.bfloat16, 1, 8192, 14, 2, 64, True),
    "bf16-4k-d128-gqa4-full": (torch.bfloat16, 2, 4096, 8, 2, 128, False),
    "fp16-8k-d128-gqa4-causal": (torch.float16, 1, 8192, 8, 2, 128, True),
}, {  # CPU logic check (the interpreter)
    "bf16-16k-d128-gqa4-causal": (torch.bfloat16, 1, 160, 4, 2, 32, True),
    "bf16-8k-d64-gqa7-causal": (torch.bfloat16, 1, 96, 7, 1, 16, True),
    "bf16-4k-d128-gqa4-full": (torch.bfloat16, 2, 70, 4, 2, 32, False),
    "fp16-8k-d128-gqa4-causal": (torch.float16, 1, 100, 4, 2, 32, True),
})


@pytest.mark.parametrize("case", list(DENSE))
def test_flash_attn_func_fwd_bwd(case, check):
    from megatron_k15.kernels.flash_attention import flash_attn_func

    dtype, b, s, h, hkv, d, causal = DENSE[case]
    gen = torch.Generator(device=DEVICE).manual_seed(s + h)
    q, do = (_randn((b, s, h, d), dtype, gen) for _ in range(2))
    k, v = (_randn((b, s, hkv, d), dtype, gen) for _ in range(2))
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = flash_attn_func(qq, kk, vv, causal=causal, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, h, s)
    ours = (out.detach(), dq, dk, dv)
    del qq, kk, vv, out
    lowp = sdpa_fwd_bwd(q, k, v, do, causal=causal)
    ref = attention_reference_chunked(q, k, v, do, causal=causal)
    _compare(check, ours, lse, lowp, ref, dtype)


def test_flash_attn_varlen_func_fwd_bwd(check):
    """Packed sequences (lengths 1 .. 8192, ~16K tokens), Qwen2.5-0.5B heads (14 / 2, d 64)."""
    from megatron_k15.kernels.flash_attention import flash_attn_varlen_func

    dtype = torch.bfloat16
    h, hkv, d = real_or_tiny((14, 2, 64), (7, 1, 16))
    lengths = real_or_tiny([1, 700, 64, 3000, 8192, 4011], [1, 70, 16, 100])
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                      device=DEVICE)
    total = sum(lengths)
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    q, do = (_randn((total, h, d), dtype, gen) for _ in range(2))
    k, v = (_randn((total, hkv, d), dtype, gen) for _ in range(2))
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = flash_attn_varlen_func(qq, kk, vv, cu, max(lengths), causal=True, return_lse=True)
    dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do)
    assert lse.shape == (h, total)
    ours = (out.detach(), dq, dk, dv)
    del qq, kk, vv, out
    lowp = sdpa_varlen_fwd_bwd(q, k, v, cu, do, causal=True)
    ref = varlen_attention_reference_chunked(q, k, v, cu, do, causal=True)
    _compare(check, ours, lse, lowp, ref, dtype)
