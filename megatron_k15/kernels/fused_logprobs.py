"""Fused output-projection + log-softmax + gather: token log-probs without (N, V) logits.

``fused_logprobs(hidden, weight, targets, tp_group=None, return_entropy=False)``

* hidden (N, H): final hidden states (replicated across the tensor-parallel group);
* weight (V_local, H): this tp rank's shard of the output embedding, rows
  ``[rank * V_local, (rank + 1) * V_local)`` of the full vocabulary (Megatron's vocab-parallel
  layout, equal shards);
* targets (N,): global vocabulary ids (every id must be in ``[0, V_local * tp)``; positions
  that are masked out of the loss can carry any valid id, e.g. 0).

Returns log p(target) (N,) fp32, and the entropy of the full softmax (N,) fp32 when
``return_entropy``. Differentiable in hidden and weight. For sampling temperature T pass
``hidden / T`` (without a soft cap: with one, T divides the capped logits). ``softcap`` > 0 soft-caps every logit first, z -> softcap * tanh(z / softcap)
(Gemma 2's final logits); the backward multiplies by the tanh's derivative.

Forward: a Triton kernel tiles tokens x vocabulary, computes each logit tile with ``tl.dot``
(fp32 accumulation; for 16-bit inputs the tile is rounded to the input dtype, as a 16-bit GEMM
rounds its output, so forward and the backward's recomputed logits agree and sum p = 1) and
keeps per-token running statistics with an online logsumexp:
max m, sum exp(z - m), sum exp(z - m) * z (entropy only) and the target logit (when it is
in this shard). The grid is (token blocks, vocabulary splits); the few per-split partials
(n_split x N) are merged in torch, then across the tp group with one all_reduce(MAX) for m
and one all_reduce(SUM) for the rescaled sums and the target logit (zero on ranks that do
not own it). lse = M + log S, logp = z_target - lse, entropy = lse - E_p[z].

Backward recomputes logits chunk by chunk (``chunk_tokens`` x ``chunk_vocab``) with torch
matmuls: grad_z = g * (onehot - p) - g_ent * p * (z - E_p[z]), accumulated into
d_hidden (N, H, fp32 accumulator) and d_weight (per vocab chunk, fp32). Peak extra memory is
O(chunk_tokens * chunk_vocab + N * H + chunk_vocab * H), independent of N * V.

Tensor parallelism: the hidden states are replicated over the tp group, and each rank's
d_hidden covers only its vocabulary shard, so the partial d_hidden must be summed over the
group. By default the autograd function does that all_reduce in its backward (like
Megatron's ``copy_to_tensor_model_parallel_region``). If the caller already owns that
reduction -- e.g. with sequence parallelism the hidden states come from
``gather_from_sequence_parallel_region``, whose backward reduce-scatters -- pass
``reduce_hidden_grad=False``.

Implementations: the Triton kernel runs on CUDA tensors, or on CPU tensors under
``TRITON_INTERPRET=1``; elsewhere (CPU without the interpreter, or Triton missing) the pure
torch chunked forward ``fused_logprobs_torch`` is used. ``impl="torch"|"triton"`` forces one.
"""

from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.distributed as dist

from megatron_k15.kernels.interpreter import import_triton

triton, tl, HAVE_TRITON = import_triton()  # optional: the torch path covers CPU-only installs

__all__ = ["fused_logprobs", "fused_logprobs_torch", "reference_logprobs", "HAVE_TRITON"]

DEFAULT_CHUNK_TOKENS = 2048
DEFAULT_CHUNK_VOCAB = 8192


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------- Triton forward
if HAVE_TRITON:
    from megatron_k15.kernels.flash_attention import _tanh  # noqa: F401 (called by the kernel)

    @triton.jit
    def _logprob_partials_kernel(
        H_ptr, W_ptr, T_ptr,
        M_ptr, S_ptr, TZ_ptr, ZT_ptr,
        N, V, D, vocab_start, v_per_split, softcap,
        stride_hn, stride_hd, stride_wv, stride_wd,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
        ENTROPY: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, ROUND: tl.constexpr,
        BF16_BITS: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        """One program: BLOCK_N tokens x one vocabulary split; writes the split's partials."""
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        tgt = tl.load(T_ptr + offs_n, mask=mask_n, other=-1).to(tl.int64) - vocab_start

        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        tz = tl.zeros([BLOCK_N], tl.float32)
        zt = tl.zeros([BLOCK_N], tl.float32)

        # tokens x hidden (or vocabulary x hidden) pass 2**31 elements at 256K tokens x 8192 or
        # 152K x 14K: each block's first row is a 64-bit scalar offset, the tile's offsets from
        # it stay 32-bit (a 64-bit offset tile costs registers: it spilled)
        rows_n = tl.arange(0, BLOCK_N)
        rows_v = tl.arange(0, BLOCK_V)
        h_blk = H_ptr + tl.cast(pid_n * BLOCK_N, tl.int64) * stride_hn
        v_lo = pid_s * v_per_split
        v_hi = tl.minimum(v_lo + v_per_split, V)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            offs_v = v0 + rows_v
            mask_v = offs_v < v_hi
            w_blk = W_ptr + tl.cast(v0, tl.int64) * stride_wv
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                h = tl.load(h_blk + rows_n[:, None] * stride_hn + offs_d[None, :] * stride_hd,
                            mask=mask_n[:, None] & mask_d[None, :], other=0.0)
                w = tl.load(w_blk + rows_v[None, :] * stride_wv + offs_d[:, None] * stride_wd,
                            mask=mask_v[None, :] & mask_d[:, None], other=0.0)
                if UPCAST:  # the interpreter's tl.dot mishandles bf16/fp16 operands
                    h = h.to(tl.float32)
                    w = w.to(tl.float32)
                if IEEE:
                    acc = tl.dot(h, w, acc, input_precision="ieee")
                else:
                    acc = tl.dot(h, w, acc)
            if ROUND:
                # 16-bit inputs: round the logits to the input dtype, as a 16-bit GEMM does, so
                # the lse here is the one the backward's recomputed logits sum to (else
                # sum p != 1 and confident tokens get gradients off by percents)
                if BF16_BITS:  # interpreter: its bf16 cast truncates; round to nearest even
                    bits = acc.to(tl.uint32, bitcast=True)
                    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
                    acc = bits.to(tl.float32, bitcast=True)
                else:
                    acc = acc.to(H_ptr.dtype.element_ty).to(tl.float32)
            if SOFTCAP:
                acc = softcap * _tanh(acc / softcap)
            z = tl.where(mask_v[None, :], acc, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every chunk has a valid column
            alpha = tl.exp(m - m_new)
            p = tl.exp(z - m_new[:, None])
            s = s * alpha + tl.sum(p, axis=1)
            if ENTROPY:
                z0 = tl.where(mask_v[None, :], acc, 0.0)
                tz = tz * alpha + tl.sum(p * z0, axis=1)
            hit = (offs_v[None, :] == tgt[:, None]) & mask_v[None, :]
            zt += tl.sum(tl.where(hit, acc, 0.0), axis=1)
            m = m_new

        out = pid_s * N + offs_n
        tl.store(M_ptr + out, m, mask=mask_n)
        tl.store(S_ptr + out, s, mask=mask_n)
        tl.store(ZT_ptr + out, zt, mask=mask_n)
        if ENTROPY:
            tl.store(TZ_ptr + out, tz, mask=mask_n)


def _compiled(device: torch.device) -> bool:
    """True when the kernel is compiled for a GPU, False when the interpreter runs it (CPU)."""
    return device.type != "cpu" and not _interpret()


def _triton_config(device: torch.device, dtype: torch.dtype, H: int):
    if not _compiled(device):  # interpreter: fewer, larger programs run faster
        return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=1)
    bd = 64 if H >= 64 else 32
    if dtype == torch.float32:
        return dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=2)
    # untuned defaults (a standard 128x128x64 bf16 matmul tile); see bench/fused_logprobs.py
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=bd, num_warps=8, num_stages=3)


def _partials_triton(hidden, weight, targets, vocab_start, entropy, softcap=0.0):
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = _triton_config(hidden.device, hidden.dtype, D)
    bn, bv = cfg["BLOCK_N"], cfg["BLOCK_V"]
    n_blocks = triton.cdiv(N, bn)
    max_split = triton.cdiv(V, bv)
    if hidden.device.type == "cuda":
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count
        n_split = max(1, min(max_split, triton.cdiv(4 * sms, max(n_blocks, 1))))
    else:
        n_split = 1
    v_per_split = triton.cdiv(triton.cdiv(V, n_split), bv) * bv
    n_split = triton.cdiv(V, v_per_split)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m = torch.empty((n_split, N), **f32)
    s = torch.empty((n_split, N), **f32)
    zt = torch.empty((n_split, N), **f32)
    tz = torch.zeros((n_split, N), **f32) if entropy else s  # dummy pointer when unused
    if N == 0:  # no tokens (an empty microbatch): nothing to launch
        return _merge_splits(m, s, tz if entropy else None, zt)
    _logprob_partials_kernel[(n_blocks, n_split)](
        hidden, weight, targets, m, s, tz, zt,
        N, V, D, vocab_start, v_per_split, softcap or 1.0,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_N=bn, BLOCK_V=bv, BLOCK_D=cfg["BLOCK_D"],
        ENTROPY=bool(entropy), IEEE=hidden.dtype == torch.float32,
        UPCAST=not _compiled(hidden.device) and hidden.dtype != torch.float32,
        ROUND=hidden.dtype != torch.float32,
        BF16_BITS=not _compiled(hidden.device) and hidden.dtype == torch.bfloat16, SOFTCAP=softcap > 0,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return _merge_splits(m, s, tz if entropy else None, zt)


def _merge_splits(m, s, tz, zt):
    """(n_split, N) partials -> (N,) partials relative to the overall max."""
    if m.shape[0] == 1:
        return m[0], s[0], (tz[0] if tz is not None else None), zt[0]
    M = m.max(0).values
    scale = torch.exp(m - M)  # empty splits have m = -inf, s = 0 -> contribute 0
    return M, (s * scale).sum(0), ((tz * scale).sum(0) if tz is not None else None), zt.sum(0)


# ----------------------------------------------------------------------------- torch forward
def _capped(z: torch.Tensor, softcap: float) -> torch.Tensor:
    """softcap * tanh(z / softcap) (no cap: z)."""
    return softcap * torch.tanh(z / softcap) if softcap else z


def _partials_torch(hidden, weight, targets, vocab_start, entropy,
                    chunk_tokens=DEFAULT_CHUNK_TOKENS, chunk_vocab=DEFAULT_CHUNK_VOCAB, softcap=0.0):
    N = hidden.shape[0]
    V = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m = torch.full((N,), -math.inf, **f32)
    s = torch.zeros(N, **f32)
    tz = torch.zeros(N, **f32) if entropy else None
    zt = torch.zeros(N, **f32)
    local_t = targets.long() - vocab_start
    for n0 in range(0, N, chunk_tokens):
        n1 = min(N, n0 + chunk_tokens)
        h = hidden[n0:n1]
        mc, sc, tc, zc = m[n0:n1], s[n0:n1], (tz[n0:n1] if entropy else None), zt[n0:n1]
        lt = local_t[n0:n1]
        for v0 in range(0, V, chunk_vocab):
            v1 = min(V, v0 + chunk_vocab)
            z = _capped((h @ weight[v0:v1].t()).float(), softcap)
            m_new = torch.maximum(mc, z.max(1).values)
            alpha = torch.exp(mc - m_new)
            p = torch.exp(z - m_new[:, None])
            sc.mul_(alpha).add_(p.sum(1))
            if entropy:
                tc.mul_(alpha).add_((p * z).sum(1))
            own = (lt >= v0) & (lt < v1)
            col = (lt - v0).clamp(0, v1 - v0 - 1)
            zc.add_(torch.where(own, z.gather(1, col[:, None]).squeeze(1), torch.zeros_like(mc)))
            mc.copy_(m_new)
            del z, p
    return m, s, tz, zt


# ----------------------------------------------------------------------------- autograd
def _tp_info(tp_group):
    if tp_group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


class _FusedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, tp_group, want_entropy, impl, reduce_hidden_grad,
                chunk_tokens, chunk_vocab, vocab_start=None, softcap=0.0):
        tp_size, tp_rank = _tp_info(tp_group)
        if vocab_start is None:
            vocab_start = tp_rank * weight.shape[0]
        targets = targets.reshape(-1)
        if impl == "triton":
            m, s, tz, zt = _partials_triton(hidden, weight, targets, vocab_start, want_entropy, softcap)
        else:
            m, s, tz, zt = _partials_torch(hidden, weight, targets, vocab_start, want_entropy,
                                           chunk_tokens, chunk_vocab, softcap)
        if tp_size > 1:
            M = m.clone()
            dist.all_reduce(M, op=dist.ReduceOp.MAX, group=tp_group)
            scale = torch.exp(m - M)
            parts = [s * scale, zt] + ([tz * scale] if want_entropy else [])
            buf = torch.stack(parts)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=tp_group)
            s, zt = buf[0], buf[1]
            tz = buf[2] if want_entropy else None
            m = M
        lse = m + torch.log(s)
        logp = zt - lse
        if want_entropy:
            ez = tz / s  # E_p[z]
            ent = lse - ez
        else:
            ez = torch.zeros(0, dtype=torch.float32, device=hidden.device)
            ent = ez
        ctx.save_for_backward(hidden, weight, targets, lse, ez)
        ctx.tp_group, ctx.tp_size, ctx.vocab_start = tp_group, tp_size, vocab_start
        ctx.want_entropy, ctx.reduce_hidden_grad = want_entropy, reduce_hidden_grad
        ctx.chunk_tokens, ctx.chunk_vocab, ctx.softcap = chunk_tokens, chunk_vocab, softcap
        ctx.set_materialize_grads(False)
        if not want_entropy:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, targets, lse, ez = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not ctx.want_entropy:
            g_ent = None
        if g_logp is None and g_ent is None:
            return (None,) * 11
        N, V = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        g = g_logp.float() if g_logp is not None else torch.zeros(N, dtype=torch.float32, device=dev)
        ge = g_ent.float() if g_ent is not None else None
        local_t = targets.long() - ctx.vocab_start
        dh = torch.zeros(hidden.shape, dtype=torch.float32, device=dev) if need_h else None
        dw = torch.empty_like(weight) if need_w else None
        cn, cv = ctx.chunk_tokens, ctx.chunk_vocab
        for v0 in range(0, V, cv):
            v1 = min(V, v0 + cv)
            w = weight[v0:v1]
            dw_acc = torch.zeros((v1 - v0, weight.shape[1]), dtype=torch.float32, device=dev) if need_w else None
            for n0 in range(0, N, cn):
                n1 = min(N, n0 + cn)
                h = hidden[n0:n1]
                z = (h @ w.t()).float()
                if ctx.softcap:
                    t = torch.tanh(z / ctx.softcap)
                    z = ctx.softcap * t
                p = torch.exp(z - lse[n0:n1, None])
                coef = g[n0:n1, None]
                if ge is not None:
                    coef = coef + ge[n0:n1, None] * (z - ez[n0:n1, None])
                gz = -p * coef
                del z, p
                lt = local_t[n0:n1]
                own = (lt >= v0) & (lt < v1)
                # + g at each token's target column, for the targets in this chunk (no host sync:
                # the others add 0 at a clamped column)
                gz.scatter_add_(1, (lt - v0).clamp(0, v1 - v0 - 1)[:, None], (g[n0:n1] * own)[:, None])
                if ctx.softcap:  # through the cap: d(cap tanh(z / cap)) / dz = 1 - tanh^2
                    gz = gz * (1.0 - t * t)
                    del t
                gz = gz.to(hidden.dtype)
                if need_h:
                    dh[n0:n1] += (gz @ w).float()
                if need_w:
                    dw_acc += (gz.t() @ h).float()
                del gz
            if need_w:
                dw[v0:v1] = dw_acc.to(weight.dtype)
        if need_h:
            if ctx.tp_size > 1 and ctx.reduce_hidden_grad:
                dist.all_reduce(dh, op=dist.ReduceOp.SUM, group=ctx.tp_group)
            dh = dh.to(hidden.dtype)
        return dh, dw, None, None, None, None, None, None, None, None, None


def _choose_impl(impl: str, hidden: torch.Tensor) -> str:
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'torch', got {impl!r}")
    if impl == "auto":
        impl = os.environ.get("MEGATRON_K15_FUSED_LOGPROBS_IMPL", "auto")
    if impl == "auto":
        ok = HAVE_TRITON and (hidden.is_cuda or (_interpret() and hidden.device.type == "cpu"))
        return "triton" if ok else "torch"
    if impl == "triton" and not HAVE_TRITON:
        raise RuntimeError("impl='triton' requested but triton is not importable")
    return impl


def fused_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, tp_group=None,
                   return_entropy: bool = False, *, impl: str = "auto", reduce_hidden_grad: bool = True,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS, chunk_vocab: int = DEFAULT_CHUNK_VOCAB,
                   vocab_start: Optional[int] = None, softcap: float = 0.0):
    """log p(targets) (N,) fp32 [, entropy (N,) fp32] of softmax(hidden @ weight.T) over the
    (tp-sharded) vocabulary, without materialising the logits (module docstring).

    ``vocab_start``: global id of this rank's first row (default ``tp_rank * V_local``); pass it
    when ranks hold unequal row counts, e.g. when padding rows are cut off the last shard."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden (N, H) and weight (V_local, H) expected, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.numel() != hidden.shape[0]:
        raise ValueError(f"targets must have N={hidden.shape[0]} entries, got {targets.numel()}")
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    impl = _choose_impl(impl, hidden)
    logp, ent = _FusedLogProbs.apply(hidden, weight, targets.to(hidden.device), tp_group,
                                     bool(return_entropy), impl, bool(reduce_hidden_grad),
                                     int(chunk_tokens), int(chunk_vocab), vocab_start, float(softcap or 0.0))
    return (logp, ent) if return_entropy else logp


def fused_logprobs_torch(hidden, weight, targets, tp_group=None, return_entropy=False, **kw):
    """Same as ``fused_logprobs`` with the pure-torch chunked forward (no Triton)."""
    return fused_logprobs(hidden, weight, targets, tp_group, return_entropy, impl="torch", **kw)


def reference_logprobs(hidden, weight, targets, return_entropy=False, softcap=0.0):
    """Unfused reference at tp=1: full logits, log_softmax, gather (materialises N x V)."""
    logits = _capped((hidden @ weight.t()).float(), softcap)
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(1, targets.long().reshape(-1, 1)).squeeze(1)
    if not return_entropy:
        return logp
    return logp, -(logsm.exp() * logsm).sum(-1)
