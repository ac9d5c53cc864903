"""Split-KV ("flash-decoding") attention of one new token per sequence over a paged KV cache.

Public API::

    out[, lse] = paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens,
                                        softmax_scale=None, num_splits=None, return_lse=False)

Layouts
    q             (batch, n_heads, head_dim): the query of the one new token of each sequence.
    k_cache/v_cache (num_blocks, block_size, n_kv_heads, head_dim): one layer's paged cache
                  (``megatron_k15.generation.kv_cache.PagedKVCache.k_cache(layer)``); any strides
                  except that ``head_dim`` must be contiguous.
    block_tables  (batch, max_blocks_per_seq) int32: physical block ids of each sequence in
                  logical order; entries past a sequence's last block are ignored (pad with 0).
    seq_lens      (batch,) int32: valid cached tokens of each sequence, the current token
                  included (the caller writes the new K/V to the cache before calling). Token
                  ``t`` of sequence ``b`` lives at ``k_cache[block_tables[b, t // block_size],
                  t % block_size]``. A length of 0 gives an output of 0 and an lse of ``-inf``.
    out           (batch, n_heads, head_dim), q's dtype.
    lse           (batch, n_heads) fp32, natural-log log-sum-exp of the scaled scores (for merging
                  partial attentions, e.g. context-parallel decode).

Semantics
    GQA / MQA: ``n_heads % n_kv_heads == 0`` and query head ``h`` reads kv head
    ``h // (n_heads // n_kv_heads)`` (the same convention as ``flash_attn_func``). No causal mask
    is needed: the single query is the last position and sees every cached token.
    Accumulation is fp32 for every input dtype; fp32 inputs use IEEE fp32 dot products (no TF32),
    so fp32 results match a float64 reference to ~1e-6. For fp16/bf16 the probabilities are
    rounded to the input dtype before the P @ V product, as flash attention does (fp16 matches
    an fp32 reference to ~2e-3, bf16 to ~1.5e-2).

Kernels
    1. split kernel, grid (batch * n_kv_heads, num_splits): each program owns one kv head and one
       contiguous chunk of the sequence (``ceil(seq_len / num_splits)`` rounded up to the tile
       size ``BLOCK_N``, so the chunks of one sequence are balanced whatever its length). It
       loads every query head of the kv head's GQA group as a (GROUP_PAD, head_dim) tile (the
       group padded to >= 16 rows for tensor cores), so each K/V tile is read from HBM once
       per group; the tile's token rows are gathered through the block table (any block size,
       any block order). Online softmax in the exp2 domain; writes a partial output (fp32,
       normalised) and its lse per (batch, head, split).
    2. reduce kernel, one program per (batch, head) row (16 rows under the interpreter): merges
       the partials of all splits by their lse in fp32 and writes the output in q's dtype and
       the final lse.
    Empty splits (a short sequence in a batch with long ones) exit after writing ``lse=-inf``.

``num_splits`` defaults to a heuristic that fills the GPU (about two programs per SM) from the
batch size, ``n_kv_heads`` and the block table's capacity (``max_blocks_per_seq * block_size``,
known on the host, so no device sync); pass a fixed value to keep launches CUDA-graph-stable.

Implementations: ``impl="auto"`` (default) runs the Triton kernels on CUDA tensors, and on CPU
tensors when the Triton interpreter is on (``TRITON_INTERPRET=1``, read once at import, used by
the CPU tests); otherwise (CPU without the interpreter, no triton, float64 inputs) it runs
``paged_decode_attention_torch``, a vectorised PyTorch version. ``paged_decode_attention_reference``
is a per-sequence loop for tests (any float dtype, float64 included).
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # noqa: BLE001 - any import failure means "no triton"
    triton = None
    tl = None
    HAVE_TRITON = False

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_torch",
    "paged_decode_attention_reference",
    "default_num_splits",
    "HAVE_TRITON",
    "INTERPRET",
]

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SPLITS = 128
INTERPRET_BLOCK_N = 32  # tile size under the interpreter (tests may lower it)


def _interpreting() -> bool:
    if not HAVE_TRITON:
        return False
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ``triton.jit`` decides at decoration time whether a kernel is interpreted, so we decide once.
INTERPRET = _interpreting()


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------

if HAVE_TRITON:
    from megatron_k15.kernels.flash_attention import _softcap_args, _tanh  # noqa: F401 (_tanh: by the kernel)

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, BT, SL, MID_O, MID_LSE,
        stride_qb, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh,
        stride_btb,
        stride_mob, stride_moh, stride_mos,
        stride_mlb, stride_mlh,
        n_kv_heads, num_splits, qk_scale, window_left, softcap2,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        b = pid // n_kv_heads
        kvh = pid % n_kv_heads

        seq_len = tl.load(SL + b)
        first = 0
        if WINDOW:  # sliding window: the splits share the last window_left + 1 keys only
            first = tl.maximum(seq_len - 1 - window_left, 0)
        per_split = (seq_len - first + num_splits - 1) // num_splits
        chunk = (per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        start = first + split * chunk
        end = tl.minimum(start + chunk, seq_len)

        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        mask_g = offs_g < GROUP
        mask_d = offs_d < HEAD_DIM
        heads = kvh * GROUP + offs_g

        q_ptrs = Q + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)

        bt_row = BT + b.to(tl.int64) * stride_btb
        k_head = K + kvh.to(tl.int64) * stride_kh
        v_head = V + kvh.to(tl.int64) * stride_vh
        offs_n0 = tl.arange(0, BLOCK_N)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + offs_n0
            mask_n = offs_n < end
            page = tl.load(bt_row + offs_n // PAGE, mask=mask_n, other=0).to(tl.int64)
            in_page = (offs_n % PAGE).to(tl.int64)
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = tl.load(k_head + (page * stride_kb + in_page * stride_ks)[:, None]
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            if SOFTCAP:  # cap * tanh(score / cap) in the log2 domain (softcap2 = cap * log2(e))
                s = softcap2 * _tanh(s / softcap2)
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_head + (page * stride_vb + in_page * stride_vs)[:, None]
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            if UPCAST:
                p = p.to(V.dtype.element_ty).to(tl.float32)
                v = v.to(tl.float32)
            else:
                p = p.to(v.dtype)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PREC)
            m_i = m_new

        nonempty = l_i > 0.0
        l_safe = tl.where(nonempty, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))

        mo_ptrs = (MID_O + b.to(tl.int64) * stride_mob + heads[:, None] * stride_moh
                   + split * stride_mos + offs_d[None, :])
        tl.store(mo_ptrs, out, mask=mask_g[:, None] & mask_d[None, :])
        tl.store(MID_LSE + b.to(tl.int64) * stride_mlb + heads * stride_mlh + split, lse,
                 mask=mask_g)

    @triton.jit
    def _decode_reduce_kernel(
        MID_O, MID_LSE, OUT, LSE,
        n_rows, n_heads, num_splits,
        stride_ob, stride_oh,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
        ROWS: tl.constexpr, SPLITS_PAD: tl.constexpr, SPLIT_TILE: tl.constexpr,
        WRITE_LSE: tl.constexpr,
    ):
        # MID_O (n_rows, num_splits, HEAD_DIM) and MID_LSE (n_rows, num_splits) are contiguous;
        # a row is one (batch, head) pair, row = b * n_heads + h.
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        mask_r = rows < n_rows
        rows64 = rows.to(tl.int64)
        offs_s = tl.arange(0, SPLITS_PAD)
        offs_d = tl.arange(0, HEAD_DIM_PAD)
        mask_d = offs_d < HEAD_DIM

        lse_s = tl.load(MID_LSE + rows64[:, None] * num_splits + offs_s[None, :],
                        mask=mask_r[:, None] & (offs_s[None, :] < num_splits),
                        other=float("-inf"))
        m = tl.max(lse_s, 1)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        denom = tl.sum(tl.exp(lse_s - m_safe[:, None]), 1)

        acc = tl.zeros([ROWS, HEAD_DIM_PAD], dtype=tl.float32)
        offs_t = tl.arange(0, SPLIT_TILE)
        for s0 in range(0, num_splits, SPLIT_TILE):
            sp = s0 + offs_t
            mask_rs = mask_r[:, None] & (sp[None, :] < num_splits)
            w = tl.exp(tl.load(MID_LSE + rows64[:, None] * num_splits + sp[None, :],
                               mask=mask_rs, other=float("-inf")) - m_safe[:, None])
            o = tl.load(MID_O + (rows64[:, None] * num_splits + sp[None, :])[:, :, None] * HEAD_DIM
                        + offs_d[None, None, :],
                        mask=mask_rs[:, :, None] & mask_d[None, None, :], other=0.0)
            acc += tl.sum(w[:, :, None] * o, 1)
        nonempty = denom > 0.0
        d_safe = tl.where(nonempty, denom, 1.0)
        out = acc / d_safe[:, None]
        b = rows64 // n_heads
        h = rows64 % n_heads
        tl.store(OUT + (b * stride_ob + h * stride_oh)[:, None] + offs_d[None, :],
                 out.to(OUT.dtype.element_ty), mask=mask_r[:, None] & mask_d[None, :])
        if WRITE_LSE:
            lse = tl.where(nonempty, m_safe + tl.log(d_safe), float("-inf"))
            tl.store(LSE + rows64, lse, mask=mask_r)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def default_num_splits(batch: int, n_kv_heads: int, max_context: int, device=None,
                       min_chunk: int = 256) -> int:
    """Splits per sequence so that batch * n_kv_heads * splits is about two programs per SM,
    without chunks shorter than ``min_chunk`` tokens (a host-side heuristic: no device sync).
    ``max_context`` is an upper bound on the sequence lengths (e.g. the block table capacity)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    base = max(1, batch * n_kv_heads)
    want = -(-2 * _sm_count(device) // base)
    by_len = max(1, -(-int(max_context) // min_chunk))
    return int(max(1, min(want, by_len, MAX_SPLITS)))


def _check(q, k_cache, v_cache, block_tables, seq_lens):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("block_tables", block_tables), ("seq_lens", seq_lens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be (batch, n_heads, head_dim), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("k_cache and v_cache must both be (num_blocks, block_size, n_kv_heads, "
                         f"head_dim), got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"q, k_cache, v_cache must share a dtype, got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"q must be floating point, got {q.dtype}")
    batch, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"q and cache head_dim differ: {head_dim} vs {k_cache.shape[3]}")
    if n_kv < 1 or n_heads % n_kv:
        raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv})")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be (batch={batch}, max_blocks), got "
                         f"{tuple(block_tables.shape)}")
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens must be (batch={batch},), got {tuple(seq_lens.shape)}")
    if block_tables.dtype not in (torch.int32, torch.int64) or \
            seq_lens.dtype not in (torch.int32, torch.int64):
        raise TypeError("block_tables and seq_lens must be int32 (int64 is accepted)")
    devs = {t.device for t in (q, k_cache, v_cache, block_tables, seq_lens)}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")


def _scale(softmax_scale, head_dim):
    return float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(head_dim)


def _triton_ok(q: torch.Tensor) -> bool:
    if not HAVE_TRITON or q.dtype not in _KERNEL_DTYPES:
        return False
    return q.is_cuda or (INTERPRET and q.device.type == "cpu")


def _launch_cfg(head_dim: int, dtype: torch.dtype):
    if INTERPRET:
        return dict(BLOCK_N=INTERPRET_BLOCK_N), dict(num_warps=1, num_stages=1)
    if head_dim > 256:
        # MLA's latent rows (512 + 64, padded to 1024): 32-key fp32 tiles in two stages took
        # 323 KiB of shared memory on sm_90 and spilled, bf16 162 KiB (more than an L40S or an
        # A10 has); 16-key tiles (tools/compile_kernels.py)
        return dict(BLOCK_N=16), dict(num_warps=8, num_stages=1 if dtype == torch.float32 else 2)
    if head_dim > 128 or dtype == torch.float32:
        # 8 warps: with 4, fp32 at d256 spilled 5.4 KB per thread on sm_90 (compile_kernels.py)
        return dict(BLOCK_N=32), dict(num_warps=8, num_stages=2)
    return dict(BLOCK_N=64), dict(num_warps=4, num_stages=3)


def _paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits,
                         return_lse, window_left=-1, softcap=0.0):
    batch, n_heads, head_dim = q.shape
    page, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache/v_cache must be contiguous in head_dim")
    block_tables = block_tables.to(torch.int32)
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()

    if num_splits is None:
        context = block_tables.shape[1] * page
        if window_left >= 0:
            context = min(context, window_left + 1)
        num_splits = default_num_splits(batch, n_kv, context, q.device)
    num_splits = int(num_splits)
    if not 1 <= num_splits <= 4096:
        raise ValueError(f"num_splits must be in [1, 4096], got {num_splits}")

    out = torch.empty_like(q)
    lse = torch.empty(batch, n_heads, device=q.device, dtype=torch.float32) if return_lse else out
    if batch == 0:
        return out, (lse if return_lse else None)
    mid_o = torch.empty(batch, n_heads, num_splits, head_dim, device=q.device,
                        dtype=torch.float32)
    mid_lse = torch.empty(batch, n_heads, num_splits, device=q.device, dtype=torch.float32)

    meta, launch = _launch_cfg(head_dim, q.dtype)
    softcap2, capped = _softcap_args(softcap)
    hd_pad = _next_pow2(max(head_dim, 16))
    _decode_split_kernel[(batch * n_kv, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, mid_o, mid_lse,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        n_kv, num_splits, scale * LOG2E, max(window_left, 0), softcap2,
        GROUP=group, GROUP_PAD=max(16, _next_pow2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=hd_pad, PAGE=page,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=INTERPRET and q.dtype != torch.float32, WINDOW=window_left >= 0, SOFTCAP=capped,
        **meta, **launch,
    )
    n_rows = batch * n_heads
    splits_pad = _next_pow2(num_splits)
    if INTERPRET:  # few big programs: the interpreter's cost is per operation, not per element
        rows, split_tile = 16, splits_pad
    else:
        rows, split_tile = 1, max(1, min(splits_pad, 2048 // hd_pad))
    _decode_reduce_kernel[(triton.cdiv(n_rows, rows),)](
        mid_o, mid_lse, out, lse,
        n_rows, n_heads, num_splits,
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=hd_pad,
        ROWS=rows, SPLITS_PAD=splits_pad, SPLIT_TILE=split_tile,
        WRITE_LSE=return_lse,
        num_warps=1 if INTERPRET else 4,
    )
    return out, (lse if return_lse else None)


def _gather_padded(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """(batch, max_len, n_kv, head_dim) view of each sequence's first max_len cache rows
    (one ``index_select`` of whole blocks: several times faster than advanced indexing)."""
    batch, page = block_tables.shape[0], cache.shape[1]
    n_blocks_needed = -(-max_len // page)
    bt = block_tables[:, :n_blocks_needed].reshape(-1).long()
    g = cache.index_select(0, bt)  # (batch * nb, page, n_kv, d)
    return g.view(batch, n_blocks_needed * page, cache.shape[2], cache.shape[3])[:, :max_len]


def paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, softmax_scale=None,
                                 return_lse=False, max_seq_len: Optional[int] = None, validate: bool = True,
                                 window_left: int = -1, softcap: float = 0.0):
    """Vectorised PyTorch fallback with the semantics of ``paged_decode_attention``.

    Gathers each sequence's K/V (padded to the longest sequence, or ``max_seq_len``); without
    ``return_lse`` one masked SDPA call (its fused CPU/GPU kernels), otherwise explicit fp32
    scores (float64 stays float64), as with a score ``softcap``. Memory: O(batch * max_len * n_kv * head_dim)."""
    if validate:
        _check(q, k_cache, v_cache, block_tables, seq_lens)
    batch, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[2]
    group = n_heads // n_kv
    scale = _scale(softmax_scale, head_dim)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max().item()) if batch else 0
    max_len = max(1, int(max_seq_len))
    lens = seq_lens.to(q.device)[:, None]
    page = k_cache.shape[1]
    if 0 <= window_left and -(-(window_left + 1) // page) + 1 < -(-max_len // page):
        # only the blocks a window can touch, from each row's first one: a sliding layer costs
        # O(window), and the blocks it gave back (``PagedKVCache`` with layer windows) are not read
        n_win = -(-(window_left + 1) // page) + 1
        first = (lens - 1 - window_left).clamp(min=0) // page  # (b, 1)
        cols = (first + torch.arange(n_win, device=q.device)).clamp(max=block_tables.shape[1] - 1)
        block_tables = block_tables.gather(1, cols.long())
        max_len = n_win * page
        pos = first * page + torch.arange(max_len, device=q.device)[None, :]
    else:
        pos = torch.arange(max_len, device=q.device)[None, :]
    valid = pos < lens
    if window_left >= 0:
        valid = valid & (pos >= lens - 1 - window_left)
    if not return_lse and q.dtype != torch.float64 and not softcap:
        # one fused SDPA call over the gathered, padded K/V; GQA without repeating kv heads:
        # the query heads of a group are the query "rows" of their kv head, (b, kv, group, d)
        k = _gather_padded(k_cache, block_tables, max_len).transpose(1, 2)  # (b, kv, n, d)
        v = _gather_padded(v_cache, block_tables, max_len).transpose(1, 2)
        padded = window_left >= 0 or (bool((seq_lens < max_len).any()) if batch else False)
        out = torch.nn.functional.scaled_dot_product_attention(
            q.reshape(batch, n_kv, group, head_dim), k.to(q.dtype), v.to(q.dtype),
            attn_mask=valid[:, None, None, :] if padded else None, scale=scale)
        out = out.reshape(batch, n_heads, head_dim)
        if padded and bool((seq_lens == 0).any()):  # no keys at all: 0, not NaN
            out = torch.where(valid.any(dim=1)[:, None, None], out, torch.zeros_like(out))
        return out
    k = _gather_padded(k_cache, block_tables, max_len).to(cdt)  # (b, n, kv, d)
    v = _gather_padded(v_cache, block_tables, max_len).to(cdt)
    qg = q.to(cdt).reshape(batch, n_kv, group, head_dim)
    s = torch.einsum("bkgd,bnkd->bkgn", qg, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (b, kv, g); -inf for empty sequences
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    o = torch.einsum("bkgn,bnkd->bkgd", p, v)
    out = o.reshape(batch, n_heads, head_dim).to(q.dtype)
    if return_lse:
        return out, lse.reshape(batch, n_heads).float()
    return out


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, seq_lens,
                                     softmax_scale=None, return_lse=False, window_left: int = -1,
                                     softcap: float = 0.0):
    """Plain per-sequence PyTorch reference (computes in fp32, or float64 for float64 inputs).

    For each sequence: gather its ``seq_len`` K/V rows (the last ``window_left + 1`` with a
    sliding window) through the block table, repeat the kv heads over their query group,
    softmax(q k^T * scale) v. Returns (out[, lse]) like ``paged_decode_attention``."""
    _check(q, k_cache, v_cache, block_tables, seq_lens)
    batch, n_heads, head_dim = q.shape
    page, n_kv = k_cache.shape[1], k_cache.shape[2]
    group = n_heads // n_kv
    scale = _scale(softmax_scale, head_dim)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(batch, n_heads, head_dim, dtype=cdt, device=q.device)
    lse = torch.full((batch, n_heads), float("-inf"), dtype=cdt, device=q.device)
    for b in range(batch):
        n = int(seq_lens[b])
        if n == 0:
            continue
        pos = torch.arange(max(n - 1 - window_left, 0) if window_left >= 0 else 0, n, device=q.device)
        blocks = block_tables[b].long()[pos // page]
        k = k_cache[blocks, pos % page].to(cdt).repeat_interleave(group, dim=1)  # (n, h, d)
        v = v_cache[blocks, pos % page].to(cdt).repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].to(cdt), k) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        lse[b] = torch.logsumexp(s, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v)
    out = out.to(q.dtype)
    if return_lse:
        return out, lse.float()
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor,
                           softmax_scale: Optional[float] = None,
                           num_splits: Optional[int] = None, return_lse: bool = False,
                           *, impl: str = "auto", max_seq_len: Optional[int] = None, validate: bool = True,
                           window_left: int = -1, softcap: float = 0.0):
    """Attention of one new query token per sequence over a paged KV cache (module docstring).

    Args:
        q: (batch, n_heads, head_dim).
        k_cache, v_cache: (num_blocks, block_size, n_kv_heads, head_dim).
        block_tables: (batch, max_blocks_per_seq) int32 physical block ids.
        seq_lens: (batch,) int32 valid tokens per sequence (current token included).
        softmax_scale: defaults to ``head_dim ** -0.5``.
        num_splits: KV chunks per sequence processed in parallel (default: heuristic).
        return_lse: also return the (batch, n_heads) fp32 log-sum-exp.
        impl: ``"auto"`` | ``"triton"`` | ``"torch"``; the environment variable
            ``MEGATRON_K15_DECODE_ATTN_IMPL`` overrides ``"auto"``.
        max_seq_len: the longest of ``seq_lens`` when the caller knows it on the host (the torch
            path then reads nothing back from the device).
        validate: check the arguments (a decode step's layers share the tables and shapes: the
            engine checks its first layer's call only).
        window_left: a sliding window (>= 0): the query sees only the last ``window_left + 1``
            tokens of its sequence (itself included); -1: all of them.
        softcap: > 0: scores s become softcap * tanh(s / softcap) (Gemma 2); 0: none.

    Returns:
        out (batch, n_heads, head_dim) in q's dtype, and lse when ``return_lse``.
    """
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("MEGATRON_K15_DECODE_ATTN_IMPL", "auto")
    if validate:
        _check(q, k_cache, v_cache, block_tables, seq_lens)
        if softcap:
            from megatron_k15.kernels.flash_attention import check_softcap

            softcap = check_softcap(softcap)
    if impl == "auto":
        impl = "triton" if _triton_ok(q) else "torch"
    if impl == "torch":
        return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens,
                                            softmax_scale, return_lse, max_seq_len, validate=False,
                                            window_left=window_left, softcap=softcap)
    if not _triton_ok(q):
        raise RuntimeError(
            f"the Triton decode kernel needs triton and CUDA tensors of fp16/bf16/fp32 (got "
            f"{q.dtype} on {q.device}); on CPU set TRITON_INTERPRET=1 before importing triton")
    scale = _scale(softmax_scale, q.shape[-1])
    out, lse = _paged_decode_triton(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                    num_splits, return_lse, int(window_left), float(softcap))
    return (out, lse) if return_lse else out
