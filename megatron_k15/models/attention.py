"""Attention backends behind one small interface (``--attention-backend``).

Every backend is a function

    attn(q, k, v, *, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None,
         window_size=(-1, -1)[, return_lse=True]) -> out[, lse]

with flash-attn's layout: q (b, s, n_heads, d), k/v (b, s, n_kv_heads, d), out like q.
``cu_seqlens`` (int32, boundaries of packed sequences along s, only with b == 1) keeps
attention inside each packed sequence. Without it q may be shorter than k/v (a chunk of new
tokens over a cached prefix): causal masking is then aligned bottom-right, as in flash-attn,
query i sees key j iff j <= i + s_k - s_q. ``window_size=(left, 0)`` (flash-attn's convention)
is a causal sliding window: query i also needs j >= i + s_k - s_q - left (the local layers of
Mistral v0.1, OLMo 3 or Qwen2 with ``use_sliding_window``). ``softcap`` > 0 (only passed when
set: Gemma 2) soft-caps each scaled score, s -> softcap * tanh(s / softcap), before the
softmax. GQA is handled by the backend, never
by repeating K/V in the model. ``return_lse=True`` (only passed when needed: attention sinks)
also returns the natural-log log-sum-exp of each row's scaled scores, (b, n_heads, s) fp32.
New backends register with ``register_attention_backend``.

Under context parallelism the model uses ``context_parallel_attention(cp_group, comm_type)``
instead (ring attention over the cp group, same interface, on this rank's zigzag shard).
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]
_BACKENDS: dict[str, Callable[[], AttentionFn]] = {}


def register_attention_backend(name: str, factory: Callable[[], AttentionFn]) -> None:
    """``factory`` is called on first use, so optional dependencies import lazily."""
    _BACKENDS[name] = factory


def available_attention_backends() -> list[str]:
    return sorted(_BACKENDS) + ["auto"]


def flash_head_dim_supported(head_dim: int) -> bool:
    """Our Triton kernels take head dims that are powers of two from 16 to 256."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def resolve_attention_backend(name: str, head_dim: Optional[int] = None) -> str:
    """``auto``: our Triton kernels on GPU, PyTorch SDPA on CPU (where Triton only interprets)
    and for head dims the kernels do not take (``head_dim``, when given: e.g. 80 or 96)."""
    if name != "auto":
        return name
    if (torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
            and (head_dim is None or flash_head_dim_supported(head_dim))):
        return "triton"
    return "sdpa"


def get_attention_backend(name: str, head_dim: Optional[int] = None) -> AttentionFn:
    """The backend's function; Triton's zero-pads head sizes it does not take (``head_dim``)."""
    name = resolve_attention_backend(name, head_dim)
    if name not in _BACKENDS:
        raise ValueError(
            f"--attention-backend {name!r} is unknown; choose one of {available_attention_backends()}"
        )
    fn = _BACKENDS[name]()
    return pad_head_dim(fn, head_dim) if name == "triton" and head_dim is not None else fn


def pad_head_dim(fn: AttentionFn, head_dim: int) -> AttentionFn:
    """``fn`` (a kernel that takes powers of two from 16 to 256) for another head size (MLA's
    192, Phi-3-mini's 96): q, k, v zero-padded to the next power of two, the output cut back.
    Zero channels add nothing to a score or an output channel kept, and the LSE is unchanged;
    the cost is the padding's FLOPs. ``fn`` itself when the size needs no padding."""
    target = max(16, 1 << (int(head_dim) - 1).bit_length())
    if flash_head_dim_supported(head_dim) or target > 256:
        return fn

    def padded(q, k, v, *, softmax_scale=None, **kw):
        d = q.shape[-1]
        scale = softmax_scale if softmax_scale is not None else d ** -0.5
        res = fn(*(F.pad(t, (0, target - d)) for t in (q, k, v)), softmax_scale=scale, **kw)
        if isinstance(res, tuple):
            return (res[0][..., :d],) + tuple(res[1:])
        return res[..., :d]

    return padded


def _sdpa_dense(q, k, v, causal, softmax_scale, window_left=-1):
    # (b, s, h, d) -> (b, h, s, d)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    sq, sk = q.shape[2], k.shape[2]
    mask = None
    if causal and (sq != sk or window_left >= 0):  # bottom-right aligned; SDPA's is_causal is top-left
        diag = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
        j = torch.arange(sk, device=q.device)[None, :]
        mask = j <= diag
        if window_left >= 0:
            mask = mask & (j >= diag - window_left)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal and sq > 1 and mask is None, scale=softmax_scale,
        enable_gqa=gqa,
    )
    return out.transpose(1, 2)


def apply_attention_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention whose softmax also holds a per-head sink logit (gpt-oss): the keys' share of
    the probability is Z / (Z + e^sink) with Z = e^lse, so out_sink = out * sigmoid(lse - sink).
    ``lse`` is laid out like ``out`` without its last (head_dim) axis, heads last; rows with no
    keys (lse = -inf) stay 0. Differentiable in out, lse and sinks."""
    scale = torch.sigmoid(lse.float() - sinks.float())
    return out * scale.unsqueeze(-1).to(out.dtype)


def _explicit_attention(q, k, v, causal, softmax_scale, window_size, softcap=0.0):
    """(out, lse (b, h, s)) by explicit scores in fp32 (the reference's semantics), for what
    SDPA does not give: the lse (attention sinks) and soft-capped scores."""
    from megatron_k15.kernels.flash_attention import attention_reference

    out, lse = attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True,
                                   upcast=torch.float32, window_size=window_size, softcap=softcap)
    return out.to(q.dtype), lse


def sdpa_attention(q, k, v, *, causal=True, softmax_scale=None, cu_seqlens=None, max_seqlen=None,
                   window_size=(-1, -1), return_lse=False, softcap=0.0):
    """PyTorch scaled_dot_product_attention; packed sequences are attended one at a time.
    With ``return_lse`` or ``softcap`` (which SDPA does not do) explicit fp32 scores instead."""
    from megatron_k15.kernels.flash_attention import check_softcap, window_left_of

    window_left = window_left_of(window_size, causal)
    softcap = check_softcap(softcap)
    if return_lse or softcap:
        if cu_seqlens is None:
            res = _explicit_attention(q, k, v, causal, softmax_scale, window_size, softcap)
            return res if return_lse else res[0]
        if q.shape[0] != 1:
            raise ValueError("packed sequences (cu_seqlens) need batch size 1")
        bounds = cu_seqlens.tolist()
        parts = [_explicit_attention(q[:, s:e], k[:, s:e], v[:, s:e], causal, softmax_scale, window_size, softcap)
                 for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        out = torch.cat([o for o, _ in parts], dim=1)
        return (out, torch.cat([l for _, l in parts], dim=2)) if return_lse else out
    if cu_seqlens is None:
        return _sdpa_dense(q, k, v, causal, softmax_scale, window_left)
    if q.shape[0] != 1:
        raise ValueError("packed sequences (cu_seqlens) need batch size 1")
    bounds = cu_seqlens.tolist()
    outs = [
        _sdpa_dense(q[:, s:e], k[:, s:e], v[:, s:e], causal, softmax_scale, window_left)
        for s, e in zip(bounds[:-1], bounds[1:]) if e > s
    ]
    return torch.cat(outs, dim=1)


def _packed_as_batch(res, return_lse: bool):
    """A packed kernel's out (t, h, d) [and lse (h, t)] as the interface's batch of one."""
    if return_lse:
        return res[0].unsqueeze(0), res[1].unsqueeze(0)
    return res.unsqueeze(0)


def _triton_factory() -> AttentionFn:
    from megatron_k15.kernels.flash_attention import flash_attn_func, flash_attn_varlen_func

    def triton_attention(q, k, v, *, causal=True, softmax_scale=None, cu_seqlens=None,
                         max_seqlen: Optional[int] = None, window_size=(-1, -1), return_lse=False, softcap=0.0):
        if cu_seqlens is None:
            return flash_attn_func(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                   window_size=window_size, return_lse=return_lse, softcap=softcap)
        if q.shape[0] != 1:
            raise ValueError("packed sequences (cu_seqlens) need batch size 1")
        if max_seqlen is None:
            max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        res = flash_attn_varlen_func(
            q[0], k[0], v[0], cu_seqlens.to(torch.int32), max_seqlen,
            causal=causal, softmax_scale=softmax_scale, window_size=window_size, return_lse=return_lse,
            softcap=softcap,
        )
        return _packed_as_batch(res, return_lse)

    return triton_attention


register_attention_backend("sdpa", lambda: sdpa_attention)
register_attention_backend("triton", _triton_factory)


def context_parallel_attention(group, comm_type: str = "ring") -> AttentionFn:
    """Attention over the context-parallel ``group`` (``kernels.ring_attention.ring_attn_func``)
    behind the backend interface.

    q, k, v hold this rank's zigzag shard (``parallel.context.zigzag_split`` /
    ``zigzag_split_varlen``): dense (b, s_local, heads, d), or packed with b == 1 and the
    *local* ``cu_seqlens`` (every local sequence holds two zigzag chunks of equal length). GQA
    as for every backend. The result equals full attention of the gathered sequence on the
    local rows. Our Triton kernels run the blocks (on CPU they need TRITON_INTERPRET=1)."""
    from megatron_k15.kernels.ring_attention import COMM_TYPES, ring_attn_func

    if comm_type not in COMM_TYPES:
        raise ValueError(f"--cp-comm-type must be one of {COMM_TYPES}, got {comm_type!r}")

    def cp_attention(q, k, v, *, causal=True, softmax_scale=None, cu_seqlens=None,
                     max_seqlen: Optional[int] = None, window_size=(-1, -1), return_lse=False, softcap=0.0):
        if softcap:
            raise NotImplementedError("ring attention does not soft-cap scores (Gemma 2): use "
                                      "--context-parallel-size 1")
        if cu_seqlens is None:
            return ring_attn_func(q, k, v, group, causal=causal, softmax_scale=softmax_scale,
                                  comm_type=comm_type, window_size=window_size, return_lse=return_lse)
        if q.shape[0] != 1:
            raise ValueError("packed sequences (cu_seqlens) need batch size 1")
        res = ring_attn_func(q[0], k[0], v[0], group, causal=causal, softmax_scale=softmax_scale,
                             comm_type=comm_type, cu_seqlens=cu_seqlens.to(torch.int32),
                             max_seqlen=max_seqlen, window_size=window_size, return_lse=return_lse)
        return _packed_as_batch(res, return_lse)

    return cp_attention
