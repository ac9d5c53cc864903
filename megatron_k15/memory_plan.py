"""Bytes per GPU of a training step and of the rollout KV cache, for any tp x pp x cp x dp.

Everything is counted for one GPU of one pipeline stage and follows what *our* code allocates
(``models/layers.py``, ``parallel/data.py``, ``kernels/fused_logprobs.py``,
``generation/kv_cache.py``), checked against ``MemoryMeter`` measurements at tiny scale
(``tests/test_plan_memory.py``). Symbols:

    e    bytes of the parameter dtype (2 for bf16/fp16, 4 for fp32); activations use it too
    P    parameters of this stage on this tp rank (vocabulary padded to a multiple of 128*tp)
    D    ZeRO-1 shard group size = dp * cp (gradients are reduced over data x context ranks)
    N    tokens of one microbatch on this rank = b * s / cp;  Ns = N / tp under sequence
         parallelism (the residual stream), N otherwise
    h, q, k, f, a   hidden size, query projection (heads * head_dim), key/value projection
         (kv_heads * head_dim), ffn size, heads (whole model; "/ tp" marks the split ones)
    V    padded vocabulary / tp (this rank's rows of the output layer)

Static (held for the whole run):

    parameters      e * P + 2 * r    (and RoPE's fp32 inverse frequencies, r / 2 of them for the
                                      r rotated channels of a head)
    gradients       4 * P            (bucketed fp32 grad buffers, each padded to a multiple of D;
                                      e * P with --no-accumulate-allreduce-grads-in-fp32)
    optimizer       16 * P / D       (fp32 master shard, Adam m and v, reduced-grad shard, the
                                      last none for fp32 buckets of one rank's group: 12 * P;
                                      weight decay and norm counting go by parameter ranges)

Transient (in the peak where it is the largest phase): with 16-bit gradient buckets
(--no-accumulate-allreduce-grads-in-fp32, e < 4) and D > 1 each bucket is
copied to fp32 for its reduce-scatter (``bucket.staging``) when the last microbatch's backward
completes it; at most two copies are alive (``MAX_STAGED_BUCKETS``: launching a third waits
for the oldest reduction), so 4 * (the two largest recent buckets) next to the layers not yet
backpropagated, not 4 * P. With D = 1 the bucket is cast straight into its fp32 shard.

Activations saved per transformer layer and microbatch (Korthikanti et al.'s count, redone
for this model: no dropout, flash-style attention so no a * s^2 term):

    norm            (4 + e) * Ns * h + 4 * Ns   per RMSNorm (fp32 input copy -- the input
                                                itself in fp32 --, normalised e copy, 1/rms)
    none            2 * norm + 2 * e * Ns * h   (inputs of the QKV and FC1 GEMMs: under SP
                                                 the local shard; the all-gather is redone in
                                                 backward, as in Megatron)
                    + e * N * (3q + 3k) / tp    (qkv output, rotated q and k, attention output)
                    + 4 * N * a / tp            (attention log-sum-exp, fp32)
                    + 4 * e * N * f / tp        (fc1 output [gate; up], silu(gate), product)
                    + qk-norm                   (Qwen3 only, 16-bit: (4 + e) * N * (q + k) / tp
                                                 and 4 * N * (a + g) / tp; fp32 keeps fewer
                                                 copies, see qk_norm_saved_bytes)
    selective       none - 4 * N * a / tp       (flash attention already keeps no a * s^2 term:
                                                 recomputing the core only drops the lse)
    full            e * Ns * h                  (the layer input; the layer is rerun in backward)
    block (N)       full for the stage's first N layers, none for the others (no rerun on top
                    of the last layer's activations: it is not recomputed)

    MoE layers (``MoEMLP``; E experts, top-k, expert ffn fm; routing assumed balanced, so that
    each rank's experts process N k rows): the dense MLP's e * Ns * h + 4 * e * N * f / tp
    becomes e * N * h (the router input, gathered under SP) + 2 * e * N * k * h (the token
    copies grouped by expert and the experts' outputs) + 4 * e * N * k * fm / tp + 4 * N * E
    (fp32 router probabilities) + 16 * N * k (int64 top-k ids, sort order) + e * N * k
    (routing weights) [+ 4 * N * k + 4 * N renormalised top-k; + 16 * N * k under expert
    parallelism]; the backward working set's 2 * e * N * f / tp becomes 3 * e * N * k * h +
    e * N * k, and a layer recomputed (full) under expert parallelism holds e * N * k * h more
    (the token copies it sent). Experts: E / ep per rank, gradient buckets of their own sharded
    over D / ep.
    Unbalanced routing sends a rank more rows than N k: its MLP activations grow with them.
    A shared expert (DeepSeek) adds its SwiGLU 4 * e * N * fs / tp (2 * e * N * fs / tp to
    the backward working set), and a router run in fp32 (--moe-router-dtype fp32, DeepSeek's)
    keeps an fp32 copy of its input (4 * N * h when e < 4); dense layers among MoE ones (--moe-layer-freq) count as dense.

    Multi-latent attention (``MultiLatentAttention``, a = heads / tp, d the core's head size,
    dv v's, q/kv latents ql and kvl) replaces the attention's e * Ns * h + e * N * (3q + 3k)
    with e * N * h (the input, gathered under SP) + (4 + 2e) * N * r + 4 * N per latent r
    (norm and up-GEMM input; fp32 keeps 4 * N * dr of the kv down projection more) +
    e * N * (4 a d + a dv) (q, k, zero-padded v, output, and the output cut to dv).

Megatron-LM counts s*b*h*(34 + 5*a*s/h) bytes per layer (16-bit, with dropout, GeLU MLP of
4h, no flash); flash attention removes the 5*a*s/h term, SP divides the rest by tp, and full
recompute keeps 2*s*b*h (/ tp with SP). Ours is larger per token (qwen2.5-7b, bf16, tp=1:
about 65*s*b*h) mostly for the SwiGLU ffn (f = 5.3 h, 8 * f bytes) and the fp32 norm copies.

Per microbatch besides the layers: RoPE cos/sin 2 * e * N * r; on the last stage the
final norm, its output kept for the output layer (ce: the local e * Ns * h; fused: the
full-length e * N * h the kernel keeps), and the log-prob path:

    ce      saved softmax 4 * N * V; peak adds e * N * V (e < 4: the logits before the fp32
            cast) and 4 * N * V more when this rank holds vocabulary padding (masked copy);
            the output layer's weight gradient e * V * h and input gradient (under SP with
            the re-gathered input and the reduced shard: 2 * e * N * h + e * Ns * h) are
            temporaries in backward
    fused   never builds (N, V): backward holds d_hidden 4 * N * h (fp32), d_weight e * V * h,
            a fp32 chunk accumulator 4 * cV * h and about 16 * cN * cV bytes of chunk
            temporaries (cN = min(N, 2048) tokens x cV = min(V, 8192) vocabulary)

The peak of a stage is static + the largest of: (i) forward end / log-prob backward, (ii) the
backward of the last layer (for full recompute: every layer input + one recomputed layer)
plus its gradients e * Ns * h + 2 * e * N * f / tp, (iii) the optimizer step, 4 * P_bucket / D
of fp32 temporaries for the largest bucket (the clipped gradient; 12 with the unfused Adam),
(iv) with 16-bit gradient buckets (--no-accumulate-allreduce-grads-in-fp32) and D > 1, the
fp32 copies of the two buckets most recently launched for their reduce-scatter. With the 1F1B schedule, stage r keeps the saved
activations of min(pp - r, m) microbatches, so stage 0 holds pp of them; the schedule drops
its references to a microbatch's input, output and grads once they are sent.

Rollout (paged KV cache, ``PagedKVCache``): 2 * L_stage * (kv_heads / tp) * head_dim * e
bytes per token (MLA's latent cache: L_stage * (kv_lora_rank + qk_pos_emb_head_dim) * e on every
tp rank); the cache holds ``batch * ceil(tokens / block)`` blocks plus one scratch
block. The rollout peak is static + KV cache (the generator and trainer share the GPU).
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from megatron_k15.models.config import ConfigError, GPTConfig
from megatron_k15.models.sharding import pipeline_layer_ranges
from megatron_k15.parallel.data import MAX_STAGED_BUCKETS

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
RECOMPUTE_CHOICES = ("none", "selective", "full")
LOGPROB_CHOICES = ("fused", "ce")
GIB = 1024 ** 3

# kernels/fused_logprobs.py DEFAULT_CHUNK_TOKENS / DEFAULT_CHUNK_VOCAB (the model's call uses them)
FUSED_CHUNK_TOKENS = 2048
FUSED_CHUNK_VOCAB = 8192
# parallel/data.py DistributedOptimizer default (training.build_train_context passes it through)
GRAD_BUCKET_NUMEL = 40_000_000
STAGING_PHASE = "gradient fp32 copies (reduce-scatter)"


@dataclass(frozen=True)
class Layout:
    """A parallel layout: world size = tp * pp * cp * dp."""

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = True  # effective only when tp > 1 (DESIGN.md section 4)
    ep: int = 1  # expert parallel (MoE): experts split over ep of the dp x cp ranks

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def sp(self) -> bool:
        return self.sequence_parallel and self.tp > 1

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} cp={self.cp} dp={self.dp}" + (f" ep={self.ep}" if self.ep > 1 else "")


@dataclass(frozen=True)
class Workload:
    """What one optimizer step and one rollout look like on each GPU."""

    seq_length: int
    micro_batch_size: int = 1
    num_microbatches: Optional[int] = None  # per step and dp rank; None: pp (fills 1F1B)
    params_dtype: str = "bf16"
    recompute: str = "none"
    recompute_num_layers: Optional[int] = None  # full recompute of only N layers per stage (block)
    logprob_impl: str = "fused"
    adam_impl: str = "fused"  # parallel.adam: fused/apex keep only the clipped gradient
    rollout_max_tokens: Optional[int] = None  # cached tokens per sequence; None: seq_length
    rollout_batch: int = 1  # sequences in the KV cache at once
    kv_block_size: int = 16
    grad_bucket_numel: int = GRAD_BUCKET_NUMEL
    first_stage_layers: Optional[int] = None  # --decoder-first-pipeline-num-layers
    last_stage_layers: Optional[int] = None  # --decoder-last-pipeline-num-layers
    # RL --use-dynamic-batch-size: packed microbatches of this many tokens per GPU (one row, b=1,
    # in every layout) instead of micro_batch_size x seq_length / cp
    tokens_per_gpu: Optional[int] = None
    reference_model: bool = False  # RL GRPO --ref-load: a frozen copy of the weights next to the policy
    # --accumulate-allreduce-grads-in-fp32 (the default): fp32 gradient buckets for 16-bit
    # parameters; False: buckets in the parameter dtype, copied to fp32 for the reduction
    fp32_grads: bool = True

    @property
    def e(self) -> int:
        return DTYPE_BYTES[self.params_dtype]


# -- parameters ------------------------------------------------------------------------------
def stage_parameters(cfg: GPTConfig, tp: int, pp_rank: int, pp: int,
                     layers: Optional[range] = None, ep: int = 1) -> list[tuple[str, int]]:
    """(name, numel) of every parameter one (tp rank, pp stage, ep rank) holds, in the model's
    registration order (``GPTModel``: embedding, layers, final norm, output layer; an MoE
    layer's router, then its E / ep experts' stacked weights)."""
    if layers is None:
        layers = pipeline_layer_ranges(cfg.num_layers, pp)[pp_rank]
    h, V = cfg.hidden_size, cfg.padded_vocab_size(tp) // tp
    first, last, tied = pp_rank == 0, pp_rank == pp - 1, cfg.tie_word_embeddings
    out = []
    if first or (tied and last):
        out.append(("embedding.weight", V * h))
    pre = cfg.norm_placement in ("pre", "sandwich")  # norms on the sublayers' inputs
    post = cfg.norm_placement in ("post", "sandwich")  # on their outputs (OLMo; both: Gemma 3)
    for i in layers:
        p = f"layers.{i}."
        if pre:
            out.append((p + "input_layernorm.weight", h))
        if cfg.attention_sinks:  # the attention module's own parameter comes before its children's
            out.append((p + "self_attention.sinks", cfg.num_attention_heads // tp))
        attention = _mla_parameters if cfg.multi_latent_attention else _gqa_parameters
        out += attention(cfg, tp, p + "self_attention.")
        if post:
            out.append((p + "post_attention_layernorm.weight", h))
        if pre:
            out.append((p + "pre_mlp_layernorm.weight", h))
        if cfg.is_moe_layer(i):
            experts, f = cfg.num_moe_experts // ep, cfg.moe_ffn_hidden_size // tp
            out.append((p + "mlp.router.weight", cfg.num_moe_experts * h))
            if cfg.moe_router_bias:
                out.append((p + "mlp.router.bias", cfg.num_moe_experts))
            if cfg.moe_shared_expert_intermediate_size:
                fs = cfg.moe_shared_expert_intermediate_size // tp
                if cfg.moe_shared_expert_gate:  # (a parameter of the module itself: before its children's)
                    out.append((p + "mlp.shared_experts.gate_weight", h))
                out.append((p + "mlp.shared_experts.linear_fc1.weight", 2 * fs * h))
                out.append((p + "mlp.shared_experts.linear_fc2.weight", h * fs))
            out.append((p + "mlp.experts.linear_fc1.weight", experts * 2 * f * h))
            if cfg.moe_expert_bias:
                out.append((p + "mlp.experts.linear_fc1.bias", experts * 2 * f))
            out.append((p + "mlp.experts.linear_fc2.weight", experts * h * f))
            if cfg.moe_expert_bias:
                out.append((p + "mlp.experts.linear_fc2.bias", experts * h))
        else:
            out.append((p + "mlp.linear_fc1.weight", 2 * cfg.ffn_hidden_size // tp * h))
            out.append((p + "mlp.linear_fc2.weight", h * cfg.ffn_hidden_size // tp))
        if post:
            out.append((p + "post_mlp_layernorm.weight", h))
    if last:
        out.append(("final_layernorm.weight", h))
        if not tied:
            out.append(("output_layer.weight", V * h))
    return out


def _gqa_parameters(cfg: GPTConfig, tp: int, p: str) -> list[tuple[str, int]]:
    """``SelfAttention``'s parameters on one tp rank (the sinks aside), in registration order."""
    h = cfg.hidden_size
    qkv = (cfg.query_projection_size + 2 * cfg.kv_projection_size) // tp
    out = [(p + "linear_qkv.weight", qkv * h)]
    if cfg.add_qkv_bias:
        out.append((p + "linear_qkv.bias", qkv))
    out.append((p + "linear_proj.weight", h * cfg.query_projection_size // tp))
    if cfg.add_attention_output_bias:
        out.append((p + "linear_proj.bias", h))
    if cfg.qk_layernorm and cfg.qk_layernorm_scope == "all":
        out.append((p + "q_norm_all_heads.weight", cfg.query_projection_size // tp))
        out.append((p + "k_norm_all_heads.weight", cfg.kv_projection_size // tp))
    elif cfg.qk_layernorm:
        out.append((p + "q_layernorm.weight", cfg.head_dim))
        out.append((p + "k_layernorm.weight", cfg.head_dim))
    return out


def _mla_parameters(cfg: GPTConfig, tp: int, p: str) -> list[tuple[str, int]]:
    """``MultiLatentAttention``'s parameters on one tp rank, in registration order."""
    h, heads = cfg.hidden_size, cfg.num_attention_heads // tp
    dqk, ql, kvl = cfg.qk_head_dim + cfg.qk_pos_emb_head_dim, cfg.q_lora_rank, cfg.kv_lora_rank
    out = ([(p + "linear_q_down_proj.weight", ql * h), (p + "q_a_layernorm.weight", ql),
            (p + "linear_q_up_proj.weight", heads * dqk * ql)] if ql else [(p + "linear_q_proj.weight", heads * dqk * h)])
    return out + [(p + "linear_kv_down_proj.weight", (kvl + cfg.qk_pos_emb_head_dim) * h),
                  (p + "kv_a_layernorm.weight", kvl),
                  (p + "linear_kv_up_proj.weight", heads * (cfg.qk_head_dim + cfg.v_head_dim) * kvl),
                  (p + "linear_proj.weight", h * cfg.value_projection_size // tp)]


def is_expert_bucket(names: list[str], ep: int) -> bool:
    """Whether a bucket holds expert parameters, reduced and sharded over dp x cp / ep ranks."""
    return ep > 1 and any(".mlp.experts." in n for n in names)


def grad_buckets(params: list[tuple[str, int]], shard_group: int, sequence_parallel: bool,
                 tied_embedding: bool, bucket_numel: int = GRAD_BUCKET_NUMEL, tp_size: int = 1,
                 ep: int = 1) -> list[tuple[list[str], int, bool]]:
    """(parameter names, element count, late) of the DistributedOptimizer's gradient buckets
    (``parallel/data.py``) in launch order: parameters in reverse order, a bucket closes once
    it reaches ``bucket_numel``; the grads that are partial sums over tp (norms under SP,
    QK-norms and MoE routers when tp > 1) and a tied embedding shared over pp go to one late
    bucket (reduced in ``finish_grad_sync``); each is padded to a multiple of its shard group.
    Under expert parallelism (``ep`` > 1) the experts' buckets come after the others', padded
    to the expert-data-parallel group (``shard_group / ep``)."""
    def late(name):
        partial = name.endswith(("q_layernorm.weight", "k_layernorm.weight", "router.weight",
                                 "shared_experts.gate_weight"))
        return (sequence_parallel and name.endswith("layernorm.weight")) or (partial and tp_size > 1) or (
            tied_embedding and name == "embedding.weight")

    out = []
    for expert in (False, True):
        group = shard_group // ep if expert else shard_group
        names, size = [], 0
        for name, n in reversed(params):
            if late(name) or is_expert_bucket([name], ep) != expert:
                continue
            names.append(name)
            size += n
            if size >= bucket_numel:
                out.append((names, int(math.ceil(size / group) * group), False))
                names, size = [], 0
        if names:
            out.append((names, int(math.ceil(size / group) * group), False))
    late_params = [(name, n) for name, n in params if late(name)]
    if late_params:
        size = sum(n for _, n in late_params)
        out.append(([name for name, _ in late_params], int(math.ceil(size / shard_group) * shard_group), True))
    return out


def grad_bucket_sizes(params: list[tuple[str, int]], shard_group: int, sequence_parallel: bool,
                      tied_embedding: bool, bucket_numel: int = GRAD_BUCKET_NUMEL,
                      tp_size: int = 1, ep: int = 1) -> list[int]:
    """Padded element counts of the gradient buckets (see ``grad_buckets``)."""
    return [n for _, n, _ in grad_buckets(params, shard_group, sequence_parallel, tied_embedding,
                                          bucket_numel, tp_size, ep)]


# -- KV cache ------------------------------------------------------------------------------------
def kv_cache_bytes(num_layers: int, num_blocks: int, block_size: int, n_kv_heads: int,
                   head_dim: int, dtype_bytes: int, keys_only: bool = False) -> int:
    """``PagedKVCache`` memory: (layers, 2, num_blocks + 1, block, kv_heads, head_dim) elements
    (the extra block is its scratch target for padding rows; 1 for 2 with ``keys_only``);
    ``n_kv_heads`` is per tp rank."""
    kv = 1 if keys_only else 2
    return num_layers * kv * (num_blocks + 1) * block_size * n_kv_heads * head_dim * dtype_bytes


def kv_bytes_per_token(cfg: GPTConfig, num_layers: int, tp: int, dtype_bytes: int) -> int:
    """2 * layers * (kv_heads / tp) * head_dim * dtype bytes (MLA: layers * (kv_lora_rank +
    qk_pos_emb_head_dim) * dtype bytes, on every tp rank)."""
    heads, dim, keys_only = cfg.kv_cache_row(tp)
    return (1 if keys_only else 2) * num_layers * heads * dim * dtype_bytes


def rollout_kv_cache_bytes(cfg: GPTConfig, num_layers: int, tp: int, w: Workload,
                           layers: Optional[list] = None) -> int:
    """The cache for ``rollout_batch`` sequences of ``rollout_max_tokens``. With sliding-window
    layers among ``layers`` (the stage's global layer numbers; None: the engine keeps every
    token, ``rollout_windows_kept``), blocks hold one group of ``page_layout``'s:
    full-attention groups keep every token, sliding ones at most the blocks their window spans,
    ceil((left + 1) / block) + 1 per sequence. Not counted: a prompt longer than the engine's
    ``max_prefill_tokens`` holds (chunk + left) / block + 2 blocks per sliding group while it is
    prefilled chunk by chunk."""
    if w.rollout_batch == 0:
        return 0
    tokens = w.rollout_max_tokens or w.seq_length
    per_seq = -(-tokens // w.kv_block_size)
    windows = [] if layers is None else [cfg.window_left(i) for i in layers]
    if max(windows, default=-1) < 0:
        per_block, held = num_layers, per_seq
    else:
        from megatron_k15.generation.kv_cache import page_layout

        per_block, groups, _ = page_layout(windows)
        held = sum(per_seq if left < 0 else min(per_seq, -(-(left + 1) // w.kv_block_size) + 1)
                   for left in groups)
    heads, dim, keys_only = cfg.kv_cache_row(tp)
    return kv_cache_bytes(per_block, w.rollout_batch * held, w.kv_block_size, heads, dim, w.e, keys_only)


def rollout_windows_kept(cfg: GPTConfig, layout: Layout, w: Workload) -> bool:
    """Whether the engine keeps only a window's blocks of the sliding layers: only when every
    pipeline stage lays its cache groups out alike (``GenerationEngine._agree_layout``)."""
    from megatron_k15.generation.kv_cache import page_layout

    ranges = pipeline_layer_ranges(cfg.num_layers, layout.pp, w.first_stage_layers, w.last_stage_layers)
    layouts = set()
    for r in ranges:
        windows = [cfg.window_left(i) for i in r]
        if max(windows, default=-1) < 0:
            layouts.add(None)
        else:
            per_block, group_windows, _ = page_layout(windows)
            layouts.add((per_block, tuple(group_windows)))
    return len(layouts) == 1 and None not in layouts


# -- activations ---------------------------------------------------------------------------------
@dataclass
class _Shapes:
    """Per-rank sizes of one microbatch (see the module docstring for the symbols)."""

    e: int
    N: int
    Ns: int
    h: int
    q: int
    k: int
    f: int
    a: int
    d: int
    V: int
    V_fused: int
    vocab_padding: bool
    qk_norm: bool = False
    logit_softcap: bool = False  # Gemma 2's final cap: the ce path also keeps tanh's fp32 output
    # mixture of experts (0 experts: dense): experts E, top-k, expert ffn / tp, renormalised top-k
    E: int = 0
    topk: int = 0
    fm: int = 0
    norm_topk: bool = False
    ep: int = 1
    fs: int = 0  # the shared expert's ffn / tp (DeepSeek)
    shared_gate: bool = False  # Qwen2-MoE's sigmoid gate on the shared expert
    # multi-latent attention (kvl = 0: none): q and kv latents, a head's v channels
    ql: int = 0
    kvl: int = 0
    dv: int = 0
    dr: int = 0
    r: int = 0  # channels RoPE rotates (cos / sin tables)
    fp32_router: bool = False  # --moe-router-dtype fp32 (DeepSeek's): an fp32 copy of its input

    @classmethod
    def of(cls, cfg: GPTConfig, layout: Layout, w: Workload, layer: Optional[int] = None) -> "_Shapes":
        """The sizes of layer ``layer`` (dense or MoE); None: an MoE layer when the model has any."""
        tp = layout.tp
        N = w.tokens_per_gpu or w.micro_batch_size * w.seq_length // layout.cp
        padded = cfg.padded_vocab_size(tp)
        V = padded // tp
        moe = cfg.is_moe if layer is None else cfg.is_moe_layer(layer)
        mla = cfg.multi_latent_attention
        return cls(e=w.e, N=N, Ns=N // tp if layout.sp else N, h=cfg.hidden_size,
                   q=cfg.query_projection_size // tp, k=cfg.kv_projection_size // tp,
                   f=cfg.ffn_hidden_size // tp, a=cfg.num_attention_heads // tp, d=cfg.head_dim,
                   V=V, V_fused=min(V, cfg.vocab_size), vocab_padding=padded > cfg.vocab_size,
                   logit_softcap=bool(cfg.final_logit_softcapping),
                   qk_norm=cfg.qk_layernorm, E=cfg.num_moe_experts if moe else 0,
                   topk=cfg.moe_router_topk if moe else 0,
                   fm=cfg.moe_ffn_hidden_size // tp if moe else 0,
                   norm_topk=bool(moe and cfg.moe_norm_topk_prob), ep=layout.ep,
                   fs=(cfg.moe_shared_expert_intermediate_size or 0) // tp if moe else 0,
                   shared_gate=bool(moe and cfg.moe_shared_expert_gate),
                   ql=(cfg.q_lora_rank or 0) if mla else 0, kvl=cfg.kv_lora_rank if mla else 0,
                   dv=cfg.v_head_dim if mla else 0, dr=cfg.qk_pos_emb_head_dim if mla else 0, r=cfg.rotary_dim,
                   fp32_router=moe and cfg.moe_router_dtype == "fp32")


def norm_saved_bytes(x: _Shapes) -> int:
    """One RMSNorm: fp32 input (copy), normalised e copy, fp32 1/rms."""
    return (4 + x.e) * x.Ns * x.h + 4 * x.Ns


def qk_norm_saved_bytes(x: _Shapes) -> int:
    """Qwen3's per-head q and k RMSNorms: fp32 inputs, normalised copies, fp32 1/rms per head.
    16-bit: fp32 copies of q and k plus e copies of the normalised ones. fp32: the normalised
    q and k, and q's input itself, which is a gathered copy (not a view of the qkv output)
    when a rank holds more than one KV group."""
    if not x.qk_norm:
        return 0
    qk, per_head = x.N * (x.q + x.k), 4 * x.N * (x.q + x.k) // x.d
    if x.e < 4:
        return (4 + x.e) * qk + per_head
    return 4 * qk + per_head + (4 * x.N * x.q if x.k > x.d else 0)


def mlp_saved_bytes(x: _Shapes) -> int:
    """The MLP's saved activations, its input included. Dense SwiGLU: the FC1 input (the
    local shard under SP) and 4 e N f / tp (fc1 output [gate; up], silu(gate), product).
    MoE (``MoEMLP``, routing balanced over the experts so that each rank's experts get N k
    rows): the router's input (gathered to all N tokens under SP), the N k token copies grouped
    by expert and the experts' N k outputs (2 e N k h), the experts' SwiGLU 4 e N k fm / tp,
    fp32 router probabilities 4 N E, int64 top-k ids and sort order 16 N k, the routing
    weights in that order e N k, and with renormalised top-k its fp32 weights and sums
    4 N k + 4 N; a shared expert 4 e N fs / tp, and with Qwen2-MoE's gate its output and the
    sigmoid e N h + e N; under expert parallelism the received rows' regrouping order and its inverse,
    int64, 16 N k more."""
    if not x.E:
        return x.e * x.Ns * x.h + 4 * x.e * x.N * x.f
    return (x.e * x.N * x.h + 2 * x.e * x.N * x.topk * x.h + 4 * x.e * x.N * x.topk * x.fm
            + 4 * x.N * x.E + 16 * x.N * x.topk + x.e * x.N * x.topk
            + ((4 * x.N * x.topk + 4 * x.N) if x.norm_topk else 0) + (16 * x.N * x.topk if x.ep > 1 else 0)
            + 4 * x.e * x.N * x.fs  # the shared expert's SwiGLU, on the routed tokens' input
            + ((x.e * x.N * x.h + x.e * x.N) if x.shared_gate else 0)  # its output and the gate's sigmoid
            + (4 * x.N * x.h if x.fp32_router and x.e < 4 else 0))  # the fp32 router's input copy


def attention_saved_bytes(x: _Shapes) -> int:
    """The attention's saved activations, its input included, without the core's fp32 LSE.
    GQA: the QKV GEMM's input (the local shard under SP), then e N (3q + 3k) / tp (qkv output,
    rotated q and k, attention output) and the q/k norms. MLA (``MultiLatentAttention``): the
    input gathered to all N tokens (every projection reads it), the latent norms, the core's
    q, k and zero-padded v and its output (e N a d each), and the output cut to v's channels
    (e N a dv) that the output projection keeps. A latent costs its norm and the up GEMM's
    input (the norm's output), (4 + 2e) N r + 4 N; in fp32 the kv latent's norm keeps the down
    projection's whole output alive (its input is a view of it): 4 N dr more."""
    if not x.kvl:
        return x.e * x.Ns * x.h + x.e * x.N * (3 * x.q + 3 * x.k) + qk_norm_saved_bytes(x)
    latents = sum((4 + 2 * x.e) * x.N * r + 4 * x.N for r in (x.ql, x.kvl) if r)
    if x.e == 4:
        latents += 4 * x.N * x.dr
    return x.e * x.N * x.h + latents + x.e * x.N * (4 * x.a * x.d + x.a * x.dv)


def layer_saved_bytes(x: _Shapes, recompute: str) -> int:
    """Activations one transformer layer keeps for backward, per microbatch."""
    if recompute == "full":
        return x.e * x.Ns * x.h
    saved = 2 * norm_saved_bytes(x) + attention_saved_bytes(x) + mlp_saved_bytes(x)
    if recompute == "none":
        saved += 4 * x.N * x.a
    return saved


def mlp_backward_bytes(x: _Shapes) -> int:
    """Gradients alive at the busiest point of a layer's backward: the incoming grad e Ns h
    and, dense, net two ffn-sized grads (the SwiGLU product); MoE, three grads of the N k
    token copies (e N k h each: the combined output's, the experts' outputs', the grouped
    inputs') and the routing weights' e N k."""
    if x.E:
        return x.e * x.Ns * x.h + 3 * x.e * x.N * x.topk * x.h + x.e * x.N * x.topk + 2 * x.e * x.N * x.fs
    return x.e * x.Ns * x.h + 2 * x.e * x.N * x.f


def attention_backward_bytes(x: _Shapes, cp: int) -> int:
    """Extra at the attention backward: d_out, dq, dk, dv and the fp32 row term delta
    (``flash_attention._backward``); ring attention (cp > 1) adds fp32 dq/dk/dv accumulators,
    received dk/dv and the K/V in flight (``ring_attention``)."""
    extra = x.e * x.N * (2 * x.q + 2 * x.k) + 4 * x.N * x.a
    if cp > 1:
        extra += 4 * x.N * (x.q + 4 * x.k) + 2 * x.e * x.N * x.k
    return extra


def column_backward_bytes(x: _Shapes) -> int:
    """Transient of a column-parallel layer's backward besides its weight gradient: under SP
    the re-gathered input, the full-length input gradient and its reduce-scattered shard
    (``parallel.tensor.linear_with_sequence_parallel_gather``); without SP the input
    gradient."""
    if x.Ns == x.N:
        return x.e * x.N * x.h
    return 2 * x.e * x.N * x.h + x.e * x.Ns * x.h


def final_saved_bytes(x: _Shapes, impl: str) -> int:
    """Last stage: final norm and its output kept for the output projection: the local shard
    for the ce path's column layer, the full-length copy (gathered under SP) for the fused
    kernel."""
    return norm_saved_bytes(x) + x.e * (x.Ns if impl == "ce" else x.N) * x.h


def logprob_saved_bytes(x: _Shapes, impl: str) -> int:
    """Kept from forward to backward by the log-prob path (ce: fp32 softmax and int64 targets;
    fused: fp32 lse)."""
    if impl == "ce":
        return 4 * x.N * x.V + 9 * x.N + (4 * x.N * x.V if x.logit_softcap else 0)
    return 4 * x.N


def logprob_forward_extra_bytes(x: _Shapes, impl: str) -> int:
    """Transient on top of everything saved, at the log-prob forward (with Gemma 2's final cap
    in fp32 the uncapped logits are still held when the capped ones are made; in 16-bit
    precision the cap adds only tanh's saved output: measured, tests/test_plan_memory.py)."""
    if impl == "ce":
        return ((x.e * x.N * x.V if x.e < 4 else 0) + (4 * x.N * x.V if x.vocab_padding else 0)
                + (4 * x.N * x.V if x.logit_softcap and x.e == 4 else 0))
    cN, cV = min(x.N, FUSED_CHUNK_TOKENS), min(x.V_fused, FUSED_CHUNK_VOCAB)
    return 12 * cN * cV + 20 * x.N


def logprob_peak_extra_bytes(x: _Shapes, impl: str) -> int:
    """Transient on top of everything saved, at the log-prob forward or backward."""
    if impl == "ce":
        low_precision = x.e < 4
        pad = 4 * x.N * x.V if x.vocab_padding else 0
        forward = logprob_forward_extra_bytes(x, impl)
        backward = max(pad, x.e * x.N * x.V if low_precision else 0,
                       (x.e * x.N * x.V - 4 * x.N * x.V if low_precision else 0)
                       + x.e * x.V * x.h + column_backward_bytes(x))
        return max(forward, backward)
    cN, cV = min(x.N, FUSED_CHUNK_TOKENS), min(x.V_fused, FUSED_CHUNK_VOCAB)
    return (4 * x.N * x.h + x.e * x.V_fused * x.h + 4 * cV * x.h
            + max(16 * cN * cV, x.e * x.N * x.h) + 12 * x.N)


# -- the plan --------------------------------------------------------------------------------
@dataclass
class Component:
    """One row of the plan. ``kind``: static (held all run), activations (at the training
    peak), other (transients of other phases, not added), rollout."""

    name: str
    formula: str
    bytes: int
    kind: str = "static"

    @property
    def gib(self) -> float:
        return self.bytes / GIB


@dataclass
class StagePlan:
    """One pipeline stage on one GPU: static memory, activations, and the two peaks."""

    pp_rank: int
    layers: list[int]
    in_flight: int
    parameters: int  # element count P
    components: list[Component] = field(default_factory=list)
    activations_by_recompute: dict = field(default_factory=dict)
    train_peak_bytes: int = 0
    train_peak_phase: str = ""
    rollout_peak_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return max(self.train_peak_bytes, self.rollout_peak_bytes)

    def component(self, name: str) -> Component:
        return next(c for c in self.components if c.name == name)


@dataclass
class MemoryPlan:
    cfg: GPTConfig
    layout: Layout
    workload: Workload
    stages: list[StagePlan]

    @property
    def most_loaded(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.peak_bytes)

    @property
    def peak_bytes(self) -> int:
        return self.most_loaded.peak_bytes

    @property
    def train_peak_bytes(self) -> int:
        return max(s.train_peak_bytes for s in self.stages)

    @property
    def rollout_peak_bytes(self) -> int:
        return max(s.rollout_peak_bytes for s in self.stages)

    def to_dict(self, gpu_memory_bytes: Optional[int] = None, reserved_bytes: int = 0) -> dict:
        worst = self.most_loaded
        out = {
            "layout": asdict(self.layout), "world_size": self.layout.world_size,
            "workload": asdict(self.workload),
            "model": {k: v for k, v in self.cfg.to_dict().items() if k != "extra"},
            "most_loaded_stage": worst.pp_rank,
            "stages": [{
                "pp_rank": s.pp_rank, "layers": [s.layers[0], s.layers[-1]] if s.layers else [],
                "in_flight_microbatches": s.in_flight, "parameters": s.parameters,
                "components": [{"name": c.name, "kind": c.kind, "formula": c.formula,
                                "bytes": c.bytes, "gib": round(c.gib, 4)} for c in s.components],
                "activations_by_recompute_bytes": s.activations_by_recompute,
                "train_peak_bytes": s.train_peak_bytes, "train_peak_phase": s.train_peak_phase,
                "rollout_peak_bytes": s.rollout_peak_bytes, "peak_bytes": s.peak_bytes,
            } for s in self.stages],
            "train_peak_bytes": self.train_peak_bytes, "rollout_peak_bytes": self.rollout_peak_bytes,
            "peak_bytes": self.peak_bytes, "peak_gib": round(self.peak_bytes / GIB, 4),
        }
        if gpu_memory_bytes is not None:
            need = self.peak_bytes + reserved_bytes
            out.update(gpu_memory_bytes=gpu_memory_bytes, reserved_bytes=reserved_bytes,
                       fits=need <= gpu_memory_bytes,
                       headroom_gib=round((gpu_memory_bytes - need) / GIB, 4))
        return out


def _layer_of(name: str) -> Optional[int]:
    return int(name.split(".")[1]) if name.startswith("layers.") else None


# the order in which a layer's backward finishes its weight grads (the reverse of the forward
# order: Qwen3's k and q norms run between the output projection and the QKV projection)
_BACKWARD_ORDER = ("post_mlp_layernorm.weight", "linear_fc2.bias", "linear_fc2.weight", "linear_fc1.bias",
                   "linear_fc1.weight", "router.bias", "router.weight", "pre_mlp_layernorm.weight",
                   "post_attention_layernorm.weight", "linear_proj.bias", "linear_proj.weight", "sinks",
                   "k_layernorm.weight", "q_layernorm.weight", "k_norm_all_heads.weight", "q_norm_all_heads.weight",
                   "linear_qkv.bias", "linear_qkv.weight", "input_layernorm.weight")


def _backward_position(name: str) -> int:
    return next(i for i, suffix in enumerate(_BACKWARD_ORDER) if name.endswith(suffix))


def _stage_activation_peak(cfg: GPTConfig, layout: Layout, w: Workload, recompute: str,
                           layer_ids: list[int], first: bool, last: bool, in_flight: int,
                           tied_output_grad: int, buckets: list[tuple[list[str], int, bool]]
                           ) -> tuple[int, int, str, int]:
    """(bytes saved per microbatch, activation peak of the stage, phase of the peak, fp32
    gradient copies in that peak): the largest of the phases of the microbatch being run,
    plus what the other in-flight microbatches keep; with the fp32 copies of the gradient
    buckets (16-bit, D > 1) during and after the last microbatch's backward."""
    shapes = [_Shapes.of(cfg, layout, w, i) for i in layer_ids]  # dense and MoE layers differ
    x = shapes[-1]  # the stage's last layer: its backward runs first
    n_layers = len(layer_ids)
    rope = 2 * x.e * x.N * x.r
    # block recompute: the first n_rec layers keep only their input, the others everything;
    # the last layer is then not recomputed, so no rerun sits on top of the saved activations
    n_rec = n_layers if recompute != "full" or w.recompute_num_layers is None else min(
        n_layers, w.recompute_num_layers)
    sizes = [layer_saved_bytes(shapes[j], recompute if j < n_rec else "none") for j in range(n_layers)]
    saved = sum(sizes) + rope
    # 1F1B keeps each in-flight microbatch's received input and sent output referenced
    input_aliased = (recompute == "full" and n_rec > 0) or x.e == 4  # kept anyway by the checkpoint / norm
    if not first and not input_aliased:
        saved += x.e * x.Ns * x.h
    if not last:
        saved += x.e * x.Ns * x.h
    if first and layout.tp > 1:
        saved += 9 * x.N  # vocab-parallel embedding: shifted int64 ids and their mask
    head = final_saved_bytes(x, w.logprob_impl) + logprob_saved_bytes(x, w.logprob_impl) if last else 0
    saved += head
    others = (in_flight - 1) * saved

    phases = {}
    if last:
        # the final norm's output stays referenced during the log-prob forward; the ce path's
        # column layer keeps that very tensor, the fused kernel a full-length copy of it
        # (gathered under SP, reshaped for b > 1)
        separate = w.logprob_impl == "fused" and (layout.sp or (w.micro_batch_size > 1 and not w.tokens_per_gpu))
        extra = logprob_peak_extra_bytes(x, w.logprob_impl)
        if separate:
            extra = max(extra, logprob_forward_extra_bytes(x, w.logprob_impl) + x.e * x.Ns * x.h)
        phases["log-prob forward/backward"] = saved + extra
    grads = mlp_backward_bytes(x) + tied_output_grad
    # every layer input, plus one layer rerun with all it saves (its input is already held
    # in fp32, where the norm keeps the input itself)
    rerun_one = (layer_saved_bytes(x, "none") - (x.e * x.Ns * x.h if x.e == 4 else 0)
                 if recompute == "full" else 0)
    if rerun_one and x.E and x.ep > 1:
        # recomputed under expert parallelism, the layer also holds the N k token copies it
        # sent by all-to-all until its backward (measured: e N k h more than saved + working set)
        rerun_one += x.e * x.N * x.topk * x.h
    rerun = rerun_one if n_rec == n_layers else 0  # is the last layer recomputed?
    layers_live = saved - head + rerun
    phases["last layer backward"] = layers_live + grads
    mlp_part = norm_saved_bytes(x) + mlp_saved_bytes(x)
    phases["attention backward"] = (layers_live - mlp_part + x.e * x.Ns * x.h
                                    + attention_backward_bytes(x, layout.cp) + tied_output_grad)
    if first:
        # the embedding's dense grad (plus the output layer's when tied on this stage, summed)
        emb = x.e * x.V * cfg.hidden_size
        phases["embedding backward"] = rope + emb * (3 if tied_output_grad else 1)
    # (bytes, of which fp32 gradient copies) of every phase
    totals = {name: (others + v, 0) for name, v in phases.items()}

    if x.e < 4 and not w.fp32_grads and layout.dp * layout.cp > 1:
        # A 16-bit bucket is copied to fp32 when its reduce-scatter is launched: during the last
        # microbatch's backward as soon as its grads are final, the late one in
        # finish_grad_sync; every copy lives until finish_grad_sync's wait. The other
        # microbatches are done by then. Backward runs the layers from the last down, and in
        # a layer accumulates the weight grads in the order of _BACKWARD_POSITION; a bucket
        # is complete at its lowest layer's last member (output layer / final norm: before
        # any layer; the embedding: at the very end).
        n = n_layers
        keys = []  # (layer index in the stage, position in its backward, fp32 copy bytes)
        before_embedding = 0
        for names, numel, late in buckets:
            if late:
                continue
            if is_expert_bucket(names, layout.ep) and layout.dp * layout.cp == layout.ep:
                continue  # one rank per expert shard: cast straight into the fp32 shard, no copy
            if "embedding.weight" in names:
                keys.append((-1, 0, 4 * numel))
                continue
            members = [(_layer_of(name), name) for name in names if _layer_of(name) is not None]
            if not members:
                keys.append((n, 0, 4 * numel))
                continue
            lowest = min(i for i, _ in members)
            pos = max(_backward_position(name) for i, name in members if i == lowest)
            keys.append((layer_ids.index(lowest), pos, 4 * numel))

        # launch order: the output layer's bucket, then the layers from the last down, the
        # embedding last; only the MAX_STAGED_BUCKETS most recently launched copies are alive
        launch = sorted(keys, key=lambda k: (-k[0], k[1]))

        def staged_at(j, p):
            launched = [b for kj, kp, b in launch if kj > j or (kj == j and kp <= p)]
            return sum(launched[-MAX_STAGED_BUCKETS:])

        late_copies = [4 * numel for _, numel, late in buckets if late]
        total_copies = sum(([b for _, _, b in launch] + late_copies)[-MAX_STAGED_BUCKETS:])
        points = [(total_copies, total_copies)]  # finish_grad_sync, before the last waits
        for j in range(n):
            # layer j's MLP backward (after fc2's grad) and attention core (after proj's), the
            # layers above it already backpropagated
            drop = sum(sizes[j + 1:])
            proj, fc2 = _backward_position("linear_proj.weight"), _backward_position("linear_fc2.weight")
            mlp = (phases["last layer backward"] - drop + staged_at(j, fc2), staged_at(j, fc2))
            att = (phases["attention backward"] - drop + staged_at(j, proj), staged_at(j, proj))
            if j == n - 1:
                totals["last layer backward"] = max(totals["last layer backward"], mlp)
                totals["attention backward"] = max(totals["attention backward"], att)
            else:
                points += [mlp, att]
        base = saved - head - sum(sizes)  # RoPE, the stage's input/output, ids
        for kj, kp, _ in keys:
            if 0 <= kj < n:
                # at a bucket's completion: the layers below, the one in progress counted whole
                # (and rerun under full recompute) unless done, the residual-stream grad and a
                # tied output layer's weight grad (held until the embedding's is added to it)
                done = kp >= _backward_position("linear_qkv.weight")
                points.append((staged_at(kj, kp) + base + sum(sizes[:kj if done else kj + 1])
                               + (0 if done or kj >= n_rec else rerun_one) + x.e * x.Ns * x.h
                               + tied_output_grad,
                               staged_at(kj, kp)))
            elif kj == -1:
                before_embedding = staged_at(0, len(_BACKWARD_ORDER))
        if first:
            totals["embedding backward"] = max(
                totals["embedding backward"],
                (phases["embedding backward"] + before_embedding, before_embedding))
        totals[STAGING_PHASE] = max(points)
    phase = max(totals, key=lambda k: totals[k][0])
    return saved, totals[phase][0], phase, totals[phase][1]


def plan_stage(cfg: GPTConfig, layout: Layout, w: Workload, pp_rank: int,
               layers: range) -> StagePlan:
    tp, pp = layout.tp, layout.pp
    shard_group = layout.dp * layout.cp
    first, last = pp_rank == 0, pp_rank == pp - 1
    m = w.num_microbatches or pp
    in_flight = max(1, min(pp - pp_rank, m))
    params = stage_parameters(cfg, tp, pp_rank, pp, layers, layout.ep)
    P = sum(n for _, n in params)
    bucket_list = grad_buckets(params, shard_group, layout.sp, cfg.tie_word_embeddings and pp > 1,
                               w.grad_bucket_numel, tp, layout.ep)
    buckets = [n for _, n, _ in bucket_list]
    # each bucket's ZeRO-1 shard group: dp x cp, or dp x cp / ep for the experts' buckets
    groups = [shard_group // layout.ep if is_expert_bucket(names, layout.ep) else shard_group
              for names, _, _ in bucket_list]
    G = sum(buckets)
    e = w.e
    fp32_buckets = w.fp32_grads or e == 4
    # a bucket of one rank's group in fp32 is its own reduced-grad shard (no copy): 12 bytes
    optimizer_bytes = sum((12 if g == 1 and fp32_buckets else 16) * (n // g) for n, g in zip(buckets, groups))
    x = _Shapes.of(cfg, layout, w)

    comps = [
        Component("parameters", f"e*P + 2*r (RoPE inverse frequencies, fp32) = {e}*{P:,} + 2*{x.r}",
                  e * P + 2 * x.r),
        Component("gradients", (f"4*P (fp32 grad buckets) = 4*{G:,}" if fp32_buckets
                                else f"e*P (grad buckets) = {e}*{G:,}"), (4 if w.fp32_grads else e) * G),
        Component("optimizer (ZeRO-1)",
                  f"16*P/D (4 fp32 shards: master, m, v, reduced grad), D=dp*cp={shard_group}"
                  + (f" (experts: D/ep={shard_group // layout.ep})" if layout.ep > 1 else "")
                  + ("; 12*P/D where D = 1 (the fp32 bucket is the reduced grad)" if fp32_buckets
                     and 1 in groups else ""),
                  optimizer_bytes),
    ]
    if w.reference_model:
        comps.append(Component("reference model (--ref-load)", f"e*P + 2*r = {e}*{P:,} + 2*{x.r} (frozen weights)",
                               e * P + 2 * x.r))
    static = sum(c.bytes for c in comps)

    tied_output_grad = e * x.V * x.h if (cfg.tie_word_embeddings and first and last) else 0
    by_recompute = {}
    for r in RECOMPUTE_CHOICES:
        saved_r, peak_r, phase_r, copies_r = _stage_activation_peak(
            cfg, layout, w, r, list(layers), first, last, in_flight, tied_output_grad, bucket_list)
        by_recompute[r] = {"saved_per_microbatch": saved_r, "peak": peak_r, "phase": phase_r,
                           "copies": copies_r}
    chosen = by_recompute[w.recompute]
    layer_bytes = sum(layer_saved_bytes(_Shapes.of(cfg, layout, w, i), w.recompute) for i in layers)
    mlp = ("eNh + 2eNkh + 4eNk*fm/tp + 4NE + 16Nk + eNk" + (" + 4eNfs/tp (shared expert)"
           if cfg.moe_shared_expert_intermediate_size else "") + " (MoE, balanced routing)" if cfg.is_moe
           else "eNs*h + 4eNf/tp")
    if cfg.is_moe and cfg.num_moe_layers < cfg.num_layers:
        mlp += "; dense layers eNs*h + 4eNf/tp"
    attn = ("eNh + latent norms + eN(4ad + a*dv)/tp (MLA)" if cfg.multi_latent_attention
            else "eNs*h + eN(3q+3k)/tp")
    layer_formula = {
        "none": f"2*norm + {attn} + 4Na/tp + {mlp}",
        "selective": f"2*norm + {attn} + {mlp}",
        "full": "e*Ns*h",
    }[w.recompute]
    saved_all = in_flight * chosen["saved_per_microbatch"]
    copies = chosen["copies"]
    # the saved activations are listed as part of the peak when all of them are alive there;
    # at a later point of the backward only what is left is ("activations at that point")
    staging_peak = (chosen["phase"] in (STAGING_PHASE, "embedding backward")
                    or chosen["peak"] - copies < saved_all)
    comps.append(Component(
        "activations (saved)",
        f"{in_flight} microbatch(es) x ({len(layers)} layers x {layer_formula} = "
        f"{layer_bytes / 2**20:.1f} MiB, + RoPE, final norm, log-prob state), "
        f"N={x.N:,}" + (f" Ns={x.Ns:,}" if layout.sp else ""), saved_all,
        "other" if staging_peak else "activations"))
    work_formula = {
        "log-prob forward/backward": (
            "logits: eNV + 4NV if padded" if w.logprob_impl == "ce"
            else "fused backward: 4Nh + eVh + 4*cV*h + 16*cN*cV"),
        "last layer backward": ("grads e*Ns*h + 3eNkh + eNk (MoE)" if cfg.is_moe else "grads e*Ns*h + 2eNf/tp") + (
            " + one recomputed layer (none's count)" if w.recompute == "full" else ""),
        "attention backward": "d_out, dq, dk, dv, fp32 delta" + (" + ring buffers" if layout.cp > 1 else ""),
        "embedding backward": "embedding grad e*V*h",
        STAGING_PHASE: ("the layers not yet backpropagated, one layer's backward working set"
                        + (" and its recomputation" if w.recompute == "full" else "")),
    }[chosen["phase"]]
    if chosen["phase"] == "embedding backward":
        work_formula = "RoPE tables + " + work_formula
    copies_formula = (f"4 x the last {MAX_STAGED_BUCKETS} buckets launched by then: fp32 copies for "
                      f"the reduce-scatter (not all of 4*P = {4 * G / GIB:.2f} GiB)")
    if staging_peak:
        comps.append(Component("activations at that point", work_formula, chosen["peak"] - copies,
                               "activations"))
    else:
        comps.append(Component(f"working set ({chosen['phase']})", work_formula,
                               chosen["peak"] - saved_all - copies, "activations"))
    if copies:
        comps.append(Component("gradient fp32 copies", copies_formula, copies, "activations"))
    elif e < 4 and shard_group > 1 and not w.fp32_grads:
        comps.append(Component(f"{STAGING_PHASE} (at the end)", copies_formula, 4 * G, "other"))
    if last:
        cN, cV = min(x.N, FUSED_CHUNK_TOKENS), min(x.V_fused, FUSED_CHUNK_VOCAB)
        comps.append(Component(
            f"log-probs ({w.logprob_impl}, kept + peak)",
            f"4NV + eNV (+4NV if padded), V={x.V:,}" if w.logprob_impl == "ce"
            else f"4N + 4Nh + eVh + 4*cV*h + 16*cN*cV, cN={cN} cV={cV}",
            logprob_saved_bytes(x, w.logprob_impl) + logprob_peak_extra_bytes(x, w.logprob_impl),
            "other"))
    largest = max(n // g for n, g in zip(buckets, groups))
    per = 12 if w.adam_impl == "unfused" else 4
    step = per * largest
    if max(groups) > 1:
        step = max(step, max(4 * (n // g) + 4 * n for n, g in zip(buckets, groups) if g > 1))
    comps.append(Component(f"optimizer step (transient, {w.adam_impl} Adam)",
                           f"{per}*P_bucket/D, largest bucket {max(buckets):,}", step, "other"))
    kept = rollout_windows_kept(cfg, layout, w)
    kv = rollout_kv_cache_bytes(cfg, len(layers), tp, w, list(layers) if kept else None)
    tokens = w.rollout_max_tokens or w.seq_length
    sliding = sum(1 for i in layers if cfg.is_sliding_layer(i)) if kept else 0
    comps.append(Component(
        "KV cache",
        f"{kv_bytes_per_token(cfg, len(layers), tp, e):,} B/token x {w.rollout_batch} seq x "
        f"{tokens:,} tokens (blocks of {w.kv_block_size})"
        + (f"; {sliding} sliding layers hold their window only" if sliding else ""), kv, "rollout"))

    if chosen["peak"] >= step:
        train_peak, phase = static + chosen["peak"], chosen["phase"]
    else:
        train_peak, phase = static + step, "optimizer step"
    return StagePlan(pp_rank=pp_rank, layers=list(layers), in_flight=in_flight, parameters=P,
                     components=comps,
                     activations_by_recompute={r: v["peak"] for r, v in by_recompute.items()},
                     train_peak_bytes=train_peak, train_peak_phase=phase,
                     rollout_peak_bytes=static + kv)


def validate_plan_inputs(cfg: GPTConfig, layout: Layout, w: Workload) -> None:
    """Raise ConfigError naming the flag when the layout or the workload cannot run."""
    if layout.ep < 1:
        raise ConfigError(f"--expert-model-parallel-size must be >= 1, got {layout.ep}")
    if layout.ep > 1:
        if not cfg.is_moe:
            raise ConfigError(f"--expert-model-parallel-size {layout.ep} applies to mixture-of-experts models "
                              "(--num-experts); this model is dense")
        if (layout.dp * layout.cp) % layout.ep or cfg.num_moe_experts % layout.ep:
            raise ConfigError(f"--expert-model-parallel-size {layout.ep} must divide --num-experts "
                              f"{cfg.num_moe_experts} and the data x context parallel size {layout.dp * layout.cp}")
    for flag, v in (("--tensor-model-parallel-size", layout.tp),
                    ("--pipeline-model-parallel-size", layout.pp),
                    ("--context-parallel-size", layout.cp), ("--data-parallel-size", layout.dp),
                    ("--seq-length", w.seq_length), ("--micro-batch-size", w.micro_batch_size),
                    ("--kv-block-size", w.kv_block_size)):
        if v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    if w.rollout_batch < 0:
        raise ConfigError(f"--rollout-batch-size must be >= 0, got {w.rollout_batch}")
    if w.tokens_per_gpu is not None and (w.tokens_per_gpu < 1 or (layout.sp and w.tokens_per_gpu % layout.tp)):
        raise ConfigError(f"--max-tokens-per-gpu {w.tokens_per_gpu} must be >= 1"
                          + (f" and a multiple of --tensor-model-parallel-size {layout.tp} under sequence "
                             "parallelism" if layout.sp else ""))
    if w.num_microbatches is not None and w.num_microbatches < 1:
        raise ConfigError(f"--num-microbatches must be >= 1, got {w.num_microbatches}")
    if w.params_dtype not in DTYPE_BYTES:
        raise ConfigError(f"params dtype must be one of {sorted(DTYPE_BYTES)}, got {w.params_dtype!r}")
    if w.recompute not in RECOMPUTE_CHOICES:
        raise ConfigError(f"--recompute-granularity must be one of {RECOMPUTE_CHOICES}, got {w.recompute!r}")
    if w.adam_impl not in ("fused", "apex", "unfused"):
        raise ConfigError(f"--adam-impl must be fused, apex or unfused, got {w.adam_impl!r}")
    if w.logprob_impl not in LOGPROB_CHOICES:
        raise ConfigError(f"--logprob-impl must be one of {LOGPROB_CHOICES}, got {w.logprob_impl!r}")
    cfg.validate(layout.tp, layout.pp)
    if layout.cp > 1 and w.seq_length % (2 * layout.cp):
        raise ConfigError(f"--seq-length {w.seq_length} must be a multiple of 2 x "
                          f"--context-parallel-size ({2 * layout.cp}) for the zigzag split")
    if layout.sp and (w.seq_length // layout.cp) % layout.tp:
        raise ConfigError(f"--seq-length {w.seq_length} / --context-parallel-size {layout.cp} must be "
                          f"a multiple of --tensor-model-parallel-size {layout.tp} under sequence "
                          "parallelism (or pass --no-sequence-parallel)")
    try:
        pipeline_layer_ranges(cfg.num_layers, layout.pp, w.first_stage_layers, w.last_stage_layers)
    except ValueError as err:
        raise ConfigError(f"--decoder-first/last-pipeline-num-layers: {err}") from None


def plan_memory(cfg: GPTConfig, layout: Layout, w: Workload) -> MemoryPlan:
    """Bytes per GPU of every pipeline stage (see the module docstring for the formulas)."""
    validate_plan_inputs(cfg, layout, w)
    ranges = pipeline_layer_ranges(cfg.num_layers, layout.pp, w.first_stage_layers, w.last_stage_layers)
    return MemoryPlan(cfg, layout, w, [plan_stage(cfg, layout, w, r, ranges[r])
                                       for r in range(layout.pp)])


# -- layout search ---------------------------------------------------------------------------
def layout_cost(layout: Layout, gpus_per_node: int, num_microbatches: Optional[int]) -> float:
    """A simple preference order, lower is better: tensor parallelism beyond a node is
    expensive (its collectives sit on the critical path of every layer), the pipeline bubble
    (pp - 1) / (m + pp - 1) idles GPUs, tp and ring attention cost communication that is only
    partly hidden; pure data parallelism is cheapest."""
    tp, pp, cp, ep = layout.tp, layout.pp, layout.cp, layout.ep
    m = num_microbatches or pp
    cost = 0.0
    cost += 0.15 * math.log2(tp) + (4.0 if tp > gpus_per_node else 0.0)
    cost += (pp - 1) / (m + pp - 1) + 0.05 * (pp - 1)
    cost += 0.1 * math.log2(cp) + (1.0 if tp * cp > gpus_per_node else 0.0)
    # expert parallelism: two all-to-alls per MoE layer, cheap inside a node (its group is
    # tp * ep consecutive ranks), not across
    cost += 0.05 * math.log2(ep) + (1.0 if tp * ep > gpus_per_node else 0.0)
    return round(cost, 4)


@dataclass
class Suggestion:
    layout: Layout
    cost: float
    peak_bytes: int
    headroom_bytes: int
    fits: bool
    plan: MemoryPlan = field(repr=False)


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def suggest_layouts(cfg: GPTConfig, world_size: int, w: Workload, gpu_memory_bytes: int,
                    reserved_bytes: int = 0, gpus_per_node: int = 8,
                    sequence_parallel: bool = True, ep: Optional[int] = 1) -> list[Suggestion]:
    """Every valid (tp, pp, cp, dp) with tp*pp*cp*dp = world_size (and dp*cp a multiple of
    ``ep``), fitting ones first, each group ordered by ``layout_cost`` then by headroom.
    ``ep=None`` (an MoE model): every expert-parallel size that divides dp*cp and the experts,
    too."""
    out = []
    for tp in _divisors(world_size):
        for pp in _divisors(world_size // tp):
            for cp in _divisors(world_size // (tp * pp)):
                dp = world_size // (tp * pp * cp)
                eps = ([ep or 1] if ep is not None or not cfg.is_moe
                       else [e for e in _divisors(dp * cp) if cfg.num_moe_experts % e == 0])
                for e in eps:
                    layout = Layout(tp, pp, cp, dp, sequence_parallel, e)
                    try:
                        plan = plan_memory(cfg, layout, w)
                    except ConfigError:
                        continue
                    need = plan.peak_bytes + reserved_bytes
                    out.append(Suggestion(layout, layout_cost(layout, gpus_per_node, w.num_microbatches),
                                          plan.peak_bytes, gpu_memory_bytes - need,
                                          need <= gpu_memory_bytes, plan))
    out.sort(key=lambda s: (not s.fits, s.cost if s.fits else 0.0, -s.headroom_bytes))
    return out


# -- measuring --------------------------------------------------------------------------------
def _dispatch_mode_base():
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


class MemoryMeter:
    """Live and peak bytes of tensor storages allocated while it is active, on any device.

    A ``TorchDispatchMode`` sees every op's outputs: a fresh output storage (a return without
    an alias annotation) is counted once, keyed by the storage object, and released by a
    weakref finalizer when the storage dies (PyTorch keeps one Python object per live
    storage). Views and in-place results add nothing; storages that existed before are never
    counted. ``peak_bytes`` is the exact high-water mark of tensor memory (allocator caching
    and fragmentation excluded), like ``torch.cuda.max_memory_allocated`` but on CPU too.

        with MemoryMeter() as meter:
            train_step(...)
        meter.peak_bytes
    """

    def __init__(self, device_type: Optional[str] = None):
        self.device_type = device_type
        self.live_bytes = 0
        self.peak_bytes = 0
        self._sizes: dict[int, int] = {}
        self._lock = threading.Lock()
        self._mode = None

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def _release(self, key: int) -> None:
        with self._lock:
            self.live_bytes -= self._sizes.pop(key, 0)

    def _add(self, tensor) -> None:
        if self.device_type is not None and tensor.device.type != self.device_type:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or meta-only wrappers
            return
        nbytes = storage.nbytes()
        key = id(storage)
        with self._lock:
            if key in self._sizes or nbytes == 0:
                return
            self._sizes[key] = nbytes
            self.live_bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(storage, self._release, key)

    def _resized(self, tensor) -> None:
        """An in-place/out= op may have grown a storage we already count."""
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = id(storage)
        with self._lock:
            old = self._sizes.get(key)
            if old is not None and storage.nbytes() != old:
                self._sizes[key] = storage.nbytes()
                self.live_bytes += storage.nbytes() - old
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __enter__(self) -> "MemoryMeter":
        import torch
        from torch.utils._pytree import tree_flatten

        meter = self

        class _Mode(_dispatch_mode_base()):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                returns = func._schema.returns
                flat = out if isinstance(out, (tuple, list)) else (out,)
                for i, item in enumerate(flat):
                    aliased = i < len(returns) and returns[i].alias_info is not None
                    for t in tree_flatten(item)[0]:
                        if isinstance(t, torch.Tensor):
                            (meter._resized if aliased else meter._add)(t)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._mode = None


def measure_peak_bytes(fn: Callable[[], Any], device_type: Optional[str] = None) -> tuple[int, Any]:
    """(peak bytes of tensor storages allocated while ``fn()`` runs, its result)."""
    with MemoryMeter(device_type) as meter:
        result = fn()
    return meter.peak_bytes, result
