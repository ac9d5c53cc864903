"""Flash attention in Triton: forward and backward, causal, GQA, packed varlen, differentiable LSE.

Public API (flash-attn conventions, see DESIGN.md section 2)::

    out[, lse] = flash_attn_func(q, k, v, causal=True, softmax_scale=None, return_lse=False)
    out[, lse] = flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, causal=True,
                                        softmax_scale=None, return_lse=False)

Layouts
    ``flash_attn_func``: q (batch, seqlen_q, n_heads, head_dim), k and v
    (batch, seqlen_k, n_kv_heads, head_dim); lse (batch, n_heads, seqlen_q).
    ``flash_attn_varlen_func``: q, k, v (total_tokens, heads, head_dim) holding packed sequences
    delimited by int32 ``cu_seqlens`` (batch + 1,), ``cu_seqlens[0] == 0`` and
    ``cu_seqlens[-1] == total_tokens``; ``max_seqlen`` must be >= the longest sequence (rows past
    it would be silently left unwritten). lse (n_heads, total_tokens). Query and key sequences
    share ``cu_seqlens`` (self attention).

Semantics
    * GQA / MQA: ``n_heads % n_kv_heads == 0``; query head ``h`` reads kv head
      ``h // (n_heads // n_kv_heads)``. Repeated K/V are never materialised: the forward and dQ
      programs index the shared kv head, and the dK/dV program of a kv block loops over the
      query heads of its group, so dK/dV are summed without atomics.
    * Causal with ``seqlen_q != seqlen_k`` is aligned to the bottom-right corner, as flash-attn
      (>= 2.1) does: query ``i`` sees key ``j`` iff ``j <= i + seqlen_k - seqlen_q``. Query rows
      that see no key at all (possible when ``seqlen_q > seqlen_k``) get an output of 0 and an
      lse of ``-inf`` (the log of an empty sum), so merging partial results by lse treats them
      as empty.
    * ``lse`` is the natural-log log-sum-exp of the scaled scores, in fp32. It is differentiable:
      a gradient on lse adds ``dlse * P`` to dS (ring attention merges partial outputs by lse).
    * Accumulation is fp32 for every input dtype (fp32, bf16, fp16); fp32 inputs use IEEE fp32
      dot products (not TF32), so fp32 results match a float64 reference to about 1e-6.
    * head_dim: a power of two from 16 to 256, the same for q, k and v.

Kernels
    forward: one program per (query block, batch x head); online softmax in the exp2 domain
    with ``softmax_scale * log2(e)`` pre-multiplied; for causal, an unmasked loop over the key
    blocks strictly below the diagonal band and a masked loop over the band.
    backward: a preprocess kernel ``delta = rowsum(dO * O) - dlse``; a dK/dV kernel, one program
    per (key block, batch x kv head), looping over the query heads of its GQA group and over
    query blocks (masked band first, then unmasked blocks, then a masked ragged tail); a dQ
    kernel, one program per (query block, batch x head), looping over key blocks like the
    forward. No atomics anywhere.

On CUDA the kernels autotune over a short list of Hopper configs per kernel, kind of dot
(tensor-core bf16/fp16 or fp32) and head_dim, chosen by compiling every candidate for sm_90
(``tools/compile_kernels.py``: shared memory, registers, spills). Under the Triton interpreter
(``TRITON_INTERPRET=1``, read once at import through ``triton.knobs``; used for CPU tests) they
run one fixed config with BLOCK_M != BLOCK_N. The interpreter of triton 3.9 multiplies bf16 dot
operands as raw uint16 bits, so there (only) bf16 tiles are widened to fp32 before each dot,
after the same bf16 rounding of P and dS that the GPU path does.

``attention_reference`` is a plain PyTorch implementation (any float dtype, float64 included)
with the same semantics, for tests.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "attention_reference",
    "varlen_attention_reference",
    "INTERPRET",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INT32_MAX = 2**31 - 1


def _interpreting() -> bool:
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton without knobs
        import os

        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ``triton.jit`` decides at decoration time whether a kernel is interpreted, so we decide once.
INTERPRET = _interpreting()


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _block_start(start, LARGE: tl.constexpr):
    """Index of a block's first row, 64-bit when offsets may pass 2**31 (LARGE).

    The loops rebuild their pointers each step as ``base + _block_start(..) * stride + tile``
    with a fixed offset tile: a loop-carried tile of 64-bit pointers costs two registers per
    element and made dK/dV spill (288 -> 112 bytes per thread at d128 on sm_90,
    tools/compile_kernels.py)."""
    if LARGE:
        return tl.cast(start, tl.int64)
    else:
        return start


@triton.jit
def _tanh(x):
    """tanh from exp (the interpreter has no libdevice): (1 - e^-2|x|) / (1 + e^-2|x|), signed."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _window_key_range(start_m, causal_shift, window_left, n_full,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sliding window, for the query rows [start_m, start_m + BLOCK_M): (n_lo, n_mid) with
    [n_lo, n_mid) the block-aligned keys inside some rows' windows but not all (a masked
    loop) and [n_mid, n_full) the keys every row sees (unmasked). Row i sees key j iff
    i' - window_left <= j <= i' with i' = i + causal_shift; the first row's window starts
    lowest, the last row's highest."""
    first = tl.maximum(start_m + causal_shift - window_left, 0)
    n_lo = (first // BLOCK_N) * BLOCK_N
    every = tl.maximum(start_m + BLOCK_M - 1 + causal_shift - window_left, 0)
    n_mid = ((every + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    n_mid = tl.minimum(tl.maximum(n_mid, n_lo), n_full)
    n_lo = tl.minimum(n_lo, n_mid)
    return n_lo, n_mid


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, stride_ks, stride_vs,
    offs_m, lo, hi, seqlen_k, causal_shift, qk_scale, window_left, softcap2,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, LARGE: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_tile = offs_n0[:, None] * stride_ks + offs_d[None, :]  # see _block_start
    v_tile = offs_n0[:, None] * stride_vs + offs_d[None, :]
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        row0 = _block_start(start_n, LARGE)
        k_ptrs = k_base + row0 * stride_ks + k_tile
        v_ptrs = v_base + row0 * stride_vs + v_tile
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < seqlen_k, other=0.0)
        else:
            k = tl.load(k_ptrs)
        if UPCAST:  # the interpreter's bf16 dot is broken: dot in fp32
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # log2 domain
        if SOFTCAP:  # cap * tanh(score / cap), in the log2 domain (softcap2 = cap * log2(e))
            s = softcap2 * _tanh(s / softcap2)
        if MASKED:
            valid = offs_n[None, :] < seqlen_k
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
            if WINDOW:  # sliding window: only the window_left keys before the diagonal
                valid = valid & (offs_n[None, :] >= offs_m[:, None] + causal_shift - window_left)
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:
            # a row may have seen no key yet: keep exp2 finite (exp2(-inf - 0) == 0)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < seqlen_k, other=0.0)
        else:
            v = tl.load(v_ptrs)
        if UPCAST:  # the interpreter's bf16 dot is broken: dot in fp32
            v = v.to(tl.float32)
        p = p.to(v_base.dtype.element_ty)
        if UPCAST:
            p = p.to(tl.float32)
        acc = tl.dot(p, v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, CU_SEQLENS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k, n_heads, group, qk_scale, seq_bucket, window_left, softcap2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr, LARGE: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # heavy (late, for causal) query blocks first: better tail balance
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    if VARLEN:
        tok_start = tl.load(CU_SEQLENS + b).to(tl.int64)
        seqlen_q = (tl.load(CU_SEQLENS + b + 1) - tl.load(CU_SEQLENS + b)).to(tl.int32)
        seqlen_k = seqlen_q
        q_off = tok_start * stride_qs
        k_off = tok_start * stride_ks
        v_off = tok_start * stride_vs
        o_off = tok_start * stride_os
        l_off = tok_start * stride_ls
    else:
        b64 = b.to(tl.int64)
        q_off = b64 * stride_qb
        k_off = b64 * stride_kb
        v_off = b64 * stride_vb
        o_off = b64 * stride_ob
        l_off = b64 * stride_lb
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    q_base = Q + q_off + h64 * stride_qh
    k_base = K + k_off + hk64 * stride_kh
    v_base = V + v_off + hk64 * stride_vh
    o_base = O + o_off + h64 * stride_oh
    l_base = LSE + l_off + h64 * stride_lh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    if LARGE:  # offsets inside one sequence may overflow int32
        rows_m = offs_m.to(tl.int64)
    else:
        rows_m = offs_m
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen_q
    q = tl.load(q_base + (rows_m * stride_qs)[:, None] + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if UPCAST:  # the interpreter's bf16 dot is broken: dot in fp32
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    causal_shift = seqlen_k - seqlen_q  # bottom-right alignment
    if CAUSAL:
        # keys < start_m + shift + 1 are visible to every row of the block: unmasked loop
        n_full = tl.maximum(start_m + causal_shift + 1, 0)
        n_full = tl.minimum((n_full // BLOCK_N) * BLOCK_N, (seqlen_k // BLOCK_N) * BLOCK_N)
        # the diagonal band ends after the last row's last visible key
        n_end = tl.minimum(start_m + BLOCK_M + causal_shift, seqlen_k)
    else:
        n_full = (seqlen_k // BLOCK_N) * BLOCK_N
        n_end = seqlen_k
    n_mid = 0
    if WINDOW:
        n_lo, n_mid = _window_key_range(start_m, causal_shift, window_left, n_full,
                                        BLOCK_M, BLOCK_N)
        # masked: the window's lower band (keys left of some rows' windows)
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
            offs_m, n_lo, n_mid, seqlen_k, causal_shift, qk_scale, window_left, softcap2,
            HEAD_DIM, BLOCK_N, True, CAUSAL, WINDOW, LARGE, DOT_PREC, UPCAST, SOFTCAP,
        )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
        offs_m, n_mid, n_full, seqlen_k, causal_shift, qk_scale, window_left, softcap2,
        HEAD_DIM, BLOCK_N, False, CAUSAL, WINDOW, LARGE, DOT_PREC, UPCAST, SOFTCAP,
    )
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
        offs_m, n_full, n_end, seqlen_k, causal_shift, qk_scale, window_left, softcap2,
        HEAD_DIM, BLOCK_N, True, CAUSAL, WINDOW, LARGE, DOT_PREC, UPCAST, SOFTCAP,
    )
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(o_base + (rows_m * stride_os)[:, None] + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(l_base + (rows_m * stride_ls), lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, CU_SEQLENS,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr, VARLEN: tl.constexpr, LARGE: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse, fp32, laid out like lse."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h64 = (pid_bh % n_heads).to(tl.int64)
    if VARLEN:
        tok_start = tl.load(CU_SEQLENS + b).to(tl.int64)
        seqlen_q = (tl.load(CU_SEQLENS + b + 1) - tl.load(CU_SEQLENS + b)).to(tl.int32)
        o_off = tok_start * stride_os
        do_off = tok_start * stride_dos
        l_off = tok_start * stride_ls
    else:
        b64 = b.to(tl.int64)
        o_off = b64 * stride_ob
        do_off = b64 * stride_dob
        l_off = b64 * stride_lb
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if LARGE:  # offsets inside one sequence may overflow int32
        rows_m = offs_m.to(tl.int64)
    else:
        rows_m = offs_m
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen_q
    o = tl.load(O + o_off + h64 * stride_oh + (rows_m * stride_os)[:, None]
                + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + do_off + h64 * stride_doh + (rows_m * stride_dos)[:, None]
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
    delta = tl.sum(o * do, axis=1)
    l_ptrs = l_off + h64 * stride_lh + (rows_m * stride_ls)
    if HAS_DLSE:
        delta -= tl.load(DLSE + l_ptrs, mask=row_ok, other=0.0)
    tl.store(DELTA + l_ptrs, delta, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v,
    q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, stride_ls,
    offs_n, lo, hi, seqlen_q, seqlen_k, causal_shift, qk_scale, window_left, softcap2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, LARGE: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_tile = offs_m0[:, None] * stride_qs + offs_d[None, :]
    do_tile = offs_m0[:, None] * stride_dos + offs_d[None, :]
    l_tile = offs_m0 * stride_ls
    for start_m in tl.range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        row0 = _block_start(start_m, LARGE)
        q_ptrs = q_base + row0 * stride_qs + q_tile
        do_ptrs = do_base + row0 * stride_dos + do_tile
        lse_ptrs = lse_base + row0 * stride_ls + l_tile
        delta_ptrs = delta_base + row0 * stride_ls + l_tile
        if MASKED:
            row_ok = offs_m < seqlen_q
            q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
        else:
            q = tl.load(q_ptrs)
            lse = tl.load(lse_ptrs)
        if UPCAST:  # the interpreter's bf16 dot is broken: dot in fp32
            q = q.to(tl.float32)
        # rows that saw no key have lse = -inf; +inf makes their probabilities exactly 0
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        if SOFTCAP:
            t_t = _tanh(s_t / softcap2)
            s_t = softcap2 * t_t
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            valid = offs_n[:, None] < seqlen_k
            if CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :] + causal_shift)
            if WINDOW:
                valid = valid & (offs_n[:, None] >= offs_m[None, :] + causal_shift - window_left)
            p_t = tl.where(valid, p_t, 0.0)
        if MASKED:
            do = tl.load(do_ptrs, mask=row_ok[:, None], other=0.0)
            delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
        else:
            do = tl.load(do_ptrs)
            delta = tl.load(delta_ptrs)
        if UPCAST:  # the interpreter's bf16 dot is broken: dot in fp32
            do = do.to(tl.float32)
        p_t = p_t.to(do_base.dtype.element_ty)
        if UPCAST:
            p_t = p_t.to(tl.float32)
        dv = tl.dot(p_t, do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:  # d(cap tanh(x / cap)) / dx = 1 - tanh^2
            ds_t = ds_t * (1.0 - t_t * t_t)
        ds_t = ds_t.to(q_base.dtype.element_ty)
        if UPCAST:
            ds_t = ds_t.to(tl.float32)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k, n_kv_heads, group, qk_scale, sm_scale, seq_bucket, window_left, softcap2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr, LARGE: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_kv_heads
    hk = pid_bh % n_kv_heads
    if VARLEN:
        tok_start = tl.load(CU_SEQLENS + b).to(tl.int64)
        seqlen_q = (tl.load(CU_SEQLENS + b + 1) - tl.load(CU_SEQLENS + b)).to(tl.int32)
        seqlen_k = seqlen_q
        q_off = tok_start * stride_qs
        k_off = tok_start * stride_ks
        v_off = tok_start * stride_vs
        do_off = tok_start * stride_dos
        dk_off = tok_start * stride_dks
        dv_off = tok_start * stride_dvs
        l_off = tok_start * stride_ls
    else:
        b64 = b.to(tl.int64)
        q_off = b64 * stride_qb
        k_off = b64 * stride_kb
        v_off = b64 * stride_vb
        do_off = b64 * stride_dob
        dk_off = b64 * stride_dkb
        dv_off = b64 * stride_dvb
        l_off = b64 * stride_lb
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen_k:
        return
    hk64 = hk.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if LARGE:
        rows_n = offs_n.to(tl.int64)
    else:
        rows_n = offs_n
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seqlen_k
    k = tl.load(K + k_off + hk64 * stride_kh + (rows_n * stride_ks)[:, None]
                + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    v = tl.load(V + v_off + hk64 * stride_vh + (rows_n * stride_vs)[:, None]
                + offs_d[None, :], mask=col_ok[:, None], other=0.0)
    if UPCAST:  # the interpreter's bf16 dot is broken: dot in fp32
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    causal_shift = seqlen_k - seqlen_q
    m_full_end = (seqlen_q // BLOCK_M) * BLOCK_M  # query rows in whole blocks
    if CAUSAL:
        # first query row that sees a key of this block, rounded down to a block
        m_lo = tl.maximum(start_n - causal_shift, 0)
        m_lo = (m_lo // BLOCK_M) * BLOCK_M
        # first query row that sees every key of this block, rounded up to a block
        m_mid = tl.maximum(start_n + BLOCK_N - 1 - causal_shift, 0)
        m_mid = tl.maximum(((m_mid + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, m_lo)
        band_end = tl.minimum(m_mid, seqlen_q)
        tail_start = tl.maximum(m_mid, m_full_end)
    else:
        m_lo = 0
        m_mid = 0
        band_end = 0
        tail_start = m_full_end
    m_hi = seqlen_q
    unmasked_end = m_full_end
    if WINDOW:
        # rows below m_win hold this block's first key (so all of it) in their windows; rows
        # from m_hi on hold none of it
        m_win = (tl.maximum(start_n + window_left - causal_shift + 1, 0) // BLOCK_M) * BLOCK_M
        m_hi = tl.minimum(tl.maximum(start_n + BLOCK_N + window_left - causal_shift, 0), seqlen_q)
        unmasked_end = tl.minimum(tl.maximum(m_win, m_mid), m_full_end)
        tail_start = tl.maximum(m_mid, unmasked_end)

    for g in range(0, group):
        h64 = (hk * group + g).to(tl.int64)
        q_base = Q + q_off + h64 * stride_qh
        do_base = DO + do_off + h64 * stride_doh
        lse_base = LSE + l_off + h64 * stride_lh
        delta_base = DELTA + l_off + h64 * stride_lh
        # masked: the diagonal band
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, stride_ls,
            offs_n, m_lo, band_end, seqlen_q, seqlen_k, causal_shift, qk_scale, window_left, softcap2,
            HEAD_DIM, BLOCK_M, True, CAUSAL, WINDOW, LARGE, DOT_PREC, UPCAST, SOFTCAP,
        )
        # unmasked: whole query blocks that see every key of this block
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, stride_ls,
            offs_n, m_mid, unmasked_end, seqlen_q, seqlen_k, causal_shift, qk_scale, window_left, softcap2,
            HEAD_DIM, BLOCK_M, False, CAUSAL, WINDOW, LARGE, DOT_PREC, UPCAST, SOFTCAP,
        )
        # masked: the ragged last query block (and, with a window, the rows whose windows
        # leave this block)
        dk, dv = _bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qs, stride_dos, stride_ls,
            offs_n, tail_start, m_hi, seqlen_q, seqlen_k, causal_shift, qk_scale, window_left, softcap2,
            HEAD_DIM, BLOCK_M, True, CAUSAL, WINDOW, LARGE, DOT_PREC, UPCAST, SOFTCAP,
        )
    dk = dk * sm_scale
    tl.store(DK + dk_off + hk64 * stride_dkh + (rows_n * stride_dks)[:, None]
             + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=col_ok[:, None])
    tl.store(DV + dv_off + hk64 * stride_dvh + (rows_n * stride_dvs)[:, None]
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse, delta,
    k_base, v_base, stride_ks, stride_vs,
    offs_m, lo, hi, seqlen_k, causal_shift, qk_scale, window_left, softcap2,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, LARGE: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_tile = offs_n0[:, None] * stride_ks + offs_d[None, :]  # see _block_start
    v_tile = offs_n0[:, None] * stride_vs + offs_d[None, :]
    for start_n in tl.range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        row0 = _block_start(start_n, LARGE)
        k_ptrs = k_base + row0 * stride_ks + k_tile
        v_ptrs = v_base + row0 * stride_vs + v_tile
        if MASKED:
            col_ok = offs_n < seqlen_k
            k = tl.load(k_ptrs, mask=col_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        if UPCAST:  # the interpreter's bf16 dot is broken: dot in fp32
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        if SOFTCAP:
            t = _tanh(s / softcap2)
            s = softcap2 * t
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            valid = col_ok[None, :]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + causal_shift)
            if WINDOW:
                valid = valid & (offs_n[None, :] >= offs_m[:, None] + causal_shift - window_left)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        ds = ds.to(k_base.dtype.element_ty)
        if UPCAST:
            ds = ds.to(tl.float32)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k, n_heads, group, qk_scale, sm_scale, seq_bucket, window_left, softcap2,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, VARLEN: tl.constexpr, LARGE: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, SOFTCAP: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // group
    if VARLEN:
        tok_start = tl.load(CU_SEQLENS + b).to(tl.int64)
        seqlen_q = (tl.load(CU_SEQLENS + b + 1) - tl.load(CU_SEQLENS + b)).to(tl.int32)
        seqlen_k = seqlen_q
        q_off = tok_start * stride_qs
        k_off = tok_start * stride_ks
        v_off = tok_start * stride_vs
        do_off = tok_start * stride_dos
        dq_off = tok_start * stride_dqs
        l_off = tok_start * stride_ls
    else:
        b64 = b.to(tl.int64)
        q_off = b64 * stride_qb
        k_off = b64 * stride_kb
        v_off = b64 * stride_vb
        do_off = b64 * stride_dob
        dq_off = b64 * stride_dqb
        l_off = b64 * stride_lb
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen_q:
        return
    h64 = h.to(tl.int64)
    hk64 = hk.to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    if LARGE:  # offsets inside one sequence may overflow int32
        rows_m = offs_m.to(tl.int64)
    else:
        rows_m = offs_m
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen_q
    q = tl.load(Q + q_off + h64 * stride_qh + (rows_m * stride_qs)[:, None]
                + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + do_off + h64 * stride_doh + (rows_m * stride_dos)[:, None]
                 + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if UPCAST:  # the interpreter's bf16 dot is broken: dot in fp32
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    l_ptrs = l_off + h64 * stride_lh + (rows_m * stride_ls)
    lse = tl.load(LSE + l_ptrs, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + l_ptrs, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    k_base = K + k_off + hk64 * stride_kh
    v_base = V + v_off + hk64 * stride_vh
    causal_shift = seqlen_k - seqlen_q
    if CAUSAL:
        n_full = tl.maximum(start_m + causal_shift + 1, 0)
        n_full = tl.minimum((n_full // BLOCK_N) * BLOCK_N, (seqlen_k // BLOCK_N) * BLOCK_N)
        n_end = tl.minimum(start_m + BLOCK_M + causal_shift, seqlen_k)
    else:
        n_full = (seqlen_k // BLOCK_N) * BLOCK_N
        n_end = seqlen_k
    n_mid = 0
    if WINDOW:
        n_lo, n_mid = _window_key_range(start_m, causal_shift, window_left, n_full,
                                        BLOCK_M, BLOCK_N)
        dq = _bwd_dq_inner(
            dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs,
            offs_m, n_lo, n_mid, seqlen_k, causal_shift, qk_scale, window_left, softcap2,
            HEAD_DIM, BLOCK_N, True, CAUSAL, WINDOW, LARGE, DOT_PREC, UPCAST, SOFTCAP,
        )
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs,
        offs_m, n_mid, n_full, seqlen_k, causal_shift, qk_scale, window_left, softcap2,
        HEAD_DIM, BLOCK_N, False, CAUSAL, WINDOW, LARGE, DOT_PREC, UPCAST, SOFTCAP,
    )
    dq = _bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs,
        offs_m, n_full, n_end, seqlen_k, causal_shift, qk_scale, window_left, softcap2,
        HEAD_DIM, BLOCK_N, True, CAUSAL, WINDOW, LARGE, DOT_PREC, UPCAST, SOFTCAP,
    )
    dq = dq * sm_scale
    tl.store(DQ + dq_off + h64 * stride_dqh + (rows_m * stride_dqs)[:, None]
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# Launch configurations
# ----------------------------------------------------------------------------------------------

# Under the interpreter: one small fixed config per kernel. BLOCK_M != BLOCK_N on purpose, so
# the CPU tests exercise the band / off-band bookkeeping with unaligned blocks.
# The interpreter's cost is per executed op, so the blocks are as large as still leaves several
# blocks per tested sequence.
_INTERP_FWD = dict(BLOCK_M=64, BLOCK_N=32)
_INTERP_DKDV = dict(BLOCK_M=32, BLOCK_N=64)
_INTERP_DQ = dict(BLOCK_M=64, BLOCK_N=32)
_PREPROCESS_BLOCK_M = 64


def _configs(spec):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in spec]


# Hopper (H100/H200) autotuning candidates, (BLOCK_M, BLOCK_N, num_warps, num_stages), per
# kernel, per kind of dot ("tc": bf16/fp16 on tensor cores; "ieee": fp32 on CUDA cores) and per
# head_dim (<= 64, 128, 256). Chosen from the sm_90 cross-compile audit
# (`python tools/compile_kernels.py --configs all`, docs/benchmarks.md): no candidate needs more
# shared memory than a block has, and none spills more than a few dozen bytes per thread --
# e.g. every 4-warp dK/dV tile at d128 spilled 0.4-1.6 KB and fp32 tiles with 4 warps up to
# 7 KB (and took minutes to compile). Which of them is fastest is left to the autotuner.
_HOPPER = {
    "fwd": {
        ("tc", 64): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3),
                     (128, 64, 8, 4), (128, 32, 8, 4), (64, 64, 4, 3), (64, 128, 4, 2),
                     (64, 64, 8, 2)],
        ("tc", 128): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 4),
                      (128, 32, 8, 4), (64, 64, 4, 3), (64, 128, 4, 2), (64, 64, 8, 2)],
        ("tc", 256): [(128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 3),
                      (64, 32, 8, 3)],
        ("ieee", 64): [(64, 32, 8, 2), (32, 64, 8, 2), (64, 16, 8, 2), (32, 32, 8, 2)],
        ("ieee", 128): [(32, 64, 8, 2)],
        ("ieee", 256): [(32, 16, 8, 2), (16, 32, 8, 2)],
    },
    # dK/dV: BLOCK_N rows of k/v stay resident, BLOCK_M rows of q/dO stream through
    "dkdv": {
        ("tc", 64): [(32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3), (32, 64, 8, 2),
                     (32, 64, 8, 3), (16, 64, 4, 3), (32, 64, 4, 2)],
        ("tc", 128): [(16, 128, 8, 2), (16, 128, 8, 3), (16, 64, 8, 2), (16, 64, 8, 3),
                      (32, 64, 8, 2), (32, 128, 8, 3)],
        ("tc", 256): [(16, 32, 8, 2), (16, 32, 8, 3), (32, 32, 8, 2)],
        ("ieee", 64): [(16, 32, 8, 2), (32, 32, 8, 2)],
        ("ieee", 128): [(16, 64, 8, 2), (16, 16, 8, 2)],
        ("ieee", 256): [(16, 32, 8, 2), (16, 16, 8, 2)],
    },
    # dQ: BLOCK_M rows of q/dO stay resident, BLOCK_N rows of k/v stream through
    "dq": {
        ("tc", 64): [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2), (128, 16, 4, 5),
                     (64, 32, 4, 4), (64, 64, 4, 3), (64, 32, 8, 2)],
        ("tc", 128): [(128, 32, 8, 3), (128, 32, 8, 4), (128, 64, 8, 2), (128, 16, 8, 3),
                      (64, 32, 4, 4), (64, 64, 4, 3), (64, 32, 8, 2)],
        ("tc", 256): [(64, 32, 4, 4), (64, 32, 8, 2), (64, 32, 8, 3), (64, 16, 4, 3),
                      (128, 32, 8, 2)],
        ("ieee", 64): [(64, 16, 8, 2), (32, 32, 8, 2), (64, 32, 8, 2)],
        ("ieee", 128): [(32, 16, 8, 2), (64, 16, 8, 2)],
        ("ieee", 256): [(32, 16, 8, 2), (16, 16, 8, 2)],
    },
}
# Shared memory a block may use on Hopper (227 KiB), less a margin for the kernel's own
# static allocations (about 1 KiB).
_SMEM_LIMIT = 232448 - 2048
# shared memory per config, in rows x head_dim elements: (held once, per pipeline stage)
_SMEM_ROWS = {"fwd": lambda bm, bn: (bm, 2 * bn), "dkdv": lambda bm, bn: (2 * bn, 2 * bm),
              "dq": lambda bm, bn: (2 * bm, 2 * bn)}


def _head_dim_class(head_dim: int) -> int:
    return 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256


def _candidates(kernel: str, dot_prec: str, head_dim: int):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) tried for these inputs, in table order, less
    any whose shared memory (estimated as in _SMEM_ROWS) would not fit."""
    table = _HOPPER[kernel][("ieee" if dot_prec == "ieee" else "tc", _head_dim_class(head_dim))]
    elt = 4 if dot_prec == "ieee" else 2

    def smem(cfg):
        once, staged = _SMEM_ROWS[kernel](cfg[0], cfg[1])
        return (once + cfg[3] * staged) * head_dim * elt

    return [c for c in table if smem(c) <= _SMEM_LIMIT] or table[-1:]


def _make_prune(kernel: str):
    """An ``early_config_prune``: of the union of all candidates, those of this launch's
    (kind of dot, head_dim), in the order of its table."""

    def prune(configs, nargs, **kwargs):
        by_spec = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages): c
                   for c in configs}
        want = _candidates(kernel, kwargs.get("DOT_PREC", "tf32"), kwargs.get("HEAD_DIM", 128))
        return [by_spec[spec] for spec in want]  # table order: the preferred config first

    return prune


def _all_candidates(kernel: str):
    return _configs(sorted({c for table in _HOPPER[kernel].values() for c in table}, reverse=True))


_AUTOTUNE_KEY = ["seq_bucket", "HEAD_DIM", "CAUSAL", "WINDOW", "VARLEN", "DOT_PREC", "SOFTCAP"]

if INTERPRET:
    _fwd_launcher = _attn_fwd_kernel
    _dkdv_launcher = _attn_bwd_dkdv_kernel
    _dq_launcher = _attn_bwd_dq_kernel
else:
    _fwd_launcher = triton.autotune(_all_candidates("fwd"), key=_AUTOTUNE_KEY,
                                    prune_configs_by={"early_config_prune": _make_prune("fwd")})(
                                        _attn_fwd_kernel)
    _dkdv_launcher = triton.autotune(_all_candidates("dkdv"), key=_AUTOTUNE_KEY + ["group"],
                                     prune_configs_by={"early_config_prune": _make_prune("dkdv")})(
                                         _attn_bwd_dkdv_kernel)
    _dq_launcher = triton.autotune(_all_candidates("dq"), key=_AUTOTUNE_KEY,
                                   prune_configs_by={"early_config_prune": _make_prune("dq")})(
                                       _attn_bwd_dq_kernel)


def _fixed(cfg):
    return dict(cfg, num_warps=4, num_stages=1) if INTERPRET else {}


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _s3(x: torch.Tensor, varlen: bool):
    """(batch, seq, head) strides of a (b, s, h, d) or packed (t, h, d) tensor."""
    if varlen:
        return 0, x.stride(0), x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool):
    if varlen:  # (h, t)
        return 0, lse.stride(0), lse.stride(1)
    return lse.stride(0), lse.stride(1), lse.stride(2)  # (b, h, s)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _needs_int64(max_seqlen: int, *tensors: torch.Tensor, varlen: bool) -> bool:
    seq_dim = 0 if varlen else 1
    worst = max(max_seqlen * t.stride(seq_dim) + t.size(-1) for t in tensors)
    return worst > _INT32_MAX


def _seq_bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 16))


def _dot_prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _upcast(dtype: torch.dtype) -> bool:
    # triton's interpreter multiplies bf16 dot operands as raw uint16 bits (triton 3.9); there the
    # kernels round to bf16 as on GPU but feed the dots in fp32. Never used on GPU.
    return INTERPRET and dtype == torch.bfloat16


# CUDA caps a grid's second dimension at 65535; the kernels put (sequence, head) pairs there,
# so a launch takes at most this many of them (a packed batch of 2,400 sequences x 28 heads is
# launched in two parts)
MAX_GRID_Y = 65535


def _batch_chunks(batch: int, per_sequence: int):
    """(first, end) sequence ranges whose sequences x ``per_sequence`` fit MAX_GRID_Y."""
    step = max(1, MAX_GRID_Y // max(per_sequence, 1))
    return [(b, min(batch, b + step)) for b in range(0, batch, step)]


def _part(t, b0, b1, varlen, cu=False):
    """A launch's share of a tensor: packed tensors are indexed through cu_seqlens' absolute
    offsets (only cu_seqlens itself is sliced), dense ones along the batch."""
    if varlen:
        return t[b0:b1 + 1] if cu else t
    return t[b0:b1]


def _softcap_args(softcap: float) -> tuple[float, bool]:
    """(cap * log2(e), SOFTCAP): the kernels cap scores in the log2 domain; 0 means no cap."""
    return (softcap * LOG2E, True) if softcap > 0 else (1.0, False)


def _forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window_left=-1, softcap=0.0):
    varlen = cu_seqlens is not None
    if varlen:
        total, n_heads, head_dim = q.shape
        n_kv = k.shape[1]
        batch = cu_seqlens.numel() - 1
        seqlen_q = seqlen_k = max_seqlen
        out = torch.empty_like(q)
        lse = torch.empty((n_heads, total), device=q.device, dtype=torch.float32)
    else:
        batch, seqlen_q, n_heads, head_dim = q.shape
        seqlen_k, n_kv = k.shape[1], k.shape[2]
        out = torch.empty_like(q)
        lse = torch.empty((batch, n_heads, seqlen_q), device=q.device, dtype=torch.float32)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    group = n_heads // n_kv
    qk_scale = softmax_scale * LOG2E
    large = _needs_int64(max(seqlen_q, seqlen_k), q, k, v, out, varlen=varlen)
    cu = cu_seqlens if varlen else q  # dummy pointer when not varlen
    softcap2, capped = _softcap_args(softcap)
    meta = dict(HEAD_DIM=head_dim, CAUSAL=bool(causal), WINDOW=window_left >= 0, VARLEN=varlen,
                LARGE=large, DOT_PREC=_dot_prec(q.dtype), UPCAST=_upcast(q.dtype), SOFTCAP=capped)

    for b0, b1 in _batch_chunks(batch, n_heads):
        def grid(m, n=b1 - b0):
            return (triton.cdiv(seqlen_q, m["BLOCK_M"]), n * n_heads)

        part = [_part(t, b0, b1, varlen) for t in (q, k, v, out, lse)]
        _fwd_launcher[grid](
            *part, _part(cu, b0, b1, varlen, cu=True),
            *_s3(q, varlen), *_s3(k, varlen), *_s3(v, varlen), *_s3(out, varlen),
            *_lse_strides(lse, varlen),
            seqlen_q, seqlen_k, n_heads, group, qk_scale, _seq_bucket(max(seqlen_q, seqlen_k)),
            max(window_left, 0), softcap2, **meta, **_fixed(_INTERP_FWD),
        )
    return out, lse


def _backward(do, dlse, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale,
              window_left=-1, softcap=0.0):
    varlen = cu_seqlens is not None
    if varlen:
        total, n_heads, head_dim = q.shape
        n_kv = k.shape[1]
        batch = cu_seqlens.numel() - 1
        seqlen_q = seqlen_k = max_seqlen
    else:
        batch, seqlen_q, n_heads, head_dim = q.shape
        seqlen_k, n_kv = k.shape[1], k.shape[2]
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    group = n_heads // n_kv
    qk_scale = softmax_scale * LOG2E
    large = _needs_int64(max(seqlen_q, seqlen_k), q, k, v, do, out, dq, dk, dv, varlen=varlen)
    cu = cu_seqlens if varlen else q
    bucket = _seq_bucket(max(seqlen_q, seqlen_k))
    dot_prec = _dot_prec(q.dtype)

    delta = torch.empty_like(lse)
    has_dlse = dlse is not None
    if has_dlse:
        dlse = dlse.to(torch.float32)
        if dlse.stride() != lse.stride():
            dlse = dlse.contiguous()
    softcap2, capped = _softcap_args(softcap)
    meta = dict(HEAD_DIM=head_dim, CAUSAL=bool(causal), WINDOW=window_left >= 0, VARLEN=varlen,
                LARGE=large, DOT_PREC=dot_prec, UPCAST=_upcast(q.dtype), SOFTCAP=capped)
    for b0, b1 in _batch_chunks(batch, n_heads):  # (MAX_GRID_Y)
        n = b1 - b0
        q_, k_, v_, do_, out_, lse_, delta_, dq_, dk_, dv_ = (
            _part(t, b0, b1, varlen) for t in (q, k, v, do, out, lse, delta, dq, dk, dv))
        cu_ = _part(cu, b0, b1, varlen, cu=True)
        _attn_bwd_preprocess_kernel[(triton.cdiv(seqlen_q, _PREPROCESS_BLOCK_M), n * n_heads)](
            out_, do_, _part(dlse, b0, b1, varlen) if has_dlse else lse_, delta_, cu_,
            *_s3(out, varlen), *_s3(do, varlen), *_lse_strides(lse, varlen),
            seqlen_q, n_heads,
            HEAD_DIM=head_dim, BLOCK_M=_PREPROCESS_BLOCK_M, HAS_DLSE=has_dlse, VARLEN=varlen,
            LARGE=large,
        )
        _dkdv_launcher[lambda m, n=n: (triton.cdiv(seqlen_k, m["BLOCK_N"]), n * n_kv)](
            q_, k_, v_, do_, lse_, delta_, dk_, dv_, cu_,
            *_s3(q, varlen), *_s3(k, varlen), *_s3(v, varlen), *_s3(do, varlen),
            *_s3(dk, varlen), *_s3(dv, varlen), *_lse_strides(lse, varlen),
            seqlen_q, seqlen_k, n_kv, group, qk_scale, softmax_scale, bucket, max(window_left, 0), softcap2,
            **meta, **_fixed(_INTERP_DKDV),
        )
        _dq_launcher[lambda m, n=n: (triton.cdiv(seqlen_q, m["BLOCK_M"]), n * n_heads)](
            q_, k_, v_, do_, lse_, delta_, dq_, cu_,
            *_s3(q, varlen), *_s3(k, varlen), *_s3(v, varlen), *_s3(do, varlen),
            *_s3(dq, varlen), *_lse_strides(lse, varlen),
            seqlen_q, seqlen_k, n_heads, group, qk_scale, softmax_scale, bucket, max(window_left, 0), softcap2,
            **meta, **_fixed(_INTERP_DQ),
        )
    return dq, dk, dv


class _FlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window_left, softcap):
        out, lse = _forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, window_left, softcap)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
        ctx.max_seqlen = max_seqlen
        ctx.causal = causal
        ctx.softmax_scale = softmax_scale
        ctx.window_left = window_left
        ctx.softcap = softcap
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dout = _last_dim_contiguous(dout)
        dq, dk, dv = _backward(dout, dlse, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen,
                               ctx.causal, ctx.softmax_scale, ctx.window_left, ctx.softcap)
        return dq, dk, dv, None, None, None, None, None, None


# ----------------------------------------------------------------------------------------------
# Validation and public functions
# ----------------------------------------------------------------------------------------------


def _check_common(q, k, v, softmax_scale, ndim, layout):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != ndim:
            raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"flash attention needs CUDA tensors (got {q.device}); on CPU set TRITON_INTERPRET=1 "
            "before importing triton to run the kernels under the interpreter")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"q and k/v head_dim differ: {head_dim} vs {k.shape[-1]}")
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
    n_heads, n_kv = q.shape[-2], k.shape[-2]
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv})")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    softmax_scale = float(softmax_scale)
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
    return softmax_scale


def check_softcap(softcap) -> float:
    """A score soft-cap: 0 (none) or a positive finite number."""
    softcap = float(softcap or 0.0)
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be 0 (none) or a positive number, got {softcap}")
    return softcap


def window_left_of(window_size, causal: bool) -> int:
    """flash-attn's ``window_size=(left, right)`` (-1: unbounded) -> the left window, -1 for
    none. Only causal sliding windows are supported: right must be -1 or 0."""
    if window_size is None:
        return -1
    try:
        left, right = (int(x) for x in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair (left, right), got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {window_size!r}")
    if left >= 0 or right >= 0:
        if not causal:
            raise NotImplementedError("a sliding window (window_size != (-1, -1)) needs causal=True")
        if right > 0:
            raise ValueError(f"causal attention sees no keys to the right: window_size[1] must be "
                             f"-1 or 0, got {right}")
    return left


def flash_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: Optional[float] = None, return_lse: bool = False,
                    window_size: tuple = (-1, -1), softcap: float = 0.0):
    """Attention over (batch, seqlen, heads, head_dim) tensors; see the module docstring.

    Returns ``out`` shaped like q, and with ``return_lse`` also ``lse`` (batch, n_heads, seqlen_q)
    fp32 natural log. Causal masking with seqlen_q != seqlen_k is bottom-right aligned.
    ``window_size=(left, 0)``: a causal sliding window, query i sees keys i' - left .. i'
    (i' = i + seqlen_k - seqlen_q; Hugging Face's ``sliding_window`` W is left = W - 1).
    ``softcap`` > 0: each scaled score s becomes softcap * tanh(s / softcap) before the softmax
    (Gemma 2's attention logit soft-capping); the lse is of the capped scores.
    """
    softmax_scale = _check_common(q, k, v, softmax_scale, 4, "(batch, seqlen, heads, head_dim)")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k/v batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    window_left = window_left_of(window_size, causal)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, lse = _FlashAttnFunction.apply(q, k, v, None, 0, bool(causal), softmax_scale, window_left,
                                        check_softcap(softcap))
    return (out, lse) if return_lse else out


def flash_attn_varlen_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool = True,
                           softmax_scale: Optional[float] = None, return_lse: bool = False,
                           window_size: tuple = (-1, -1), softcap: float = 0.0):
    """Attention over packed sequences (total_tokens, heads, head_dim); see the module docstring.

    ``cu_seqlens`` int32 (batch + 1,) holds the sequence boundaries (first 0, last total_tokens),
    ``max_seqlen`` an upper bound on the sequence lengths. Returns ``out`` like q and with
    ``return_lse`` also ``lse`` (n_heads, total_tokens) fp32.
    """
    softmax_scale = _check_common(q, k, v, softmax_scale, 3, "(total_tokens, heads, head_dim)")
    window_left = window_left_of(window_size, causal)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k/v total_tokens differ: {q.shape[0]} vs {k.shape[0]}")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError("cu_seqlens must be a torch.Tensor of dtype int32")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with batch + 1 >= 2 entries, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    max_seqlen = int(max_seqlen)
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be >= 0, got {max_seqlen}")
    if cu_seqlens.device.type == "cpu":  # cheap here; on GPU this would cost a sync
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0]:
            raise ValueError(f"cu_seqlens must start at 0 and end at total_tokens={q.shape[0]}, "
                             f"got {int(cu_seqlens[0])} ... {int(cu_seqlens[-1])}")
        if bool((lengths < 0).any()):
            raise ValueError("cu_seqlens must be non-decreasing")
        if int(lengths.max()) > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is less than the longest sequence "
                             f"({int(lengths.max())})")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    out, lse = _FlashAttnFunction.apply(q, k, v, cu_seqlens.contiguous(), max_seqlen, bool(causal),
                                        softmax_scale, window_left, check_softcap(softcap))
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                        softmax_scale: Optional[float] = None, return_lse: bool = False,
                        upcast: Optional[torch.dtype] = None, window_size: tuple = (-1, -1),
                        softcap: float = 0.0):
    """Plain PyTorch attention with flash_attn_func's layout and semantics (GQA, bottom-right
    causal, empty rows -> output 0 and lse -inf). Computes in ``upcast`` (default: the input
    dtype; pass torch.float64 for a reference) and returns that dtype; differentiable."""
    if upcast is not None:
        q, k, v = q.to(upcast), k.to(upcast), v.to(upcast)
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(d)
    group = h // hkv
    kk = k.repeat_interleave(group, dim=2)
    vv = v.repeat_interleave(group, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) * softmax_scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    window_left = window_left_of(window_size, causal)
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        hidden = j > i + (sk - sq)
        if window_left >= 0:
            hidden = hidden | (j < i + (sk - sq) - window_left)
        s = s.masked_fill(hidden, float("-inf"))
    # log-sum-exp by hand so rows without keys give lse = -inf, output 0 and finite gradients
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    has_key = l > 0
    l_safe = torch.where(has_key, l, torch.ones_like(l))
    lse = torch.where(has_key, torch.log(l_safe) + m, torch.full_like(l, float("-inf"))).squeeze(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", e / l_safe, vv)
    if return_lse:
        return out, lse
    return out


def varlen_attention_reference(q, k, v, cu_seqlens, causal=True, softmax_scale=None,
                               return_lse=False, upcast=None, window_size=(-1, -1), softcap=0.0):
    """attention_reference applied per packed sequence; lse (n_heads, total_tokens)."""
    outs, lses = [], []
    bounds = [int(x) for x in cu_seqlens.tolist()]
    dtype = upcast or q.dtype
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e == s:  # empty sequence
            outs.append(q.new_zeros((0,) + tuple(q.shape[1:]), dtype=dtype))
            lses.append(q.new_zeros((q.shape[1], 0), dtype=dtype))
            continue
        o, l = attention_reference(q[None, s:e], k[None, s:e], v[None, s:e], causal=causal,
                                   softmax_scale=softmax_scale, return_lse=True, upcast=upcast,
                                   window_size=window_size, softcap=softcap)
        outs.append(o[0])
        lses.append(l[0])
    out = torch.cat(outs, 0)
    lse = torch.cat(lses, 1)
    return (out, lse) if return_lse else out
