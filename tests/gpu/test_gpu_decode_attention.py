"""Paged split-KV decode attention, compiled, at rollout sizes: batch 64, contexts up to 32K
(mixed lengths, shuffled blocks), Qwen2.5-7B heads (28 query / 4 kv, head_dim 128), bf16 and fp16,
against ``paged_decode_attention_reference`` on the fp32-upcast cache.

Tolerances: out, the row-relative error (``gpu_refs.row_err``, per sequence and head: outputs
of long contexts are small averages, of short ones single values, so one scale for all would
let a long-context error hide) at most 2 x that of the PyTorch fallback in the same dtype
(``paged_decode_attention_torch``: one masked SDPA call) + 1e-2 (bf16) / 2e-3 (fp16); lse
(fp32) <= 1e-3 absolute. Checked for the kernel's own split heuristic, one split and 16.
"""

from __future__ import annotations

import pytest
import torch

from gpu_refs import DEVICE, gpu_marks, low_precision_bound, max_err, real_or_tiny, row_err

pytestmark = gpu_marks()

BATCH, MAX_CONTEXT, HEADS, KV_HEADS, HEAD_DIM, BLOCK = real_or_tiny(
    (64, 32768, 28, 4, 128, 16), (4, 100, 4, 2, 32, 16))


def _cache(dtype, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    lens = torch.randint(1, MAX_CONTEXT + 1, (BATCH,), generator=gen, device=DEVICE)
    lens[0], lens[1], lens[2] = MAX_CONTEXT, 1, BLOCK + 1
    per_seq = (lens + BLOCK - 1) // BLOCK
    width = int(per_seq.max())
    num_blocks = int(per_seq.sum()) + 7
    perm = torch.randperm(num_blocks, generator=gen, device=DEVICE).to(torch.int32)
    bt = torch.zeros(BATCH, width + 1, dtype=torch.int32, device=DEVICE)
    starts = torch.cumsum(per_seq, 0) - per_seq
    for b in range(BATCH):
        n = int(per_seq[b])
        bt[b, :n] = perm[int(starts[b]):int(starts[b]) + n]
    shape = (num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    v = torch.randn(shape, generator=gen, device=DEVICE).to(dtype)
    q = torch.randn(BATCH, HEADS, HEAD_DIM, generator=gen, device=DEVICE).to(dtype)
    return q, k, v, bt, lens.to(torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_paged_decode_attention_batch64_context32k(dtype, check):
    from megatron_k15.kernels.decode_attention import (paged_decode_attention,
                                                       paged_decode_attention_reference,
                                                       paged_decode_attention_torch)

    q, k, v, bt, lens = _cache(dtype, seed=11)
    ref, ref_lse = paged_decode_attention_reference(q.float(), k.float(), v.float(), bt, lens,
                                                    return_lse=True)
    lowp = paged_decode_attention_torch(q, k, v, bt, lens)
    bound = low_precision_bound(row_err(lowp, ref), 1.0, dtype)
    for splits in (None, 1, real_or_tiny(16, 3)):
        out, lse = paged_decode_attention(q, k, v, bt, lens, num_splits=splits, return_lse=True,
                                          impl="triton")
        assert out.dtype == dtype and out.shape == q.shape
        check(f"out, row-relative (splits={splits})", row_err(out, ref), bound)
        check(f"lse (splits={splits})", max_err(lse, ref_lse), 1e-3)
    check.done()
