"""What one engine step hands the model: packed tokens plus where their K/V live in the cache.

The engine always runs the model on one packed row (``input_ids`` of shape (1, N)), so prefill
of many prompts and decode of many sequences are the same call with different metadata:

- **prefill**: N = the new tokens of several sequences back to back (``cu_seqlens`` marks the
  boundaries, varlen attention keeps each sequence to itself; the sequences hold no cached
  prefix). Their K/V are written to the cache as a side effect.
- **decode**: N = one token per sequence; each attends over its cached tokens with the paged
  split-KV kernel (``kernels.decode_attention``), its own K/V written to the cache first.

- **prefill chunk** (``prefix_seq`` set): N = the next tokens of one long prompt whose earlier
  tokens are already cached; they attend over the cached prefix and themselves (q shorter
  than k/v, causal aligned bottom-right; under cp, over each rank's prefix shard and merged
  by LSE). Long prompts (a resumed 100K-token partial rollout) are prefilled chunk by chunk
  so activations stay bounded by the chunk size.

Rows added to reach a multiple of the tp size (sequence parallelism splits N) are *padding*:
slot -1 (written to the cache's scratch block) and, in decode, a cached length of 0.

``InferenceBatch.layer(j)`` is what the model's j-th layer of this pipeline stage receives as
``kv_cache``; its ``attend(q, k, v, scale)`` takes q/k/v of shape (1, N, heads, head_dim) and
returns attention output of q's shape. Prefill uses ``prefill_attention`` (a single-device
backend of ``models.attention``: generation runs whole sequences on every rank, also under
context parallelism).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

from megatron_k15.kernels.decode_attention import paged_decode_attention
from megatron_k15.models.attention import AttentionFn, apply_attention_sinks, sdpa_attention


@dataclass
class InferenceBatch:
    cache: object  # generation.kv_cache.PagedKVCache of this pipeline stage's layers
    slots: torch.Tensor  # (N,) int64 flat cache slot of every token, -1 for padding; (groups, N) with several cache groups
    decode: bool
    cu_seqlens: Optional[torch.Tensor] = None  # prefill: (n_seqs + 1,) int32
    max_seqlen: Optional[int] = None
    block_tables: Optional[torch.Tensor] = None  # decode: (N, max_blocks) int32; (groups, N, max_blocks) with several cache groups
    seq_lens: Optional[torch.Tensor] = None  # decode: (N,) int32, current token included
    decode_impl: str = "auto"
    prefill_attention: AttentionFn = sdpa_attention
    cp_group: Optional[object] = None  # decode: the cache is sharded over it; merge by LSE
    prefix_seq: Optional[object] = None  # prefill chunk: the sequence whose cache holds the prefix
    context_len: int = 0  # prefill chunk: cached slots to attend over (this rank's, under cp)
    chunk_rows: int = 0  # prefill chunk: real rows of N (the rest is padding)
    decode_max_len: Optional[int] = None  # decode: max(seq_lens), known on the host
    validated: bool = False  # decode: the first layer's call checked the shared tables
    resolved_slots: Optional[torch.Tensor] = None  # ``slots`` resolved once (the first layer), for all

    def layer(self, j: int) -> "LayerKVCache":
        return LayerKVCache(self, j)


class LayerKVCache:
    """One layer's view of an ``InferenceBatch``."""

    def __init__(self, batch: InferenceBatch, layer: int):
        self.batch = batch
        self.index = layer

    def attend(self, q, k, v, softmax_scale, window_size=(-1, -1), sinks=None, softcap=0.0):
        """``window_size=(left, 0)``: the layer's sliding window (its queries see their last
        left + 1 tokens); ``sinks``: the layer's attention sinks (gpt-oss, this rank's heads);
        ``softcap``: the scores' soft cap (Gemma 2)."""
        out_lse = self._attend(q, k, v, softmax_scale, window_size, sinks is not None, softcap=softcap)
        if sinks is None:
            return out_lse
        out, lse = out_lse  # lse laid out like out without head_dim
        return apply_attention_sinks(out, lse, sinks)

    @property
    def latent(self) -> bool:
        """MLA's latent cache (``PagedKVCache(keys_only=True)``): one row per token, which the
        layer expands to K/V (prefill over a cached prefix) or absorbs its queries into (decode)."""
        return self.batch.cache.keys_only

    @property
    def decoding(self) -> bool:
        return self.batch.decode

    def attend_latent(self, q, latent, softmax_scale, k=None, v=None, expand=None):
        """Attention through a latent cache. ``latent`` (1, N, 1, r): the new tokens' rows, written
        to the cache. Decode: ``q`` (1, N, heads, r) holds queries absorbed into the latent space
        and attends over the cached rows as keys and values (out (1, N, heads, r)). Prefill:
        ``q, k, v`` are the expanded heads of the new tokens; a chunk over a cached prefix also
        attends over ``expand(rows)`` -> (K, V) of the prefix's rows (T, 1, r)."""
        return self._attend(q, k, v, softmax_scale, (-1, -1), False, latent=latent, expand=expand)

    def _attend(self, q, k, v, softmax_scale, window_size, with_lse: bool, latent=None, expand=None,
                softcap=0.0):
        b = self.batch
        window_left = window_size[0]
        kw = {} if window_left < 0 else {"window_size": window_size}
        if with_lse:
            kw["return_lse"] = True
        if softcap:
            kw["softcap"] = softcap
        if (window_left >= 0 or with_lse or softcap) and b.cp_group is not None:
            raise NotImplementedError("context-parallel decode of sliding-window layers, attention sinks or "
                                      "soft-capped scores is not supported (the cache shards hold every cp-th "
                                      "position): generate without --context-parallel-size")
        cache = b.cache
        if b.resolved_slots is None:
            b.resolved_slots = cache.resolve_slots(b.slots)
        if latent is None:
            cache.write_rows(self.index, b.resolved_slots, k[0], v[0])
        else:
            cache.write_rows(self.index, b.resolved_slots, latent[0], None)
        if b.prefix_seq is not None:
            n = b.chunk_rows
            if b.cp_group is None:  # the prefix and the chunk's own K/V are all in the cache
                # a sliding layer reads from its first query's window on (its cache holds no
                # more); the keys still end at the chunk's last token, so the bottom-right
                # alignment of q and k is unchanged
                start = 0 if window_left < 0 else max(0, b.context_len - n - window_left)
                k_all, v_all = cache.gather(self.index, b.prefix_seq, b.context_len, start)
                if expand is not None:
                    k_all, v_all = expand(k_all)
                out = b.prefill_attention(q[:, :n], k_all[None], v_all[None], causal=True,
                                          softmax_scale=softmax_scale, **kw)
                if with_lse:
                    out, lse = out[0], out[1].transpose(1, 2)
                    if n < q.shape[1]:
                        lse = torch.cat([lse, lse.new_full((1, q.shape[1] - n, lse.shape[2]), float("-inf"))], 1)
            else:
                out = self._chunk_attention_cp(q[0, :n], k[0, :n], v[0, :n], softmax_scale, expand)[None]
            if n < q.shape[1]:  # padding rows
                out = torch.cat([out, out.new_zeros(1, q.shape[1] - n, *out.shape[2:])], dim=1)
            return (out, lse) if with_lse else out
        if not b.decode:
            res = b.prefill_attention(q, k, v, causal=True, softmax_scale=softmax_scale,
                                      cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen, **kw)
            return (res[0], res[1].transpose(1, 2)) if with_lse else res
        validate, b.validated = not b.validated, True
        if b.cp_group is None:
            res = paged_decode_attention(
                q[0], cache.k_cache(self.index), cache.v_cache(self.index),
                cache.for_layer(b.block_tables, self.index), b.seq_lens, softmax_scale=softmax_scale, impl=b.decode_impl, max_seq_len=b.decode_max_len,
                validate=validate, window_left=window_left, return_lse=with_lse, softcap=softcap)
            return (res[0].unsqueeze(0), res[1].unsqueeze(0)) if with_lse else res.unsqueeze(0)
        out, lse = paged_decode_attention(
            q[0], cache.k_cache(self.index), cache.v_cache(self.index), b.block_tables, b.seq_lens,
            softmax_scale=softmax_scale, return_lse=True, impl=b.decode_impl, max_seq_len=b.decode_max_len,
            validate=validate)
        return merge_cp_partials(out, lse, b.cp_group).unsqueeze(0)


    def _chunk_attention_cp(self, q, k, v, softmax_scale, expand=None):
        """A prefill chunk under context-parallel decode: every cp rank runs the chunk, but
        each holds only its share of the cached prefix (positions p % cp == rank). The chunk
        attends causally over its own K/V (the same on every rank) and without a mask over each
        rank's prefix shard (all earlier positions); the partials merge by their LSE."""
        b = self.batch
        kp, vp = b.cache.gather(self.index, b.prefix_seq, b.context_len)
        if expand is not None:
            kp, vp = expand(kp)
        out_self, lse_self = attention_with_lse(q, k, v, causal=True, softmax_scale=softmax_scale)
        out_pre, lse_pre = attention_with_lse(q, kp, vp, causal=False, softmax_scale=softmax_scale)
        return merge_cp_partials(out_pre, lse_pre, b.cp_group, extra=(out_self, lse_self))


def attention_with_lse(q, k, v, *, causal: bool, softmax_scale: float):
    """(out (S_q, H, D) in q's dtype, lse (S_q, H) fp32) of q (S_q, H, D) over k/v (S_k, KV, D),
    GQA, causal aligned bottom-right; no keys: out 0, lse -inf. Our Triton kernel on GPU; on
    CPU the PyTorch reference in fp32 (O(S_q * S_k) memory: what CPU-sized tests need). Head
    sizes the kernel does not take (MLA's 192) are zero-padded for it."""
    from megatron_k15.kernels.flash_attention import attention_reference, flash_attn_func
    from megatron_k15.models.attention import pad_head_dim

    sq, h, d = q.shape
    if k.shape[0] == 0:
        return torch.zeros_like(q), torch.full((sq, h), float("-inf"), device=q.device)
    attend = pad_head_dim(flash_attn_func, d) if q.is_cuda else partial(attention_reference, upcast=torch.float32)
    out, lse = attend(q[None], k[None], v[None], causal=causal, softmax_scale=softmax_scale,
                      return_lse=True)
    return out[0].to(q.dtype), lse[0].transpose(0, 1).float()


def merge_cp_partials(out: torch.Tensor, lse: torch.Tensor, group, extra=None) -> torch.Tensor:
    """Attention over a KV cache sharded across ``group`` from each rank's partial (out, lse):
    out = sum_r exp(lse_r - m) out_r / sum_r exp(lse_r - m), m = max_r lse_r, in fp32; rows no
    rank has keys for (lse = -inf everywhere) give 0. ``extra`` = (out, lse) is one more
    partial, the same on every rank, counted once. Every rank gets the same result."""
    import torch.distributed as dist

    n = dist.get_world_size(group)
    outs = [torch.empty_like(out) for _ in range(n)]
    lses = [torch.empty_like(lse) for _ in range(n)]
    dist.all_gather(outs, out.contiguous(), group=group)
    dist.all_gather(lses, lse.contiguous(), group=group)
    if extra is not None:
        outs.append(extra[0])
        lses.append(extra[1])
    o = torch.stack(outs).float()  # (cp, N, H, D)
    l = torch.stack(lses).float()  # (cp, N, H)
    m = l.max(dim=0).values
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(l - m)  # exp(-inf) = 0 for ranks without keys
    denom = w.sum(dim=0).clamp(min=1e-30)
    return ((w[..., None] * o).sum(dim=0) / denom[..., None]).to(out.dtype)
