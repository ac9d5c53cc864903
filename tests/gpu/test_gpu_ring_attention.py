"""Ring attention on one GPU: ``simulate_ring_attn`` runs the zigzag ring schedule of
``kernels/ring_attention.py`` for cp virtual ranks in one process (the same block plan, Triton
kernels and fp32 LSE merges as the real ring; no communication, which needs several GPUs).

16K tokens, cp = 4, Qwen2.5-7B heads (28 / 4, head_dim 128), bf16, causal, forward and
backward; the merged outputs and gradients against a float64 reference of the whole sequence.
Tolerances as in test_gpu_flash_attention.py: out, dq, dk, dv row-relative error <= 2 x PyTorch
SDPA's in bf16 + 1e-2 (out) / 5e-2 (gradients); lse <= 1e-2 absolute.
"""

from __future__ import annotations

import torch

from gpu_refs import (DEVICE, attention_reference_chunked, gpu_marks, low_precision_bound,
                      max_err, real_or_tiny, row_err, sdpa_fwd_bwd)

pytestmark = gpu_marks()


def test_simulated_ring_cp4_16k_bf16(check):
    from megatron_k15.kernels.ring_attention import simulate_ring_attn
    from megatron_k15.parallel.context import zigzag_merge, zigzag_split

    cp, dtype = 4, torch.bfloat16
    s, h, hkv, d = real_or_tiny((16384, 28, 4, 128), (128, 4, 2, 16))
    gen = torch.Generator(device=DEVICE).manual_seed(21)
    q, do = (torch.randn(1, s, h, d, generator=gen, device=DEVICE).to(dtype) for _ in range(2))
    k, v = (torch.randn(1, s, hkv, d, generator=gen, device=DEVICE).to(dtype) for _ in range(2))

    def split(x):
        return [zigzag_split(x, 1, cp, r).contiguous() for r in range(cp)]

    (outs, lses), (dqs, dks, dvs) = simulate_ring_attn(split(q), split(k), split(v), causal=True,
                                                       douts=split(do))
    ours = [zigzag_merge(x, 1) for x in (outs, dqs, dks, dvs)]
    lse = zigzag_merge(lses, 2)
    del outs, dqs, dks, dvs
    lowp = sdpa_fwd_bwd(q, k, v, do, causal=True)
    ref = attention_reference_chunked(q, k, v, do, causal=True)
    for name, o, lo, r in zip(("out", "dq", "dk", "dv"), ours, lowp, (ref[0],) + ref[2:]):
        check(name, row_err(o, r), low_precision_bound(row_err(lo, r), 1.0, dtype,
                                                        grad=name != "out"))
    check("lse", max_err(lse, ref[1]), 1e-2)
    check.done()
