"""Ring attention over the context-parallel group, on our Triton flash-attention kernels.

Public API (DESIGN.md sections 2 and 4)::

    out[, lse] = ring_attn_func(q, k, v, group, causal=True, softmax_scale=None,
                                comm_type="ring", cu_seqlens=None, max_seqlen=None,
                                return_lse=False)

Layout
    q, k, v are this rank's zigzag shard (``parallel.context.zigzag_split``): dense
    ``(batch, 2c, heads, head_dim)`` holding chunks ``r`` and ``2cp-1-r`` of ``2cp`` (``c``
    tokens each), or packed ``(tokens, heads, head_dim)`` with the *local* ``cu_seqlens`` from
    ``zigzag_split_varlen`` (every local sequence ``[chunk r | chunk 2cp-1-r]``, even length).
    GQA as in ``flash_attn_func``. ``out`` is like q; ``lse`` is (batch, heads, 2c) or
    (heads, tokens), fp32, and differentiable.

comm_type="ring" (default)
    Step ``i`` (0..cp-1) works on the K/V of source rank ``j = (r - i) mod cp``; the K/V for
    step ``i + 1`` is already in flight (``batch_isend_irecv`` to the next rank, from the
    previous one) while step ``i`` computes. With half-chunks ``q = [qA | qB]`` (chunk ids ``r``
    and ``2cp-1-r``) and received ``kv = [kA' | kB']`` (``j`` and ``2cp-1-j``), the causal mask
    leaves (causal = True):

        step 0 (j == r):  q x kv causal, one call (the local order is increasing in position)
        j < r:            q x kA' with no mask (both local halves come after chunk j)
        j > r:            qB x kv with no mask (chunk 2cp-1-r comes after both; qA sees none)

    so every step after the first costs half a step-0 block of work per rank, the same on every
    rank. Packed sequences run c x c varlen calls per half pair (step 0: qA x kA causal,
    qB x kA, qB x kB causal), in an internal layout with all first halves, then all second
    halves (one permutation on entry and exit), so halves are slices with their own cu_seqlens.
    Partial outputs are merged with their lse into fp32 accumulators by one fused Triton pass:
    ``lse = logaddexp(lse_a, lse_b)``, weights ``exp(lse_x - lse)``, rows that have seen no
    key (lse = -inf on both sides) stay out = 0, lse = -inf, without NaN.

    Backward re-runs the ring: K/V travel again (prefetched one step ahead), each block's dQ,
    dK, dV come from the kernels' backward given the *global* out and lse (so P and
    delta = rowsum(dO * O) - dlse are the global ones), and an fp32 dK/dV accumulator travels
    with its K/V: rank r adds its contribution for source j and passes the sum on; after cp
    steps one more hop returns each accumulator to its owner.

comm_type="allgather"
    All-gather K/V of the group (Llama 3 style; backward: reduce-scatter of dK/dV), reorder to
    the original sequence and run local q against the prefix it may see (bottom-right causal):
    chunk ``m`` sees keys ``[0, (m + 1) c)``. Simple, good for short sequences, and an
    independent numerical cross-check of the ring. (Packed sequences loop over sequences.)

Without a group (or a group of one) both reduce to ``flash_attn_func`` on the local tokens.

``simulate_ring_attn`` runs the ring schedule for cp virtual ranks in one process (tests and
``bench/ring_attention.py``).

Caveats: non-causal attention with padded packed sequences lets queries see the pad keys (pad
to exact multiples of 2*cp, or use causal); the varlen path reads ``cu_seqlens`` on the host
once per call.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import triton
import triton.language as tl

from megatron_k15.kernels import flash_attention as _fa
from megatron_k15.parallel.context import all_gather_cp, zigzag_chunk_ids

__all__ = ["ring_attn_func", "simulate_ring_attn", "merge_attn_outputs", "merge_inplace",
           "COMM_TYPES"]

COMM_TYPES = ("ring", "allgather")
ALL = "all"  # block selector: the whole local tensor; 0 / 1: first / second half-chunk


# ----------------------------------------------------------------------------------------------
# Local layout: the two half-chunks of a dense or packed local tensor
# ----------------------------------------------------------------------------------------------


class _Parts:
    """Half-chunk views of local tensors.

    Dense (b, 2c, ...): the halves are slices along the sequence dim. Packed (t, ...): every
    local sequence is ``[half 0 | half 1]``; the ring works in an internal layout with all
    halves 0 first, then all halves 1 (one permutation on entry and one on exit, shared by every
    rank since all ranks have the same local ``cu_seqlens``), so that halves are slices there
    too, with their own ``cu_seqlens`` (``cu_half``)."""

    def __init__(self, varlen: bool, n_local: int, cu_seqlens=None, max_seqlen=None,
                 device=None):
        self.varlen = varlen
        if not varlen:
            if n_local % 2:
                raise ValueError(f"the local sequence length {n_local} is odd: q, k, v must hold "
                                 "two zigzag chunks of equal length (see zigzag_split)")
            self.c = n_local // 2
            return
        cu = [int(x) for x in cu_seqlens.tolist()]
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        odd = [i for i, n in enumerate(lengths) if n % 2]
        if odd:
            raise ValueError(
                f"local packed sequence {odd[0]} has odd length {lengths[odd[0]]}: every local "
                "sequence must hold two equal zigzag chunks (use zigzag_split_varlen)")
        halves = [n // 2 for n in lengths]
        empty = torch.zeros(0, dtype=torch.int64)
        idx0 = torch.cat([torch.arange(a, a + h) for a, h in zip(cu[:-1], halves)] or [empty])
        idx1 = torch.cat([torch.arange(a + h, a + 2 * h) for a, h in zip(cu[:-1], halves)]
                         or [empty])
        perm = torch.cat([idx0, idx1])
        self.perm = perm.to(device)
        self.inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel())).to(device)
        self.c = int(idx0.numel())
        cu_half = [0]
        for h in halves:
            cu_half.append(cu_half[-1] + h)
        self.cu_half = torch.tensor(cu_half, dtype=torch.int32, device=device)
        self.max_half = max(halves, default=0)

    # token-major tensors: dense (b, s, h, d), packed (t, h, d)
    def tok(self, x: torch.Tensor, sel) -> torch.Tensor:
        if sel == ALL:
            return x
        return x.narrow(0 if self.varlen else 1, sel * self.c, self.c)

    # lse-like tensors: dense (b, h, s), packed (h, t)
    def lse(self, x: torch.Tensor, sel) -> torch.Tensor:
        if sel == ALL:
            return x
        return x.narrow(1 if self.varlen else 2, sel * self.c, self.c)

    def cu(self, sel):
        if not self.varlen:
            return None, 0
        if sel == ALL:
            raise AssertionError("packed blocks are half x half")
        return self.cu_half, self.max_half

    def to_internal(self, x: Optional[torch.Tensor], lse_like: bool = False):
        if x is None or not self.varlen:
            return x
        return x.index_select(1 if lse_like else 0, self.perm)

    def to_external(self, x: torch.Tensor, lse_like: bool = False):
        if not self.varlen:
            return x
        return x.index_select(1 if lse_like else 0, self.inv)

    def merge(self, out_acc, lse_acc, sel, out, lse) -> None:
        """out_acc/lse_acc (fp32, whole local) <- merge with a block's (out, lse) on rows sel."""
        merge_inplace(self.tok(out_acc, sel), self.lse(lse_acc, sel), out, lse,
                      varlen=self.varlen)


def merge_attn_outputs(out_a, lse_a, out_b, lse_b, varlen: bool = False):
    """Merge two partial attention results over disjoint key sets, in fp32.

    out (..., s, h, d) / lse dense (b, h, s) or packed out (t, h, d) / lse (h, t). Returns
    (out, lse) fp32. Rows where both lse are -inf (no key seen) stay out = 0, lse = -inf, and no
    NaN appears anywhere (forward or backward through this function)."""
    la, lb = lse_a.float(), lse_b.float()
    m = torch.maximum(la, lb)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    lse = m + torch.log(torch.exp(la - m) + torch.exp(lb - m))
    safe = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    wa, wb = torch.exp(la - safe), torch.exp(lb - safe)
    if varlen:  # (h, t) -> (t, h, 1)
        wa, wb = wa.t().unsqueeze(-1), wb.t().unsqueeze(-1)
    else:  # (b, h, s) -> (b, s, h, 1)
        wa, wb = wa.transpose(1, 2).unsqueeze(-1), wb.transpose(1, 2).unsqueeze(-1)
    return out_a.float() * wa + out_b.float() * wb, lse


@triton.jit
def _merge_kernel(
    O, L, OB, LB,
    stride_ob, stride_os, stride_oh, stride_bb, stride_bs, stride_bh,
    stride_lb, stride_lh, stride_ls, stride_mb, stride_mh, stride_ms,
    seqlen, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """In place: (O, L) <- merge((O, L), (OB, LB)); O fp32, L fp32, OB any float dtype.
    Grid (batch * heads, row blocks): batch x heads may pass CUDA's 65535 limit of grid
    dimension 1, the row blocks of one rank's chunk (seqlen / 64) do not."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_s = (pid_s * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_s < seqlen
    l_ptrs = L + b * stride_lb + h * stride_lh + offs_s * stride_ls
    la = tl.load(l_ptrs, mask=ok, other=float("-inf"))
    lb = tl.load(LB + b * stride_mb + h * stride_mh + offs_s * stride_ms, mask=ok,
                 other=float("-inf"))
    m = tl.maximum(la, lb)
    m = tl.where(m == float("-inf"), 0.0, m)  # rows with no key on either side
    ea = tl.exp(la - m)
    eb = tl.exp(lb - m)
    total = ea + eb
    has_key = total > 0.0
    inv = tl.where(has_key, 1.0 / tl.where(has_key, total, 1.0), 0.0)
    o_ptrs = O + b * stride_ob + h * stride_oh + (offs_s * stride_os)[:, None] + offs_d[None, :]
    ob_ptrs = OB + b * stride_bb + h * stride_bh + (offs_s * stride_bs)[:, None] + offs_d[None, :]
    oa = tl.load(o_ptrs, mask=ok[:, None], other=0.0)
    ob = tl.load(ob_ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    o = oa * (ea * inv)[:, None] + ob * (eb * inv)[:, None]
    tl.store(o_ptrs, o, mask=ok[:, None])
    lse = tl.where(has_key, m + tl.log(tl.where(has_key, total, 1.0)), float("-inf"))
    tl.store(l_ptrs, lse, mask=ok)


_MERGE_BLOCK_S = 64


def merge_inplace(out_acc, lse_acc, out, lse, varlen: bool = False) -> None:
    """``(out_acc, lse_acc) <- merge_attn_outputs(out_acc, lse_acc, out, lse)`` in one fused pass
    (Triton; views with any strides; out_acc and lse_acc fp32). Same layouts as
    :func:`merge_attn_outputs`."""
    if out_acc.numel() == 0:
        return
    if varlen:  # (t, h, d) / (h, t) as batch 1
        seqlen, n_heads, head_dim = out_acc.shape
        batch = 1
        so = (0, out_acc.stride(0), out_acc.stride(1))
        sb = (0, out.stride(0), out.stride(1))
        sl = (0, lse_acc.stride(0), lse_acc.stride(1))
        sm = (0, lse.stride(0), lse.stride(1))
    else:
        batch, seqlen, n_heads, head_dim = out_acc.shape
        so = out_acc.stride()[:3]
        sb = out.stride()[:3]
        sl = lse_acc.stride()
        sm = lse.stride()
    if out_acc.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError("merge_inplace needs a contiguous last dim")
    grid = (batch * n_heads, triton.cdiv(seqlen, _MERGE_BLOCK_S))
    _merge_kernel[grid](out_acc, lse_acc, out, lse, *so, *sb, *sl, *sm, seqlen, n_heads,
                        HEAD_DIM=head_dim, BLOCK_S=_MERGE_BLOCK_S)


# ----------------------------------------------------------------------------------------------
# The schedule, and one step of work (shared by the real ring and the simulation)
# ----------------------------------------------------------------------------------------------


def ring_step_plan(step: int, rank: int, cp_size: int, causal: bool, varlen: bool = False):
    """Blocks ``(q_sel, k_sel, causal)`` that rank ``rank`` computes at ``step`` against the
    K/V of source rank ``(rank - step) mod cp_size``."""
    if not causal:
        return [(0, 0, False), (0, 1, False), (1, 0, False), (1, 1, False)] if varlen else \
            [(ALL, ALL, False)]
    if step == 0:  # local order is increasing in position: one causal call (dense)
        return [(0, 0, True), (1, 0, False), (1, 1, True)] if varlen else [(ALL, ALL, True)]
    src = (rank - step) % cp_size
    if src < rank:  # both local chunks see all of chunk src, nothing of chunk 2cp-1-src
        return [(0, 0, False), (1, 0, False)] if varlen else [(ALL, 0, False)]
    # src > rank: only chunk 2cp-1-r sees anything, and it sees both received chunks
    return [(1, 0, False), (1, 1, False)] if varlen else [(1, ALL, False)]


def _block_forward(q, k, v, parts: _Parts, qs, ks, causal, scale):
    cu, max_s = parts.cu(qs)
    return _fa._forward(parts.tok(q, qs), parts.tok(k, ks), parts.tok(v, ks), cu, max_s,
                        causal, scale)


def _forward_step(q, k, v, parts, plan, scale, out_acc, lse_acc):
    for qs, ks, causal in plan:
        o, l = _block_forward(q, k, v, parts, qs, ks, causal, scale)
        parts.merge(out_acc, lse_acc, qs, o, l)


def _backward_step(dout, dlse, q, k, v, out, lse, parts, plan, scale, dq_acc, dk_acc, dv_acc):
    """Adds this step's dq (into dq_acc) and dk/dv of the step's K/V (into dk_acc/dv_acc)."""
    for qs, ks, causal in plan:
        cu, max_s = parts.cu(qs)
        lse_s = parts.lse(lse, qs).contiguous()  # the kernels index delta with lse's strides
        dlse_s = None if dlse is None else parts.lse(dlse, qs).contiguous()
        dq, dk, dv = _fa._backward(parts.tok(dout, qs), dlse_s, parts.tok(q, qs),
                                   parts.tok(k, ks), parts.tok(v, ks), parts.tok(out, qs), lse_s,
                                   cu, max_s, causal, scale)
        parts.tok(dq_acc, qs).add_(dq)
        parts.tok(dk_acc, ks).add_(dk)
        parts.tok(dv_acc, ks).add_(dv)


def _empty_acc(q, varlen):
    if varlen:
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device,
                         dtype=torch.float32)
    else:
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device,
                         dtype=torch.float32)
    return torch.zeros(q.shape, device=q.device, dtype=torch.float32), lse


# ----------------------------------------------------------------------------------------------
# The ring over a process group
# ----------------------------------------------------------------------------------------------


class _Ring:
    def __init__(self, group):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.size)

    def exchange(self, sends: Sequence[torch.Tensor], recvs: Sequence[torch.Tensor], tag: int):
        """Send to the next rank and receive from the previous one; returns the requests."""
        ops = [dist.P2POp(dist.isend, t, self.next, self.group, tag=tag + i)
               for i, t in enumerate(sends)]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag=tag + i)
                for i, t in enumerate(recvs)]
        return dist.batch_isend_irecv(ops)


def _wait(reqs):
    for r in reqs or ():
        r.wait()


_TAG_KV, _TAG_DKV, _TAG_HALO = 0, 2, 4


def _ring_forward(q, k, v, parts: _Parts, ring: _Ring, causal: bool, scale: float):
    out_acc, lse_acc = _empty_acc(q, parts.varlen)
    k_cur, v_cur = k, v
    for step in range(ring.size):
        reqs = None
        if step + 1 < ring.size:  # prefetch the next step's K/V before computing this one
            k_nxt, v_nxt = torch.empty_like(k), torch.empty_like(v)
            reqs = ring.exchange([k_cur, v_cur], [k_nxt, v_nxt], _TAG_KV)
        plan = ring_step_plan(step, ring.rank, ring.size, causal, parts.varlen)
        _forward_step(q, k_cur, v_cur, parts, plan, scale, out_acc, lse_acc)
        if reqs is not None:
            _wait(reqs)
            k_cur, v_cur = k_nxt, v_nxt
    return out_acc.to(q.dtype), lse_acc


def _ring_backward(dout, dlse, q, k, v, out, lse, parts: _Parts, ring: _Ring, causal: bool,
                   scale: float):
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    k_cur, v_cur = k, v
    dkv_reqs, in_flight = None, None
    recv_dk = recv_dv = None
    for step in range(ring.size):
        kv_reqs = None
        if step + 1 < ring.size:
            k_nxt, v_nxt = torch.empty_like(k), torch.empty_like(v)
            kv_reqs = ring.exchange([k_cur, v_cur], [k_nxt, v_nxt], _TAG_KV)
        dk_acc = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv_acc = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
        plan = ring_step_plan(step, ring.rank, ring.size, causal, parts.varlen)
        _backward_step(dout, dlse, q, k_cur, v_cur, out, lse, parts, plan, scale,
                       dq_acc, dk_acc, dv_acc)
        if dkv_reqs is not None:  # the accumulator of this K/V from the ranks before us
            _wait(dkv_reqs)
            dk_acc.add_(recv_dk)
            dv_acc.add_(recv_dv)
        # pass it on; after the last step this hop delivers every accumulator to its owner
        recv_dk, recv_dv = torch.empty_like(dk_acc), torch.empty_like(dv_acc)
        in_flight = (dk_acc, dv_acc)  # keep the send buffers alive until the hop completes
        dkv_reqs = ring.exchange([dk_acc, dv_acc], [recv_dk, recv_dv], _TAG_DKV)
        if kv_reqs is not None:
            _wait(kv_reqs)
            k_cur, v_cur = k_nxt, v_nxt
    _wait(dkv_reqs)
    del in_flight
    return dq_acc.to(q.dtype), recv_dk.to(k.dtype), recv_dv.to(v.dtype)


class _RingAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, cu_seqlens, max_seqlen):
        ring = _Ring(group)
        varlen = cu_seqlens is not None
        parts = _Parts(varlen, q.shape[0] if varlen else q.shape[1], cu_seqlens, max_seqlen,
                       q.device)
        qi, ki, vi = (parts.to_internal(t) for t in (q, k, v))
        out, lse = _ring_forward(qi, ki, vi, parts, ring, causal, scale)
        out, lse = parts.to_external(out), parts.to_external(lse, lse_like=True)
        # packed: keep the caller's layout only (re-permuted in backward; no extra copies held)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.parts, ctx.causal, ctx.scale = ring, parts, causal, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        parts = ctx.parts
        if dout is None:
            dout = torch.zeros_like(out)
        q, k, v, out, dout = (parts.to_internal(t) for t in (q, k, v, out, dout))
        lse, dlse = parts.to_internal(lse, True), parts.to_internal(dlse, True)
        dq, dk, dv = _ring_backward(dout.contiguous(), dlse, q, k, v, out, lse, parts, ctx.ring,
                                    ctx.causal, ctx.scale)
        return (parts.to_external(dq), parts.to_external(dk), parts.to_external(dv),
                None, None, None, None, None)


# ----------------------------------------------------------------------------------------------
# All-gather K/V variant
# ----------------------------------------------------------------------------------------------


def _allgather_attn(q, k, v, group, causal, scale, cu_seqlens, window_size=(-1, -1)):
    cp = dist.get_world_size(group)
    rank = dist.get_rank(group)
    varlen = cu_seqlens is not None
    seq_dim = 0 if varlen else 1
    kv = all_gather_cp(torch.stack([k, v]), seq_dim + 1, group)  # rank order, differentiable
    kv_ranks = kv.chunk(cp, dim=seq_dim + 1)
    chunk_ids = zigzag_chunk_ids(cp, rank)

    def full_order(c_len, offset):
        """The 2cp chunks of one sequence in original order, from each rank's local slice."""
        chunks = [None] * (2 * cp)
        for r, t in enumerate(kv_ranks):
            a, b = zigzag_chunk_ids(cp, r)
            chunks[a] = t.narrow(seq_dim + 1, offset, c_len)
            chunks[b] = t.narrow(seq_dim + 1, offset + c_len, c_len)
        return torch.cat(chunks, dim=seq_dim + 1)

    def attend(qq, kvf, c_len):
        """qq: this rank's two chunks (batch dim present); kvf: (2, b, 2cp*c, hkv, d)."""
        if not causal:
            return _fa.flash_attn_func(qq, kvf[0], kvf[1], causal=False, softmax_scale=scale,
                                       return_lse=True)
        outs, lses = [], []
        for half, m in enumerate(chunk_ids):  # chunk m sees keys [0, (m + 1) c), bottom-right
            qh = qq[:, half * c_len:(half + 1) * c_len]
            n_keys = (m + 1) * c_len
            o, l = _fa.flash_attn_func(qh, kvf[0][:, :n_keys], kvf[1][:, :n_keys], causal=True,
                                       softmax_scale=scale, return_lse=True,
                                       window_size=window_size)
            outs.append(o)
            lses.append(l)
        return torch.cat(outs, 1), torch.cat(lses, 2)

    if not varlen:
        c = q.shape[1] // 2
        return attend(q, full_order(c, 0), c)

    cu = [int(x) for x in cu_seqlens.tolist()]
    outs, lses = [], []
    for a, b in zip(cu[:-1], cu[1:]):
        n = b - a
        if n == 0:
            outs.append(q[a:b])
            lses.append(q.new_zeros((q.shape[1], 0), dtype=torch.float32))
            continue
        c = n // 2
        # kv_ranks[r]: (2, T_local, hkv, d); add a batch dim for flash_attn_func
        kvf = full_order(c, a).unsqueeze(1)
        o, l = attend(q[None, a:b], kvf, c)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs, 0), torch.cat(lses, 1)


# ----------------------------------------------------------------------------------------------
# Sliding windows: a neighbour (halo) exchange instead of the ring
# ----------------------------------------------------------------------------------------------
# A causal window of left <= c (the zigzag chunk length) reaches back at most one chunk: rank r's
# chunk r needs chunk r - 1 (rank r - 1's first) and its chunk 2cp-1-r needs chunk 2cp-2-r (rank
# r + 1's second, or its own first on the last rank). So each rank sends its first chunk to the
# next rank and its second to the previous one: 2c tokens of K/V moved per rank whatever cp is,
# and each chunk attends over [previous chunk; itself] with the window (q shorter than k,
# bottom-right causal), instead of cp ring steps over the whole sequence.


def _neighbour_exchange(to_next: torch.Tensor, to_prev: torch.Tensor, group):
    """Send ``to_next`` to rank r + 1 and ``to_prev`` to rank r - 1 (no wrap around); returns
    (what rank r - 1 sent, what rank r + 1 sent), None at the ends."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    ops, from_prev, from_next = [], None, None
    if rank + 1 < size:
        nxt = dist.get_global_rank(group, rank + 1)
        from_next = torch.empty_like(to_prev)
        ops += [dist.P2POp(dist.isend, to_next.contiguous(), nxt, group, tag=_TAG_HALO),
                dist.P2POp(dist.irecv, from_next, nxt, group, tag=_TAG_HALO + 1)]
    if rank > 0:
        prv = dist.get_global_rank(group, rank - 1)
        from_prev = torch.empty_like(to_next)
        ops += [dist.P2POp(dist.isend, to_prev.contiguous(), prv, group, tag=_TAG_HALO + 1),
                dist.P2POp(dist.irecv, from_prev, prv, group, tag=_TAG_HALO)]
    _wait(dist.batch_isend_irecv(ops) if ops else None)
    return from_prev, from_next


class _HaloExchange(torch.autograd.Function):
    """(chunk r - 1, chunk 2cp-2-r) of the neighbours from this rank's (first, second) chunks;
    a missing neighbour gives zeros (the caller does not read them). Backward returns each
    received chunk's gradient to its owner."""

    @staticmethod
    def forward(ctx, first, second, group):
        ctx.group = group
        from_prev, from_next = _neighbour_exchange(first, second, group)
        return (torch.zeros_like(first) if from_prev is None else from_prev,
                torch.zeros_like(second) if from_next is None else from_next)

    @staticmethod
    def backward(ctx, d_prev, d_next):
        # what rank r - 1 sent me (its first chunk) goes back to it, and so on (autograd
        # materialises the gradient of an unused output as zeros)
        back_from_prev, back_from_next = _neighbour_exchange(d_next, d_prev, ctx.group)
        d_first = torch.zeros_like(d_prev) if back_from_next is None else back_from_next
        d_second = torch.zeros_like(d_next) if back_from_prev is None else back_from_prev
        return d_first, d_second, None


def halo_fits(window_left: int, chunk_lengths) -> bool:
    """Whether the neighbour exchange covers a window: every chunk at least ``left`` long."""
    return window_left >= 0 and all(int(c) >= max(window_left, 1) for c in chunk_lengths)


def _halo_attn(q, k, v, group, scale, cu_seqlens, window_size):
    """Sliding-window attention of this rank's zigzag shard (module comment above); returns
    (out, lse) in the caller's layout."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    varlen = cu_seqlens is not None
    sd = 0 if varlen else 1  # sequence dim
    if varlen:
        bounds = [int(x) for x in cu_seqlens.tolist()]
        spans = [(a, (b - a) // 2) for a, b in zip(bounds[:-1], bounds[1:])]
    else:
        spans = [(0, q.shape[1] // 2)]
    kv = torch.stack([k, v])  # (2, ...): one exchange for both
    first = torch.cat([kv.narrow(sd + 1, a, c) for a, c in spans], sd + 1)
    second = torch.cat([kv.narrow(sd + 1, a + c, c) for a, c in spans], sd + 1)
    prev_first, next_second = _HaloExchange.apply(first, second, group)
    outs, lses, off = [], [], 0
    for a, c in spans:
        own = kv.narrow(sd + 1, a, 2 * c)
        halo = (prev_first.narrow(sd + 1, off, c) if rank > 0 else None,
                next_second.narrow(sd + 1, off, c) if rank + 1 < cp else own.narrow(sd + 1, 0, c))
        off += c
        for half in (0, 1):  # chunk r over [chunk r - 1; chunk r], chunk 2cp-1-r likewise
            mine = own.narrow(sd + 1, half * c, c)
            keys = mine if halo[half] is None else torch.cat([halo[half], mine], sd + 1)
            qh = q.narrow(sd, a + half * c, c)
            if varlen:
                qh, keys = qh[None], keys[:, None]
            o, l = _fa.flash_attn_func(qh, keys[0], keys[1], causal=True, softmax_scale=scale,
                                       return_lse=True, window_size=window_size)
            outs.append(o[0] if varlen else o)
            lses.append(l[0] if varlen else l)
    return torch.cat(outs, sd), torch.cat(lses, -1)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def ring_attn_func(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group=None,
                   causal: bool = True, softmax_scale: Optional[float] = None,
                   comm_type: str = "ring", cu_seqlens: Optional[torch.Tensor] = None,
                   max_seqlen: Optional[int] = None, return_lse: bool = False,
                   window_size: tuple = (-1, -1)):
    """Context-parallel attention of this rank's zigzag shard against the whole sequence.

    q (batch, 2c, heads, head_dim), k/v (batch, 2c, kv_heads, head_dim): chunks ``r`` and
    ``2cp-1-r`` of the sequence (``zigzag_split``); with ``cu_seqlens`` (local, int32, from
    ``zigzag_split_varlen``) packed (tokens, heads, head_dim). ``group``: the cp process group
    (``parallel_state.get_context_parallel_group()``); ``None`` means the default group when
    torch.distributed is initialised, else no cp. Returns ``out`` like q (and ``lse`` fp32 with
    ``return_lse``), equal to full attention of the gathered sequence, restricted to the local
    rows. Differentiable in q, k, v (and through lse). ``window_size=(left, 0)``: a causal
    sliding window as in ``flash_attn_func``; under ``comm_type="ring"`` the neighbours' chunks
    are exchanged instead of passing K/V around the ring (``_halo_attn``; when a chunk is
    shorter than ``left``, all of them are gathered).
    """
    varlen = cu_seqlens is not None
    window = _fa.window_left_of(window_size, causal) >= 0
    if varlen:
        softmax_scale = _fa._check_common(q, k, v, softmax_scale, 3,
                                          "(total_tokens, heads, head_dim)")
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"q and k/v token counts differ: {q.shape[0]} vs {k.shape[0]}")
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32:
            raise TypeError("cu_seqlens must be an int32 torch.Tensor (the local one from "
                            "zigzag_split_varlen)")
        if cu_seqlens.dim() != 1 or int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0]:
            raise ValueError(f"cu_seqlens must be 1-D, start at 0 and end at {q.shape[0]}")
    else:
        softmax_scale = _fa._check_common(q, k, v, softmax_scale, 4,
                                          "(batch, seqlen, heads, head_dim)")
        if k.shape[:2] != q.shape[:2]:
            raise ValueError(f"q and k/v batch/sequence sizes differ: {tuple(q.shape[:2])} vs "
                             f"{tuple(k.shape[:2])} (ring attention is self attention)")
    if comm_type not in COMM_TYPES:
        raise ValueError(f"comm_type must be one of {COMM_TYPES}, got {comm_type!r}")
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    cp = 1 if group is None else dist.get_world_size(group)

    if cp == 1:  # the local tokens are the whole sequence, in order
        if varlen:
            if max_seqlen is None:
                lengths = cu_seqlens[1:] - cu_seqlens[:-1]
                max_seqlen = int(lengths.max()) if lengths.numel() else 0
            res = _fa.flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, causal=causal,
                                             softmax_scale=softmax_scale, return_lse=True,
                                             window_size=window_size)
        else:
            res = _fa.flash_attn_func(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                      return_lse=True, window_size=window_size)
        return res if return_lse else res[0]

    if comm_type == "allgather" or window:
        if varlen:  # validate local lengths (even) the same way as the ring
            _Parts(True, q.shape[0], cu_seqlens, max_seqlen, q.device)
            chunks = ((cu_seqlens[1:] - cu_seqlens[:-1]) // 2).tolist()
        elif q.shape[1] % 2:
            raise ValueError(f"the local sequence length {q.shape[1]} is odd: q, k, v must hold "
                             "two zigzag chunks of equal length (see zigzag_split)")
        else:
            chunks = [q.shape[1] // 2]
        # a window under the ring: the neighbours' chunks when it reaches no further back
        if comm_type == "ring" and halo_fits(_fa.window_left_of(window_size, causal), chunks):
            out, lse = _halo_attn(q, k, v, group, softmax_scale, cu_seqlens, window_size)
        else:
            out, lse = _allgather_attn(q, k, v, group, bool(causal), softmax_scale, cu_seqlens,
                                       window_size)
    else:
        q, k, v = (t.contiguous() for t in (q, k, v))
        out, lse = _RingAttnFunction.apply(q, k, v, group, bool(causal), softmax_scale,
                                           cu_seqlens, max_seqlen)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# In-process simulation of the ring (tests, benchmarks)
# ----------------------------------------------------------------------------------------------


def simulate_ring_attn(qs: Sequence[torch.Tensor], ks: Sequence[torch.Tensor],
                       vs: Sequence[torch.Tensor], causal: bool = True,
                       softmax_scale: Optional[float] = None, cu_seqlens=None, max_seqlen=None,
                       douts: Optional[Sequence[torch.Tensor]] = None):
    """The ring schedule for ``cp = len(qs)`` virtual ranks in one process.

    ``qs[r]``, ``ks[r]``, ``vs[r]``: rank r's zigzag shard (as for ``ring_attn_func``;
    ``cu_seqlens`` is the local one, shared by all ranks). Returns ``(outs, lses)`` and, with
    ``douts``, also ``(dqs, dks, dvs)``, each a list over ranks. No autograd, no communication:
    the same block plan, kernels and merges as the real ring.
    """
    cp = len(qs)
    q0 = qs[0]
    varlen = cu_seqlens is not None
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q0.shape[-1])
    parts = _Parts(varlen, q0.shape[0] if varlen else q0.shape[1], cu_seqlens, max_seqlen,
                   q0.device)
    qs, ks, vs = ([parts.to_internal(t) for t in ts] for ts in (qs, ks, vs))
    outs, lses = [], []
    for r in range(cp):
        out_acc, lse_acc = _empty_acc(qs[r], varlen)
        for step in range(cp):
            src = (r - step) % cp
            plan = ring_step_plan(step, r, cp, causal, varlen)
            _forward_step(qs[r], ks[src], vs[src], parts, plan, softmax_scale, out_acc, lse_acc)
        outs.append(out_acc.to(qs[r].dtype))
        lses.append(lse_acc)
    if douts is not None:
        douts = [parts.to_internal(d).contiguous() for d in douts]
        dqs = [torch.zeros(q.shape, dtype=torch.float32, device=q.device) for q in qs]
        dks = [torch.zeros(k.shape, dtype=torch.float32, device=k.device) for k in ks]
        dvs = [torch.zeros(v.shape, dtype=torch.float32, device=v.device) for v in vs]
        for r in range(cp):
            for step in range(cp):
                src = (r - step) % cp
                plan = ring_step_plan(step, r, cp, causal, varlen)
                _backward_step(douts[r], None, qs[r], ks[src], vs[src], outs[r], lses[r], parts,
                               plan, softmax_scale, dqs[r], dks[src], dvs[src])

    def ext(ts, like, lse_like=False):
        return [parts.to_external(t.to(l.dtype), lse_like) for t, l in zip(ts, like)]

    fwd = (ext(outs, qs), ext(lses, lses, True))
    if douts is None:
        return fwd
    return fwd, (ext(dqs, qs), ext(dks, ks), ext(dvs, vs))
