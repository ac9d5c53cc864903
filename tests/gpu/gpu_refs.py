"""References for the GPU tests at real sizes, computed in chunks with analytic gradients.

A 16K-token attention or an 8K x 152K log-prob problem does not fit as one float64 autograd
graph, so these compute forward and backward chunk by chunk (query rows for attention, tokens
for log-probs), holding at most ``max_elems`` score elements at a time:

    attention, per query chunk (scores S = Q K^T * scale, causal: key j visible to query i iff
    j <= i + sk - sq):  L = logsumexp(S), P = exp(S - L), O = P V,
        dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K * scale,
        dK += dS^T Q * scale, dV += P^T dO   (kv heads: summed over their query-head group)
    log-probs, per token chunk (z = h W^T):  lse = logsumexp(z), p = exp(z - lse),
        logp = z[t] - lse, entropy = lse - E_p[z],
        dz = g * (onehot(t) - p) - g_ent * p * (z - E_p[z]),  dh = dz W,  dW += dz^T h

The low-precision comparators (``sdpa_fwd_bwd``, ``unfused_logprobs_lowp``) are what PyTorch
itself computes in bf16/fp16; the tests allow our kernels at most twice their error against the
high-precision reference (plus a small slack), flash-attn's criterion.

``tests/test_gpu_kit.py`` checks these functions against float64 autograd on CPU.
"""

from __future__ import annotations

import math
import os

import torch


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64 (NaN if either holds a NaN; equal infinities count as 0)."""
    a, b = a.double(), b.double()
    d = (a - b).abs()
    both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
    d = torch.where(both_inf, torch.zeros_like(d), d)
    if torch.isnan(a).any() or torch.isnan(b).any():
        return float("nan")
    return d.max().item() if d.numel() else 0.0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius, float64)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def row_err(a: torch.Tensor, b: torch.Tensor, floor: float = 0.5) -> float:
    """max over rows (all dims but the last) of max |a - b| / max |b| within the row, the
    denominator at least ``floor`` x the median row's max |b|. Attention rows differ in scale by
    orders of magnitude (an early causal row is one value vector, a late one an average of
    thousands), so one global scale would let an error in the small rows hide; the floor keeps
    rows whose exact value is ~0 (dq of a query that sees one key) from dividing noise by
    nothing. NaN propagates."""
    a, b = a.double(), b.double()
    if b.dim() < 2:
        return max_err(a, b) / max(amax(b), 1e-300)
    d = (a - b).abs().amax(-1).flatten()
    s = b.abs().amax(-1).flatten()
    if not d.numel():
        return 0.0
    s = s.clamp_min(max(floor * s.median().item(), 1e-300))
    return (d / s).max().item()


def amax(t: torch.Tensor) -> float:
    return t.double().abs().max().item() if t.numel() else 0.0


# -- attention -------------------------------------------------------------------------------
@torch.no_grad()
def attention_reference_chunked(q, k, v, do=None, causal=True, softmax_scale=None,
                                dtype=torch.float64, max_elems=2 ** 27):
    """q, do (b, sq, h, d); k, v (b, sk, hkv, d). Returns (out, lse, dq, dk, dv) in ``dtype``
    (the gradients are None without ``do``); lse is (b, h, sq). Every query row must see at
    least one key (true for causal with sq == sk)."""
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    dev = q.device
    out = torch.empty(b, sq, h, d, dtype=dtype, device=dev)
    lse = torch.empty(b, h, sq, dtype=dtype, device=dev)
    grads = do is not None
    dq = torch.empty_like(out) if grads else None
    dk = torch.empty(b, sk, hkv, d, dtype=dtype, device=dev) if grads else None
    dv = torch.empty_like(dk) if grads else None
    chunk = max(1, min(sq, max_elems // max(1, h * sk)))
    j = torch.arange(sk, device=dev)
    for bi in range(b):
        K = k[bi].to(dtype).repeat_interleave(g, dim=1).transpose(0, 1)  # (h, sk, d)
        V = v[bi].to(dtype).repeat_interleave(g, dim=1).transpose(0, 1)
        if grads:
            dK = torch.zeros_like(K)
            dV = torch.zeros_like(V)
        for i0 in range(0, sq, chunk):
            i1 = min(sq, i0 + chunk)
            Q = q[bi, i0:i1].to(dtype).transpose(0, 1)  # (h, c, d)
            S = torch.matmul(Q, K.transpose(1, 2)).mul_(scale)  # (h, c, sk)
            if causal:
                i = torch.arange(i0, i1, device=dev)[:, None]
                S.masked_fill_((j[None, :] > i + (sk - sq))[None], float("-inf"))
            L = torch.logsumexp(S, dim=-1)  # (h, c)
            P = S.sub_(L[..., None]).exp_()  # S is reused as P
            O = torch.matmul(P, V)  # (h, c, d)
            out[bi, i0:i1] = O.transpose(0, 1)
            lse[bi, :, i0:i1] = L
            if grads:
                dO = do[bi, i0:i1].to(dtype).transpose(0, 1)
                delta = (dO * O).sum(-1, keepdim=True)  # (h, c, 1)
                dS = torch.matmul(dO, V.transpose(1, 2)).sub_(delta).mul_(P)  # (h, c, sk)
                dq[bi, i0:i1] = torch.matmul(dS, K).mul_(scale).transpose(0, 1)
                dK += torch.matmul(dS.transpose(1, 2), Q).mul_(scale)
                dV += torch.matmul(P.transpose(1, 2), dO)
                del dS, dO
            del S, P, O, Q
        if grads:
            dk[bi] = dK.view(hkv, g, sk, d).sum(1).transpose(0, 1)
            dv[bi] = dV.view(hkv, g, sk, d).sum(1).transpose(0, 1)
    return out, lse, dq, dk, dv


def varlen_attention_reference_chunked(q, k, v, cu_seqlens, do=None, causal=True,
                                       softmax_scale=None, dtype=torch.float64,
                                       max_elems=2 ** 27):
    """Packed (total, heads, d) tensors; per sequence ``attention_reference_chunked``.
    Returns (out, lse (h, total), dq, dk, dv)."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    parts = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            parts.append(attention_reference_chunked(
                q[None, s:e], k[None, s:e], v[None, s:e], None if do is None else do[None, s:e],
                causal, softmax_scale, dtype, max_elems))
    out = torch.cat([p[0][0] for p in parts], 0)
    lse = torch.cat([p[1][0] for p in parts], 1)
    if do is None:
        return out, lse, None, None, None
    return (out, lse) + tuple(torch.cat([p[i][0] for p in parts], 0) for i in (2, 3, 4))


def sdpa_fwd_bwd(q, k, v, do, causal=True, softmax_scale=None):
    """PyTorch's own attention in the inputs' dtype (flash/cuDNN on GPU, math on CPU): out and
    dq, dk, dv. kv heads are repeated for the call (autograd sums dk/dv over each group)."""
    g = q.shape[2] // k.shape[2]
    qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
    kr = kk.repeat_interleave(g, dim=2) if g > 1 else kk
    vr = vv.repeat_interleave(g, dim=2) if g > 1 else vv
    out = torch.nn.functional.scaled_dot_product_attention(
        qq.transpose(1, 2), kr.transpose(1, 2), vr.transpose(1, 2), is_causal=causal,
        scale=softmax_scale).transpose(1, 2)
    dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do)
    return out.detach(), dq, dk, dv


def sdpa_varlen_fwd_bwd(q, k, v, cu_seqlens, do, causal=True, softmax_scale=None):
    """``sdpa_fwd_bwd`` per packed sequence, concatenated."""
    bounds = [int(x) for x in cu_seqlens.tolist()]
    parts = [sdpa_fwd_bwd(q[None, s:e], k[None, s:e], v[None, s:e], do[None, s:e], causal,
                          softmax_scale) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
    return tuple(torch.cat([p[i][0] for p in parts], 0) for i in range(4))


# -- log-probs -------------------------------------------------------------------------------
@torch.no_grad()
def logprobs_reference_chunked(hidden, weight, targets, g_logp, g_ent, chunk=1024,
                               dtype=torch.float32):
    """log p(target), entropy, d_hidden, d_weight of softmax(hidden @ weight^T) in ``dtype``
    for upstream gradients g_logp, g_ent (N,)."""
    N = hidden.shape[0]
    W = weight.to(dtype)
    dW = torch.zeros_like(W)
    logp = torch.empty(N, dtype=dtype, device=hidden.device)
    ent = torch.empty_like(logp)
    dh = torch.empty(hidden.shape, dtype=dtype, device=hidden.device)
    t_all = targets.long()
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        H = hidden[n0:n1].to(dtype)
        z = H @ W.t()
        lse = torch.logsumexp(z, dim=-1)
        p = torch.exp(z - lse[:, None])
        rows = torch.arange(n1 - n0, device=z.device)
        t = t_all[n0:n1]
        ez = (p * z).sum(-1)
        logp[n0:n1] = z[rows, t] - lse
        ent[n0:n1] = lse - ez
        g = g_logp[n0:n1].to(dtype)
        ge = g_ent[n0:n1].to(dtype)
        dz = (z - ez[:, None]).mul_(ge[:, None]).add_(g[:, None]).mul_(p).neg_()
        dz[rows, t] += g
        del z, p
        dh[n0:n1] = dz @ W
        dW += dz.t() @ H
    return logp, ent, dh, dW


def unfused_logprobs_lowp(hidden, weight, targets, g_logp, g_ent, chunk=1024):
    """The unfused path in the inputs' dtype (logits -> fp32 log_softmax -> gather, autograd),
    token chunk by chunk; d_weight summed over chunks in fp32. Returns logp, ent, dh, dW."""
    from megatron_k15.kernels.fused_logprobs import reference_logprobs

    N = hidden.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    ent = torch.empty_like(logp)
    dh = torch.empty_like(hidden)
    dW = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    for n0 in range(0, N, chunk):
        n1 = min(N, n0 + chunk)
        h = hidden[n0:n1].detach().requires_grad_()
        w = weight.detach().requires_grad_()
        lp, en = reference_logprobs(h, w, targets[n0:n1], return_entropy=True)
        gh, gw = torch.autograd.grad((lp * g_logp[n0:n1]).sum() + (en * g_ent[n0:n1]).sum(), (h, w))
        logp[n0:n1], ent[n0:n1], dh[n0:n1] = lp.detach(), en.detach(), gh
        dW += gw.float()
        del gw, lp, en
    return logp, ent, dh, dW


VALUE_SLACK = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
# gradients: flash attention's backward takes rowsum(dO * O) with O rounded to the input dtype
# (as flash-attn and PyTorch's flash kernel do), which cancels against dP in rows whose gradient
# is small, so their relative error is larger than the forward's
GRAD_SLACK = {torch.bfloat16: 5e-2, torch.float16: 5e-3, torch.float32: 1e-5}


def low_precision_bound(err_lowp: float, ref_scale: float, dtype: torch.dtype,
                        grad: bool = False) -> float:
    """flash-attn's criterion: at most twice PyTorch's own low-precision error, plus a slack
    times the reference's scale (1 for row-relative errors): ``VALUE_SLACK`` (1e-2 bf16, 2e-3
    fp16) for values, ``GRAD_SLACK`` (5e-2 bf16, 5e-3 fp16) for gradients."""
    slack = (GRAD_SLACK if grad else VALUE_SLACK)[dtype]
    return 2.0 * err_lowp + slack * max(ref_scale, 1e-6)


# -- where the tests run ---------------------------------------------------------------------
# On a CUDA GPU at real sizes. Without one they are skipped, unless GPU_KIT_DEVICE=cpu asks for
# a logic check of the test code itself at tiny sizes on CPU (kernels under TRITON_INTERPRET=1,
# set by tests/conftest.py); tests/test_gpu_kit.py runs that.
ON_GPU = torch.cuda.is_available()
CPU_CHECK = not ON_GPU and os.environ.get("GPU_KIT_DEVICE", "") == "cpu"
DEVICE = "cuda" if ON_GPU else "cpu"


def gpu_marks():
    import pytest

    return [pytest.mark.gpu,
            pytest.mark.skipif(not (ON_GPU or CPU_CHECK), reason="needs a CUDA GPU")]


def real_or_tiny(real, tiny):
    """The real size on GPU, the tiny one in the CPU logic check."""
    return real if ON_GPU else tiny
