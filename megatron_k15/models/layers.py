"""Building blocks of the Llama/Qwen2/Qwen3(-MoE) decoder with tensor + sequence parallelism.

Parameters live in megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear`` /
``VocabParallelEmbedding`` (sharding, initialisation, the tp all-reduces). Sequence-parallel
communication is ours (``parallel.tensor``) because megatron-core's is CUDA-only:

    column layer:  all-gather(seq) -> X @ W_shard          (backward: re-gather X for dW,
                                                            reduce-scatter of dX; only the
                                                            local X shard is saved)
    row layer:     X_shard @ W_shard -> reduce-scatter(seq) (or all-reduce without SP)

Activations are [s, b, h]; under sequence parallelism each tp rank holds s / tp of them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)

from megatron_k15.kernels.grouped_gemm import grouped_linear
from megatron_k15.models.attention import AttentionFn, apply_attention_sinks
from megatron_k15.models.config import GPTConfig
from megatron_k15.models.rope import apply_rotary
from megatron_k15.parallel.expert import run_experts_parallel
from megatron_k15.parallel.tensor import (
    all_reduce_sum,
    gather_from_sequence_parallel_region,
    linear_with_sequence_parallel_gather,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)


def normal_init(std: float) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: torch.nn.init.normal_(w, mean=0.0, std=std)


def enter_tp_region(x: torch.Tensor, tp_group, sequence_parallel: bool) -> torch.Tensor:
    """The whole sequence on every tp rank, for a block whose GEMMs then give partial input
    gradients (``MoEMLP``, ``MultiLatentAttention``): gathered under SP (backward: the partial
    gradients reduce-scattered), else the same tensor with its gradient all-reduced over tp."""
    if sequence_parallel:
        return gather_from_sequence_parallel_region(x, tp_group)
    if tp_group.size() > 1:
        return copy_to_tensor_model_parallel_region(x, group=tp_group)
    return x


def mark_partial_over_tp(module: torch.nn.Module, tp: int) -> torch.nn.Module:
    """Mark ``module``'s parameters as replicated over tp with partial gradients there (each
    rank's covers its heads' or ffn slice's part; summed over tp before the step)."""
    for p in module.parameters():
        p.tp_replicated = True
        p.tp_partial_grad = tp > 1
    return module


class RMSNorm(torch.nn.Module):
    """y = (offset + w) * x / sqrt(mean(x^2) + eps), computed in fp32 and cast back (as in HF;
    ``offset`` 1 for Gemma, whose weights sit around 0)."""

    def __init__(self, hidden_size: int, eps: float, sequence_parallel: bool = False,
                 dtype: torch.dtype = torch.float32, tp_partial_grad: bool = False,
                 weight_in_fp32: bool = False, offset: float = 0.0):
        super().__init__()
        self.eps = eps
        self.offset = float(offset)
        self.weight_in_fp32 = weight_in_fp32  # OLMo, Gemma: w * x in fp32, then cast
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        # Replicated on every tp rank (counted once in the grad norm); under SP each rank sees a
        # different slice of the sequence, so its grads are partial sums to all-reduce over tp.
        # ``tp_partial_grad``: the same for another reason (a per-head norm sees only the local
        # heads); see ``parallel.tensor.grad_is_partial_over_tp``.
        self.weight.tp_replicated = True
        self.weight.sequence_parallel = sequence_parallel
        self.weight.tp_partial_grad = tp_partial_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_fp32:
            return ((self.weight.float() + self.offset) * x32).to(dtype)
        weight = self.weight + self.offset if self.offset else self.weight
        return weight * x32.to(dtype)


class AllHeadsRMSNorm(torch.nn.Module):
    """OLMo 2/3's q/k norm: RMSNorm over all heads of a token at once (one weight per channel
    of the projection), y = w * x / sqrt(sum_heads,d x^2 / (heads * d) + eps). Under tp a rank
    holds its heads' channels (the weight is split like the projection's rows) and the sum of
    squares is all-reduced over tp, differentiably (every rank uses the total)."""

    def __init__(self, local_size: int, full_size: int, eps: float, tp_group, dtype: torch.dtype):
        super().__init__()
        self.eps, self.full_size, self.tp_group = eps, full_size, tp_group
        self.weight = torch.nn.Parameter(torch.ones(local_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., local heads, head_dim)."""
        dtype, shape = x.dtype, x.shape
        x32 = x.float().flatten(-2)
        sum_sq = all_reduce_sum(x32.pow(2).sum(-1, keepdim=True), self.tp_group)
        x32 = x32 * torch.rsqrt(sum_sq / self.full_size + self.eps)
        return (self.weight.float() * x32).to(dtype).view(shape)


class ColumnLinear(ColumnParallelLinear):
    """Output-sharded linear; gathers the sequence first when sequence parallel. Under SP the
    all-gather and the GEMM are one autograd function that saves the local input shard (not
    the gathered one, tp times larger) and re-gathers it in backward, as Megatron does."""

    def __init__(self, input_size, output_size, *, mp_config, init_method, bias, tp_group,
                 sequence_parallel, skip_weight_param_allocation=False):
        super().__init__(
            input_size, output_size, config=mp_config, init_method=init_method, bias=bias,
            gather_output=False, skip_weight_param_allocation=skip_weight_param_allocation,
            disable_grad_reduce=sequence_parallel and tp_group.size() > 1, tp_group=tp_group,
        )
        self.sp = sequence_parallel and tp_group.size() > 1
        self.tp = tp_group.size()

    def forward(self, x: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.sp and self.tp > 1:  # megatron-core's: the input grad all-reduced over tp
            out, _ = super().forward(x, weight=weight)
            return out
        if weight is None:
            if self.weight is None:
                raise RuntimeError("ColumnLinear built with skip_weight_param_allocation needs the "
                                   "weight passed to forward")
            weight = self.weight
        elif tuple(weight.shape) != (self.output_size_per_partition, self.input_size):
            raise RuntimeError(f"supplied weight's shape is {tuple(weight.shape)}, not "
                               f"{(self.output_size_per_partition, self.input_size)} as expected")
        bias = None if self.skip_bias_add else self.bias
        if not self.sp:  # one rank: a plain GEMM (megatron-core's path costs ~50 us of Python a call)
            return F.linear(x, weight, bias)
        return linear_with_sequence_parallel_gather(x, weight, bias, self.tp_group)


class RowLinear(RowParallelLinear):
    """Input-sharded linear; reduce-scatters over the sequence when sequence parallel."""

    def __init__(self, input_size, output_size, *, mp_config, init_method, bias, tp_group,
                 sequence_parallel):
        super().__init__(
            input_size, output_size, config=mp_config, init_method=init_method, bias=bias,
            input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
        )
        self.sp = sequence_parallel and tp_group.size() > 1
        if self.bias is not None:  # added once, after the reduction: the same on every tp rank
            self.bias.tp_replicated = True
            self.bias.sequence_parallel = self.sp  # under SP each rank's grad covers its slice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if self.sp:
            out = reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
        elif self.tp_group.size() > 1:
            out = reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        if self.bias is not None:
            out = out + self.bias
        return out


class Embedding(VocabParallelEmbedding):
    """Vocab-sharded embedding: ids (b, s) -> [s, b, h] (s / tp of it under SP)."""

    def __init__(self, vocab_size, hidden_size, *, mp_config, init_method, tp_group,
                 sequence_parallel):
        super().__init__(
            vocab_size, hidden_size, init_method=init_method, reduce_scatter_embeddings=False,
            config=mp_config, tp_group=tp_group,
        )
        self.sp = sequence_parallel and tp_group.size() > 1

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(input_ids).transpose(0, 1).contiguous()
        if self.sp:
            out = scatter_to_sequence_parallel_region(out, self.tp_group)
        return out


class AttentionCore(torch.nn.Module):
    """What every attention variant shares once it has q, k, v of its local heads: the core
    (training and log-prob passes: the backend, selective recompute, windows, sinks) or the
    KV cache (generation). Subclasses set ``attention_fn``, ``softmax_scale``,
    ``window_size`` and ``sinks`` (``softcap``: Gemma 2's score cap, 0 by default)."""

    softcap = 0.0

    def _attend(self, q, k, v, cu_seqlens, max_seqlen, recompute_attention, kv_cache) -> torch.Tensor:
        """q, k, v [s, b, heads, d] -> the attention output [s, b, heads, d]."""
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        if kv_cache is not None:
            out = kv_cache.attend(q, k, v, self.softmax_scale, self.window_size, self.sinks, softcap=self.softcap)
        elif recompute_attention:
            # selective recompute: drop the attention core's saved activations, keep the GEMMs'
            out = torch.utils.checkpoint.checkpoint(
                self._core, q, k, v, cu_seqlens, max_seqlen, use_reentrant=False)
        else:
            out = self._core(q, k, v, cu_seqlens, max_seqlen)
        return out.transpose(0, 1)

    def _core(self, q, k, v, cu_seqlens, max_seqlen):
        # only what the layer uses is passed: backends without windows or lse work as before
        kw = {} if self.window_size[0] < 0 else {"window_size": self.window_size}
        if self.softcap:
            kw["softcap"] = self.softcap
        if self.sinks is None:
            return self.attention_fn(q, k, v, causal=True, softmax_scale=self.softmax_scale,
                                     cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **kw)
        out, lse = self.attention_fn(q, k, v, causal=True, softmax_scale=self.softmax_scale,
                                     cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, return_lse=True, **kw)
        return apply_attention_sinks(out, lse.transpose(1, 2), self.sinks)


class SelfAttention(AttentionCore):
    """GQA self-attention. The fused QKV weight is grouped per KV head:
    [q heads of group 0, k_0, v_0, q heads of group 1, k_1, v_1, ...], so a contiguous tp
    shard holds whole groups. With ``qk_layernorm`` (Qwen3) each head's q and k are
    RMS-normalised over head_dim (one weight shared by all heads) before RoPE; with
    ``qk_layernorm_scope == "all"`` (OLMo) over all heads of a token (``AllHeadsRMSNorm``).
    A sliding layer (``cfg.is_sliding_layer(layer_number)``) attends through its window."""

    def __init__(self, cfg: GPTConfig, mp_config, tp_group, sequence_parallel: bool,
                 attention_fn: AttentionFn, layer_number: int = 0):
        super().__init__()
        tp = tp_group.size()
        left = cfg.window_left(layer_number)
        self.window_size = (left, 0) if left >= 0 else (-1, -1)
        self.use_rope = cfg.uses_rope(layer_number)
        self.head_dim = cfg.head_dim
        self.groups_local = cfg.num_query_groups // tp
        self.heads_per_group = cfg.num_attention_heads // cfg.num_query_groups
        self.softmax_scale = cfg.attention_softmax_scale or 1.0 / math.sqrt(cfg.head_dim)
        self.softcap = cfg.attn_logit_softcapping or 0.0
        self.attention_fn = attention_fn
        qkv_size = cfg.query_projection_size + 2 * cfg.kv_projection_size
        init = normal_init(cfg.init_method_std)
        out_init = normal_init(cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers))
        self.linear_qkv = ColumnLinear(
            cfg.hidden_size, qkv_size, mp_config=mp_config, init_method=init,
            bias=cfg.add_qkv_bias, tp_group=tp_group, sequence_parallel=sequence_parallel,
        )
        self.linear_proj = RowLinear(
            cfg.query_projection_size, cfg.hidden_size, mp_config=mp_config, init_method=out_init,
            bias=cfg.add_attention_output_bias, tp_group=tp_group, sequence_parallel=sequence_parallel,
        )
        # gpt-oss: one sink logit per query head (this rank's heads under tp)
        self.sinks = None
        if cfg.attention_sinks:
            self.sinks = torch.nn.Parameter(torch.zeros(cfg.num_attention_heads // tp, dtype=mp_config.params_dtype))
        self.q_layernorm = self.k_layernorm = None
        self.q_norm_all_heads = self.k_norm_all_heads = None
        if cfg.qk_layernorm and cfg.qk_layernorm_scope == "all":
            dtype = mp_config.params_dtype
            self.q_norm_all_heads = AllHeadsRMSNorm(cfg.query_projection_size // tp, cfg.query_projection_size,
                                                    cfg.norm_epsilon, tp_group, dtype)
            self.k_norm_all_heads = AllHeadsRMSNorm(cfg.kv_projection_size // tp, cfg.kv_projection_size,
                                                    cfg.norm_epsilon, tp_group, dtype)
        elif cfg.qk_layernorm:
            dtype = mp_config.params_dtype
            kw = dict(dtype=dtype, tp_partial_grad=tp > 1, weight_in_fp32=cfg.norm_in_fp32, offset=cfg.norm_weight_offset)
            self.q_layernorm = RMSNorm(cfg.head_dim, cfg.norm_epsilon, **kw)
            self.k_layernorm = RMSNorm(cfg.head_dim, cfg.norm_epsilon, **kw)

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None, recompute_attention=False,
                kv_cache=None):
        """``kv_cache`` (generation only): this layer's view of the engine's paged KV cache
        (``generation.inference_batch.LayerKVCache``); the new K/V are written to it and the
        attention reads the cache (decode) or runs on the packed prompts (prefill)."""
        qkv = self.linear_qkv(x)
        s, b = qkv.shape[:2]
        qkv = qkv.view(s, b, self.groups_local, self.heads_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.heads_per_group].reshape(s, b, -1, self.head_dim)
        k = qkv[:, :, :, self.heads_per_group]
        v = qkv[:, :, :, self.heads_per_group + 1]
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        elif self.q_norm_all_heads is not None:
            q, k = self.q_norm_all_heads(q), self.k_norm_all_heads(k)
        if self.use_rope:
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        out = self._attend(q, k, v, cu_seqlens, max_seqlen, recompute_attention, kv_cache)
        return self.linear_proj(out.reshape(s, b, -1))


class MultiLatentAttention(AttentionCore):
    """DeepSeek-V2/V3's multi-head latent attention (MLA), per token x (shapes per head):

        q = up_q(norm(down_q(x)))  (or q_proj(x) without --q-lora-rank)   [q_rope dr; q_nope dn]
        [c; k_rope] = down_kv(x);  [k_nope dn; v dv] = up_kv(norm(c))    (c: kv_lora_rank)
        k = [rope(k_rope) (one for all heads); k_nope],  q = [rope(q_rope); q_nope]
        out = o_proj(softmax(q k^T * scale) v)

    The rotated channels come first in q and k (our RoPE rotates a head's first ones; the
    conversion reorders HF's [nope; rope] rows), so q.k is HF's. The core and the KV cache see
    every head at one size d = max(dn + dr, dv): v (or q, k) zero-padded, which changes no
    score and no output channel kept. Tensor parallelism splits the heads (up_q, up_kv, o_proj);
    the down projections and their norms are replicated and see the whole sequence: the input
    is gathered (SP) or entered with an all-reduce of its gradient, as in ``MoEMLP``, so every
    GEMM after it gives partial input gradients, summed there, and the replicated weights get
    partial gradients (``tp_partial_grad``)."""

    def __init__(self, cfg: GPTConfig, mp_config, tp_group, sequence_parallel: bool,
                 attention_fn: AttentionFn, layer_number: int = 0):
        super().__init__()
        tp = tp_group.size()
        self.tp_group = tp_group
        self.sp = sequence_parallel and tp > 1
        self.window_size = (-1, -1)  # (GPTConfig refuses sliding windows and sinks with MLA)
        self.sinks = None
        self.attention_fn = attention_fn
        self.softmax_scale = cfg.attention_softmax_scale or cfg.mla_softmax_scale()
        self.heads = cfg.num_attention_heads // tp
        self.dr, self.dn, self.dv = cfg.qk_pos_emb_head_dim, cfg.qk_head_dim, cfg.v_head_dim
        self.head_dim, self.kv_lora_rank = cfg.head_dim, cfg.kv_lora_rank
        h, dtype, std = cfg.hidden_size, mp_config.params_dtype, cfg.init_method_std
        dqk = self.dr + self.dn

        def norm(size):
            return mark_partial_over_tp(RMSNorm(size, cfg.mla_latent_norm_epsilon, dtype=dtype), tp)

        if cfg.q_lora_rank:
            self.linear_q_down_proj = mark_partial_over_tp(DenseWeight(cfg.q_lora_rank, h, dtype, std), tp)
            self.q_a_layernorm = norm(cfg.q_lora_rank)
            self.linear_q_up_proj = DenseWeight(self.heads * dqk, cfg.q_lora_rank, dtype, std)
        else:
            self.linear_q_proj = DenseWeight(self.heads * dqk, h, dtype, std)
        self.linear_kv_down_proj = mark_partial_over_tp(DenseWeight(cfg.kv_lora_rank + self.dr, h, dtype, std), tp)
        self.kv_a_layernorm = norm(cfg.kv_lora_rank)
        self.linear_kv_up_proj = DenseWeight(self.heads * (self.dn + self.dv), cfg.kv_lora_rank, dtype, std)
        self.linear_proj = RowLinear(
            cfg.value_projection_size, h, mp_config=mp_config,
            init_method=normal_init(std / math.sqrt(2.0 * cfg.num_layers)), bias=False, tp_group=tp_group,
            sequence_parallel=sequence_parallel)

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None, recompute_attention=False,
                kv_cache=None):
        x = enter_tp_region(x, self.tp_group, self.sp)
        s, b = x.shape[:2]
        if hasattr(self, "linear_q_proj"):
            q = F.linear(x, self.linear_q_proj.weight)
        else:
            q = F.linear(self.q_a_layernorm(F.linear(x, self.linear_q_down_proj.weight)),
                         self.linear_q_up_proj.weight)
        q = apply_rotary(q.view(s, b, self.heads, self.dr + self.dn), cos, sin)
        latent, k_rope = F.linear(x, self.linear_kv_down_proj.weight).split([self.kv_lora_rank, self.dr], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin)  # (s, b, 1, dr): one for all heads
        if kv_cache is not None and kv_cache.latent and kv_cache.decoding:
            out = self._decode_latent(q, latent, k_rope, kv_cache)
        else:
            k, v = self._expand(latent.unsqueeze(2), k_rope)
            q = self._pad(q)
            if kv_cache is not None and kv_cache.latent:  # prefill: fresh heads, the latent cached
                rows = torch.cat([latent.unsqueeze(2), k_rope], dim=-1).transpose(0, 1)
                out = kv_cache.attend_latent(q.transpose(0, 1), rows, self.softmax_scale, k.transpose(0, 1),
                                             v.transpose(0, 1), expand=self._expand_rows).transpose(0, 1)
            else:
                out = self._attend(q, k, v, cu_seqlens, max_seqlen, recompute_attention, kv_cache)
        return self.linear_proj(out[..., :self.dv].reshape(s, b, -1))

    def _pad(self, t: torch.Tensor) -> torch.Tensor:
        """Zero channels up to the core's head size (``head_dim``)."""
        return t if t.shape[-1] == self.head_dim else F.pad(t, (0, self.head_dim - t.shape[-1]))

    def _expand(self, latent: torch.Tensor, k_rope: torch.Tensor):
        """K, V of every head, padded to the core's size, from normalised latents (..., 1, kvl)
        and rotated shared keys (..., 1, dr)."""
        kv = F.linear(latent, self.linear_kv_up_proj.weight)
        k_nope, v = kv.view(*kv.shape[:-2], self.heads, self.dn + self.dv).split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_rope.expand(*k_nope.shape[:-1], self.dr), k_nope], dim=-1)
        return self._pad(k), self._pad(v)

    def _expand_rows(self, rows: torch.Tensor):
        """``_expand`` of cached latent rows (T, 1, kvl + dr) = [latent; rotated shared key]."""
        latent, k_rope = rows.split([self.kv_lora_rank, self.dr], dim=-1)
        return self._expand(latent.to(self.linear_kv_up_proj.weight.dtype), k_rope)

    def _decode_latent(self, q, latent, k_rope, kv_cache) -> torch.Tensor:
        """Decode over the latent cache (DeepSeek's absorbed MLA): q_nope . k_nope =
        (q_nope W_uk) . latent per head, so each head's query moves into the latent space and
        attends over the cached rows [latent; k_rope] as its keys, and their latent channels
        as its values; the result comes back through W_uv. The cache holds kvl + dr values per
        token and layer instead of 2 x heads x head_dim. Returns (s, b, heads, dv)."""
        w = self.linear_kv_up_proj.weight.view(self.heads, self.dn + self.dv, self.kv_lora_rank)
        w_uk, w_uv = w[:, :self.dn], w[:, self.dn:]
        q_rope, q_nope = q.split([self.dr, self.dn], dim=-1)
        q_latent = torch.einsum("sbhn,hnc->sbhc", q_nope, w_uk)
        rows = torch.cat([latent.unsqueeze(2), k_rope], dim=-1).transpose(0, 1)
        out = kv_cache.attend_latent(torch.cat([q_latent, q_rope], dim=-1).transpose(0, 1), rows,
                                     self.softmax_scale).transpose(0, 1)
        return torch.einsum("sbhc,hvc->sbhv", out[..., :self.kv_lora_rank], w_uv)


def gated_activation(gate: torch.Tensor, up: torch.Tensor, cfg: GPTConfig) -> torch.Tensor:
    """silu(gate) * up (SwiGLU), or gpt-oss's clamped variant: gate <= limit, |up| <= limit,
    (up + 1) * gate * sigmoid(alpha * gate)."""
    if cfg.activation == "swiglu":
        return F.silu(gate) * up
    if cfg.activation == "geglu_tanh":  # Gemma's gelu_pytorch_tanh
        return F.gelu(gate, approximate="tanh") * up
    gate = gate.clamp(max=cfg.swiglu_limit)
    up = up.clamp(min=-cfg.swiglu_limit, max=cfg.swiglu_limit)
    return (up + 1) * gate * torch.sigmoid(gate * cfg.swiglu_alpha)


def gated_mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, cfg: GPTConfig,
              b1: Optional[torch.Tensor] = None, b2: Optional[torch.Tensor] = None) -> torch.Tensor:
    """down(act(gate, up)) with [gate; up] = x w1^T (+ b1) and down = . w2^T (+ b2): one expert,
    or the shared expert, on rows that already went through the layer's tp communication."""
    gate, up = F.linear(x, w1, b1).chunk(2, dim=-1)
    return F.linear(gated_activation(gate, up, cfg), w2, b2)


class SwiGLUMLP(torch.nn.Module):
    """down(act(gate(x), up(x))) (``gated_activation``: SwiGLU); gate and up fused in one
    column-parallel weight whose per-rank shard is [gate_shard; up_shard]."""

    def __init__(self, cfg: GPTConfig, mp_config, tp_group, sequence_parallel: bool):
        super().__init__()
        init = normal_init(cfg.init_method_std)
        out_init = normal_init(cfg.init_method_std / math.sqrt(2.0 * cfg.num_layers))
        self.linear_fc1 = ColumnLinear(
            cfg.hidden_size, 2 * cfg.ffn_hidden_size, mp_config=mp_config, init_method=init,
            bias=False, tp_group=tp_group, sequence_parallel=sequence_parallel,
        )
        self.linear_fc2 = RowLinear(
            cfg.ffn_hidden_size, cfg.hidden_size, mp_config=mp_config, init_method=out_init,
            bias=False, tp_group=tp_group, sequence_parallel=sequence_parallel,
        )
        self.cfg = cfg

    def forward(self, x):
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(gated_activation(gate, up, self.cfg))


class ExpertWeights(torch.nn.Module):
    """One linear weight per expert, stacked: (experts, out, in); with ``bias`` one bias per
    expert, (experts, out) (gpt-oss)."""

    def __init__(self, experts: int, out_features: int, in_features: int, dtype: torch.dtype,
                 bias: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(experts, out_features, in_features, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(experts, out_features, dtype=dtype)) if bias else None


class DenseWeight(torch.nn.Module):
    """A plain (out, in) weight for a GEMM whose input already went through the layer's tp
    communication (the shared expert inside ``MoEMLP``), drawn as normal(0, std)."""

    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype, std: float):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype).normal_(0.0, std))


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on ``x``; its backward also starts ``aux``'s backward with gradient 1. So a
    layer's auxiliary loss trains the router without travelling with the activations (or
    through the pipeline) to the task loss (Megatron's MoEAuxLossAutoScaler does the same)."""

    @staticmethod
    def forward(ctx, x, aux):
        ctx.save_for_backward(aux)
        return x

    @staticmethod
    def backward(ctx, grad):
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


def expert_counts(experts: torch.Tensor, num_experts: int, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(num_experts,) rows (or summed ``weights``) per expert id of ``experts``: a scatter-add,
    not ``torch.bincount``, whose CUDA kernel reads the ids' maximum back to the host."""
    flat = experts.reshape(-1)
    src = torch.ones_like(flat) if weights is None else weights.reshape(-1)
    return src.new_zeros(num_experts).scatter_add_(0, flat, src)


class MoEMLP(torch.nn.Module):
    """Top-k routed SwiGLU experts (Qwen3-MoE, gpt-oss, DeepSeek-V3; no token dropping).

    Router: p = softmax(x W_r^T) in fp32 over the E experts; token t goes to its k most
    probable experts e with weight p_e (renormalised over the k when ``moe_norm_topk_prob``):
    out_t = sum_e p_e * down_e(silu(gate_e(x_t)) * up_e(x_t)).
    DeepSeek-V3's router (``route``): p = sigmoid(x W_r^T) in fp32; experts chosen by p + b (b
    the ``expert_bias`` buffer, aux-loss-free balancing), only among the best groups when
    grouped (a group scores by its best 2; DeepSeek-V2's softmax router by its best 1), weighted
    by p (renormalised) times the scaling factor. A shared expert (DeepSeek, GLM-4.5)
    adds a dense SwiGLU of every token to the routed sum; under tp it is split like the dense
    MLP and its partial output joins the experts' reduction. Qwen2-MoE gates it per token by
    sigmoid(x . g) (``moe_shared_expert_gate``).

    Tensor parallelism splits every expert's ffn like the dense MLP (Megatron's expert tensor
    parallelism with its size = tp): each rank routes all tokens (gathered from the
    sequence-parallel shards) with the replicated router, runs its ffn slice of the experts,
    and the partial outputs are reduced (scattered back under SP). A rank's router gradient
    covers only its slice, so it is a partial sum over tp (``tp_partial_grad``).
    Token copies are grouped by expert (one permutation) so each expert is one GEMM pair: all
    experts' in one grouped-GEMM launch per projection (``grouped_gemm``, no host sync), or a
    loop of per-expert GEMMs (which reads the counts on the host).

    Expert parallelism (``ep_group`` of more than one rank, ``parallel.expert``): this rank
    holds E / ep of the experts; the grouped copies go to the ranks owning their experts by
    all-to-all and come back. The router, the weighting and the sum stay local.

    Load balancing (``--moe-aux-loss-coeff``, Switch/GShard's loss as in Megatron-LM): per layer
    and microbatch of T tokens, aux = E / (k T^2) * sum_e (sum_t p_te) * count_e, with count_e
    the tokens routed to e; 1 when load and probability are uniform, E / k when one expert
    takes everything. Only real tokens count: ``token_mask`` (b, s), 0 on padding (padded
    rows, a packed row's tail, context-parallel padding), leaves them out of T, the sums and
    the counts. Under context parallelism the sequence's T and counts are all-reduced over the
    cp group and each rank adds the term of its own tokens' probabilities, so the ranks' terms
    (and gradients) add up to the aux of the whole sequence. It enters the
    gradient as coeff * aux * ``aux_loss_scale`` (1 / microbatches of the step) through
    ``_AttachAuxLoss``, divided by tp because every tp rank computes it on the same tokens
    and the router's gradient and the input's are summed over tp."""

    def __init__(self, cfg: GPTConfig, mp_config, tp_group, sequence_parallel: bool, cp_group=None,
                 ep_group=None):
        super().__init__()
        tp = tp_group.size()
        self.tp_group = tp_group
        self.cp_group = cp_group if cp_group is not None and cp_group.size() > 1 else None
        self.ep_group = ep_group if ep_group is not None and ep_group.size() > 1 else None
        ep = 1 if self.ep_group is None else self.ep_group.size()
        if cfg.num_moe_experts % ep:
            raise ValueError(f"--num-experts {cfg.num_moe_experts} does not split over "
                             f"--expert-model-parallel-size {ep}")
        self.tp = tp
        self.sp = sequence_parallel and tp > 1
        self.topk, self.norm_topk = cfg.moe_router_topk, cfg.moe_norm_topk_prob
        self.num_experts = cfg.num_moe_experts
        dtype = mp_config.params_dtype
        h, f = cfg.hidden_size, cfg.moe_ffn_hidden_size // tp
        self.cfg = cfg
        self.tp_rank = tp_group.rank()
        self.router = mark_partial_over_tp(torch.nn.Linear(h, self.num_experts, bias=cfg.moe_router_bias, dtype=dtype), tp)
        self.sigmoid = cfg.moe_router_score_function == "sigmoid"
        self.router_fp32 = cfg.moe_router_dtype == "fp32"
        self.groups = cfg.moe_router_num_groups or 1
        self.group_topk = cfg.moe_router_group_topk or 1
        self.group_score_topk = cfg.moe_router_group_score_topk
        self.scaling = cfg.moe_router_topk_scaling_factor
        if cfg.moe_router_enable_expert_bias:  # in the state dict, not trained by the optimizer
            self.router.register_buffer("expert_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        self.shared_experts = None
        if cfg.moe_shared_expert_intermediate_size:  # [gate_r; up_r] rows and down_r columns of this rank
            fs = cfg.moe_shared_expert_intermediate_size // tp
            self.shared_experts = torch.nn.Module()
            self.shared_experts.linear_fc1 = DenseWeight(2 * fs, h, dtype, cfg.init_method_std)
            self.shared_experts.linear_fc2 = DenseWeight(h, fs, dtype, cfg.init_method_std)
            if cfg.moe_shared_expert_gate:  # Qwen2-MoE: sigmoid(x . g) per token, g replicated over tp
                self.shared_experts.gate_weight = torch.nn.Parameter(
                    torch.empty(1, h, dtype=dtype).normal_(0.0, cfg.init_method_std))
                # it scales this rank's partial shared output: its gradient is partial over tp too
                self.shared_experts.gate_weight.tp_replicated = True
                self.shared_experts.gate_weight.tp_partial_grad = tp > 1
        self.experts = torch.nn.Module()
        self.local_experts = self.num_experts // ep
        bias = cfg.moe_expert_bias
        self.experts.linear_fc1 = ExpertWeights(self.local_experts, 2 * f, h, dtype, bias)  # [gate; up]
        self.experts.linear_fc2 = ExpertWeights(self.local_experts, h, f, dtype, bias)
        if bias:  # fc2's bias is whole on every tp rank; rank 0 adds it (its grad is summed over tp)
            self.experts.linear_fc2.bias.tp_replicated = True
            self.experts.linear_fc2.bias.tp_partial_grad = tp > 1
        # one grouped-GEMM launch per projection for all experts instead of a loop of GEMM pairs
        # (GPTModel sets it: --moe-grouped-gemm); None: on CUDA tensors, the loop on CPU
        self.grouped_gemm: Optional[bool] = None
        self.aux_loss_coeff = 0.0
        self.aux_loss_scale = 1.0
        # real tokens routed to each expert in training forwards, while ``count_tokens``
        # (GPTModel.update_expert_bias); not state: a step's counts are used in the step
        self.count_tokens = False
        self.tokens_per_expert: Optional[torch.Tensor] = None
        self.aux_losses: list[torch.Tensor] = []  # detached, one per training forward (metrics)

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights (T, k) in the tokens' dtype, expert ids (T, k), fp32 probabilities (T, E):
        the scores normalised over the experts, what the load-balancing loss weighs)."""
        if self.router_fp32:  # DeepSeek's and GLM-4.5's (transformers keeps their gate in fp32)
            bias = None if self.router.bias is None else self.router.bias.float()
            logits = F.linear(tokens.float(), self.router.weight.float(), bias)
        else:  # in the tokens' dtype (as Qwen3-MoE's), scores in fp32
            logits = self.router(tokens).float()
        if not self.sigmoid:
            scores = probs = F.softmax(logits, dim=-1)
        else:
            scores = torch.sigmoid(logits)
            probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
        choice = scores.detach()  # the choice is not differentiable; the weights are
        if hasattr(self.router, "expert_bias"):
            choice = choice + self.router.expert_bias
        if self.groups > 1:  # keep the group_topk groups whose best choice scores sum highest
            grouped = choice.view(choice.shape[0], self.groups, -1)
            group_score = grouped.topk(self.group_score_topk, dim=-1).values.sum(dim=-1)
            best = group_score.topk(self.group_topk, dim=-1).indices
            keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(1, best, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)
        experts = choice.topk(self.topk, dim=-1).indices
        weights = scores.gather(1, experts)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if self.sigmoid else 0.0))
        if self.scaling is not None:
            weights = weights * self.scaling
        return weights.to(tokens.dtype), experts, probs

    def aux_loss(self, prob_sums: torch.Tensor, counts: torch.Tensor, num_tokens) -> torch.Tensor:
        """E / (k T^2) * sum_e P_e * count_e with P_e = sum_t p_te (see the class docstring)."""
        return (prob_sums * counts).sum() * self.num_experts / (self.topk * num_tokens * num_tokens)

    def _routing_aux_loss(self, probs: torch.Tensor, experts: torch.Tensor, token_mask) -> torch.Tensor:
        """This rank's term of the load-balancing loss over the real tokens (class docstring);
        ``probs`` (T, E) and ``experts`` (T, k) in the s-major order of the layer's tokens."""
        if token_mask is None:
            if self.cp_group is not None:  # the cp split pads every sequence: those must not count
                raise ValueError("the MoE load-balancing loss under context parallelism needs the microbatch's "
                                 "token_mask (0 on padding)")
            weight = probs.new_ones(probs.shape[0])
        else:  # (b, s) -> the tokens' (s, b) order
            weight = token_mask.transpose(0, 1).reshape(-1).to(probs.dtype)
        prob_sums = (probs * weight[:, None]).sum(dim=0)
        stats = torch.cat([expert_counts(experts, self.num_experts, weight.repeat_interleave(self.topk).to(probs.dtype)),
                           weight.sum().view(1)])
        if self.cp_group is not None:  # the whole sequence's counts and T (no gradient flows in stats)
            torch.distributed.all_reduce(stats, group=self.cp_group)
        return self.aux_loss(prob_sums, stats[:-1], stats[-1].clamp(min=1.0))

    def _run_local_experts(self, grouped: torch.Tensor, counts: torch.Tensor,
                           host_counts: Optional[list] = None) -> torch.Tensor:
        """This rank's experts on rows grouped by (local) expert, ``counts[e]`` rows each (on
        the rows' device: the grouped GEMM needs no host sync; the loop reads them, or takes
        ``host_counts`` when the caller already has them on the host)."""
        w1, w2 = self.experts.linear_fc1.weight, self.experts.linear_fc2.weight
        b1, b2 = self.experts.linear_fc1.bias, self.experts.linear_fc2.bias
        if b2 is not None and self.tp_rank != 0:  # partial sums over tp: the bias enters once
            b2 = b2 * 0.0
        grouped_gemm = grouped.is_cuda if self.grouped_gemm is None else self.grouped_gemm
        if grouped_gemm:  # every expert in one launch per GEMM (kernels/grouped_gemm.py)
            ends = counts.to(grouped.device).cumsum(0)
            row_expert = None
            if b1 is not None:  # each row's expert, without reading the counts on the host
                rows = torch.arange(grouped.shape[0], device=grouped.device)
                row_expert = torch.searchsorted(ends, rows, right=True)
            h1 = grouped_linear(grouped, w1, ends)
            if b1 is not None:
                h1 = h1 + b1.index_select(0, row_expert)
            gate, up = h1.chunk(2, dim=-1)
            out = grouped_linear(gated_activation(gate, up, self.cfg), w2, ends)
            return out if b2 is None else out + b2.index_select(0, row_expert)
        counts = counts.tolist() if host_counts is None else host_counts
        w1s, w2s = w1.unbind(0), w2.unbind(0)  # one view per expert: the weight's gradient is
        b1s = b2s = [None] * len(counts)  # assembled once, not per expert
        if b1 is not None:
            b1s, b2s = b1.unbind(0), b2.unbind(0)
        outs, start = [], 0
        for e, n in enumerate(counts):
            # no rows at all (expert parallelism: none of the group's tokens chose this rank's
            # experts): expert 0 on the empty rows, so the output still depends on the rows and
            # the weights and this rank's backward joins the others' all-to-alls and reductions
            if n or (e == len(counts) - 1 and not outs):
                i = 0 if not n else e
                outs.append(gated_mlp(grouped[start:start + n], w1s[i], w2s[i], self.cfg, b1s[i], b2s[i]))
                start += n
        return torch.cat(outs)

    @torch.no_grad()
    def serve_experts(self) -> None:
        """One forward's expert exchange with no tokens of this rank's own, so the other ranks
        of the ep group get their rows through this rank's experts (generation: a rank that
        has finished while another still decodes)."""
        if self.ep_group is None:
            return
        w = self.experts.linear_fc2.weight
        run_experts_parallel(w.new_zeros((0, w.shape[1])), torch.zeros(self.num_experts, dtype=torch.int64,
                             device=w.device), self.ep_group, self._run_local_experts)

    def forward(self, x, token_mask=None):
        x = enter_tp_region(x, self.tp_group, self.sp)
        tokens = x.reshape(-1, x.shape[-1])
        weights, experts, probs = self.route(tokens)
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        per_expert = expert_counts(flat, self.num_experts)
        # a permutation of the (token, slot) rows both ways: no index collides, so forward and
        # backward are deterministic on GPU too (no atomics), and each token's k expert outputs
        # are summed in slot order
        t, h = tokens.shape
        grouped = tokens.unsqueeze(1).expand(t, self.topk, h).reshape(-1, h).index_select(0, order)
        if self.ep_group is None:
            y = self._run_local_experts(grouped, per_expert)
        else:
            y = run_experts_parallel(grouped, per_expert, self.ep_group, self._run_local_experts)
        y = y * weights.reshape(-1)[order].unsqueeze(-1)
        slots = torch.empty_like(y)
        slots[order] = y
        out = slots.view(t, self.topk, h).sum(dim=1).reshape(x.shape)
        if self.shared_experts is not None:  # this rank's ffn slice: a partial sum over tp, as the experts'
            shared = gated_mlp(x, self.shared_experts.linear_fc1.weight, self.shared_experts.linear_fc2.weight,
                               self.cfg)
            gate = getattr(self.shared_experts, "gate_weight", None)
            if gate is not None:  # the same per-token scale on every rank: it scales the partial sums
                shared = shared * torch.sigmoid(F.linear(x, gate))
            out = out + shared
        if self.count_tokens and self.training and torch._C._current_graph_task_id() == -1:
            weight = None if token_mask is None else token_mask.transpose(0, 1).reshape(-1, 1).expand(
                -1, self.topk).to(torch.float32)
            counts = expert_counts(experts, self.num_experts, weight).float()
            self.tokens_per_expert = counts if self.tokens_per_expert is None else self.tokens_per_expert + counts
        if self.aux_loss_coeff > 0 and self.training and torch.is_grad_enabled():
            aux = self._routing_aux_loss(probs, experts, token_mask)
            # not a recompute inside backward, nor an empty microbatch (only expert parallelism
            # pads with those: the check's host sync is paid only there)
            if torch._C._current_graph_task_id() == -1 and (
                    self.ep_group is None or token_mask is None or bool(token_mask.any())):
                self.aux_losses.append(aux.detach())
            out = _AttachAuxLoss.apply(out, aux * (self.aux_loss_coeff * self.aux_loss_scale / self.tp))
        if self.sp:
            return reduce_scatter_to_sequence_parallel_region(out, self.tp_group)
        if self.tp > 1:
            return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
        return out


class TransformerLayer(torch.nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)); with
    ``norm_placement == "post"`` (OLMo 2/3) x + norm(attn(x)), then x + norm(mlp(x)), the norms
    named ``post_attention_layernorm`` / ``post_mlp_layernorm``; ``"sandwich"`` (Gemma 3) both,
    x + norm(attn(norm(x))), then x + norm(mlp(norm(x))). Modules are registered in the
    order they run (the parameters' order: gradient buckets, ``memory_plan.stage_parameters``)."""

    def __init__(self, cfg: GPTConfig, mp_config, tp_group, sequence_parallel: bool,
                 attention_fn: AttentionFn, cp_group=None, ep_group=None, layer_number: int = 0):
        super().__init__()
        dtype = mp_config.params_dtype

        def norm():
            return RMSNorm(cfg.hidden_size, cfg.norm_epsilon, sequence_parallel, dtype,
                           weight_in_fp32=cfg.norm_in_fp32, offset=cfg.norm_weight_offset)

        self.pre_norm = cfg.norm_placement in ("pre", "sandwich")  # norms on the sublayers' inputs
        self.post_norm = cfg.norm_placement in ("post", "sandwich")  # and / or on their outputs
        if self.pre_norm:
            self.input_layernorm = norm()
        attention = MultiLatentAttention if cfg.multi_latent_attention else SelfAttention
        self.self_attention = attention(cfg, mp_config, tp_group, sequence_parallel, attention_fn, layer_number)
        if self.post_norm:
            self.post_attention_layernorm = norm()
        if self.pre_norm:
            self.pre_mlp_layernorm = norm()
        if cfg.is_moe_layer(layer_number):
            self.mlp = MoEMLP(cfg, mp_config, tp_group, sequence_parallel, cp_group, ep_group)
        else:
            self.mlp = SwiGLUMLP(cfg, mp_config, tp_group, sequence_parallel)
        if self.post_norm:
            self.post_mlp_layernorm = norm()

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=None, recompute_attention=False,
                kv_cache=None, token_mask=None):
        """``token_mask`` (b, s), 0 on padding: only an MoE layer's load-balancing loss uses it.
        ``cos``/``sin`` are this layer's (a sliding layer may have its own RoPE)."""
        # each branch in its own function: its intermediates are freed when it returns, not
        # held through the other branch (the memory planner counts on that)
        x = x + self._attention_branch(x, cos, sin, cu_seqlens, max_seqlen, recompute_attention, kv_cache)
        return x + self._mlp_branch(x, token_mask)

    def _attention_branch(self, x, cos, sin, cu_seqlens, max_seqlen, recompute_attention, kv_cache):
        h = self.self_attention(self.input_layernorm(x) if self.pre_norm else x, cos, sin, cu_seqlens,
                                max_seqlen, recompute_attention, kv_cache)
        return self.post_attention_layernorm(h) if self.post_norm else h

    def _mlp_branch(self, x, token_mask):
        h = self.pre_mlp_layernorm(x) if self.pre_norm else x
        h = self.mlp(h, token_mask) if isinstance(self.mlp, MoEMLP) else self.mlp(h)
        return self.post_mlp_layernorm(h) if self.post_norm else h
