"""Model configuration for the Llama/Qwen2/Qwen3(-MoE)-family GPT, and the presets users start from.

One dataclass describes the architecture; the same object is written into every checkpoint
(``config.json``) so a checkpoint loads with nothing else. Field names follow Megatron-LM's
flags (``--num-query-groups`` is the number of KV heads, ``--kv-channels`` the head size).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Optional


class ConfigError(ValueError):
    """A model/parallel configuration that cannot work; the message names the offending flag."""


# required fields of each RoPE scaling type (``rope_scaling["rope_type"]``, llama3 when absent)
ROPE_SCALING_FIELDS = {
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    "linear": ("factor",),  # positions divided by factor (Gemma 3's global layers)
    # per-frequency divisors within / beyond the pretraining context (Phi-3.5, Phi-4-mini);
    # factor: the context's growth, max_position_embeddings / original (sets the attention factor)
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings", "factor"),
}
YARN_OPTIONAL_FIELDS = ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim", "truncate")


@dataclass
class GPTConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_layers: int = 2
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: Optional[int] = None  # head dim; defaults to hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rotary_base: float = 10000.0
    # RoPE rotates the first head_dim * rotary_percent channels of every head and passes the
    # rest through (GLM-4: 0.5; Megatron-LM's --rotary-percent)
    rotary_percent: float = 1.0
    # Llama-3 style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: Optional[dict] = None
    norm_epsilon: float = 1e-6
    add_qkv_bias: bool = False
    # RMSNorm over each head's q and k before RoPE (Qwen3; Megatron-LM's --qk-layernorm)
    qk_layernorm: bool = False
    # what the q/k norm spans: "head" (Qwen3: each head's head_dim, one weight shared by the
    # heads) or "all" (OLMo 2/3: all heads of a token at once, one weight per channel)
    qk_layernorm_scope: str = "head"
    # where the block's norms sit: "pre" (Llama/Qwen: x + f(norm(x))), "post" (OLMo 2/3:
    # x + norm(f(x)), no norm on the sublayer's input) or "sandwich" (Gemma 3: x + norm(f(norm(x))))
    norm_placement: str = "pre"
    # RMSNorm scales by (offset + w): Gemma stores w around 0 (offset 1)
    norm_weight_offset: float = 0.0
    # the attention's softmax scale (Gemma 3: query_pre_attn_scalar^-1/2); None: head_dim^-1/2
    attention_softmax_scale: Optional[float] = None
    # the embedding's output is multiplied by this (Gemma: sqrt(hidden), in the weights' dtype)
    embedding_multiplier: float = 1.0
    # Gemma 2's soft caps, x -> cap * tanh(x / cap): on the attention's scaled scores before the
    # softmax, and on the output logits (logits, log-probs and sampling alike); None: no cap
    attn_logit_softcapping: Optional[float] = None
    final_logit_softcapping: Optional[float] = None
    # A learned logit per query head that joins every softmax and takes probability from the
    # keys without contributing a value (gpt-oss's attention sinks): out *= sigmoid(lse - sink)
    attention_sinks: bool = False
    # a bias on the attention output projection (gpt-oss)
    add_attention_output_bias: bool = False
    # RMSNorm's weight multiplies the fp32 normalised values before the cast back (OLMo); Llama
    # and Qwen cast first, then multiply in the activations' dtype
    norm_in_fp32: bool = False
    # Sliding-window attention (Hugging Face's ``sliding_window`` W): a query of a sliding layer
    # sees its W most recent tokens, itself included. ``layer_types`` names every layer
    # "full_attention" or "sliding_attention" (OLMo 3: three sliding, one full); None with a
    # window: every layer slides (Mistral v0.1).
    sliding_window: Optional[int] = None
    layer_types: Optional[list] = None
    # RoPE of the sliding layers when it differs from the full layers' (OLMo 3 scales only the
    # full layers' RoPE): {"rotary_base": theta, "rope_scaling": dict or None}
    sliding_rope: Optional[dict] = None
    # layers without any position embedding (NoPE; SmolLM3: every fourth): their q and k are
    # not rotated, so they see positions only through causality
    nope_layers: Optional[list] = None
    # Multi-head latent attention (DeepSeek-V2/V3, Moonlight, Kimi K2; Megatron-LM's
    # --multi-latent-attention --q-lora-rank --kv-lora-rank --qk-head-dim --qk-pos-emb-head-dim
    # --v-head-dim): K and V come up from a kv_lora_rank latent of the token, q from a
    # q_lora_rank one (None: straight from x); each head's q and k are qk_head_dim channels
    # without position and qk_pos_emb_head_dim rotated ones (k's shared by all heads), and its
    # v has v_head_dim. No GQA (num_query_groups = heads). The attention core and KV cache see
    # every head at kv_channels = max(qk_head_dim + qk_pos_emb_head_dim, v_head_dim) (v
    # zero-padded); RoPE rotates the qk_pos_emb_head_dim channels.
    multi_latent_attention: bool = False
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 512
    qk_head_dim: int = 128
    qk_pos_emb_head_dim: int = 64
    v_head_dim: int = 128
    # the q and kv latents' RMSNorm epsilon (DeepSeek's code and transformers: 1e-6 whatever the
    # model's rms_norm_eps; Moonlight's is 1e-5)
    mla_latent_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = False
    # Mixture of experts (Qwen3-MoE; Megatron-LM's --num-experts / --moe-router-topk /
    # --moe-ffn-hidden-size): every layer's MLP is num_moe_experts SwiGLU experts of
    # moe_ffn_hidden_size, each token routed to moe_router_topk of them by softmax
    # probability (renormalised over the k when moe_norm_topk_prob). 0 experts = dense.
    num_moe_experts: int = 0
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_norm_topk_prob: bool = False
    # gpt-oss's experts: a router bias, biases on every expert projection, and the clamped
    # SwiGLU (gate <= limit, |up| <= limit, (up + 1) * gate * sigmoid(alpha * gate))
    moe_router_bias: bool = False
    moe_expert_bias: bool = False
    # DeepSeek-V3-style routing (DeepSeek-V3, Moonlight, Kimi K2, GLM-4.5; Megatron-LM's flags of
    # the same names): scores sigmoid(x W_r^T) instead of a softmax; with the expert bias b
    # (a buffer, aux-loss-free balancing) experts are *chosen* by score + b but weighted by the
    # score; with groups, only experts of the group_topk groups whose two best scores sum
    # highest are chosen; the k weights (renormalised when moe_norm_topk_prob) are multiplied
    # by the scaling factor
    moe_router_score_function: str = "softmax"  # "softmax" | "sigmoid"
    moe_router_enable_expert_bias: bool = False
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    # a group scores by the sum of its best this-many experts (DeepSeek-V3: 2; V2: 1, its best)
    moe_router_group_score_topk: int = 2
    moe_router_topk_scaling_factor: Optional[float] = None
    # the router's GEMM and scores in fp32 whatever the parameters' dtype (Megatron-LM's
    # --moe-router-dtype fp32; DeepSeek's and GLM-4.5's routers); None: the parameters' dtype
    moe_router_dtype: Optional[str] = None
    # an always-on SwiGLU expert of this ffn size next to the routed ones (DeepSeek: n_shared x
    # moe_intermediate_size); None: none
    moe_shared_expert_intermediate_size: Optional[int] = None
    # the shared expert's output scaled per token by sigmoid(x . g) with a learned g (Qwen2-MoE's
    # shared_expert_gate; Megatron-LM's --moe-shared-expert-gate)
    moe_shared_expert_gate: bool = False
    # which layers are MoE (Megatron-LM's --moe-layer-freq): N, every N-th layer from the first
    # (i % N == 0); or one 0/1 per layer (DeepSeek's first_k_dense_replace k: k zeros, then
    # ones). The dense layers' MLP has ffn_hidden_size.
    moe_layer_freq: Any = 1
    activation: str = "swiglu"  # "swiglu" | "swiglu_clamped" | "geglu_tanh" (Gemma: gelu_pytorch_tanh)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    architecture: str = "qwen2"  # "qwen2" | "qwen3" | "qwen3_moe" | "llama" | "mistral" | "phi3": the HF class conversion targets
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Any] = None  # int or list of ints
    extra: dict = field(default_factory=dict)  # carried through (e.g. the original HF config)

    def __post_init__(self):
        if self.multi_latent_attention:  # derived: the attention core's head size, no GQA
            self.kv_channels = max(self.qk_head_dim + self.qk_pos_emb_head_dim, self.v_head_dim)
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None and self.num_attention_heads:
            self.kv_channels = self.hidden_size // self.num_attention_heads
        if self.num_moe_experts and self.moe_ffn_hidden_size is None:
            self.moe_ffn_hidden_size = self.ffn_hidden_size

    @property
    def is_moe(self) -> bool:
        """Whether the model has experts (some of its layers may still be dense)."""
        return bool(self.num_moe_experts)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based, of the whole model) has routed experts."""
        if not self.is_moe:
            return False
        if isinstance(self.moe_layer_freq, (list, tuple)):
            return bool(self.moe_layer_freq[layer])
        return layer % int(self.moe_layer_freq) == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    def is_sliding_layer(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based, of the whole model) attends through the window."""
        if self.sliding_window is None:
            return False
        return self.layer_types is None or self.layer_types[layer] == "sliding_attention"

    def window_left(self, layer: int) -> int:
        """Keys before the diagonal layer ``layer`` sees (flash-attn's window_size[0]); -1: all."""
        return int(self.sliding_window) - 1 if self.is_sliding_layer(layer) else -1

    @property
    def has_sliding_layers(self) -> bool:
        return any(self.is_sliding_layer(i) for i in range(self.num_layers))

    # -- derived sizes ------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return int(self.kv_channels)

    @property
    def rotary_dim(self) -> int:
        """Channels of a head that RoPE rotates (the first ones)."""
        if self.multi_latent_attention:
            return int(self.qk_pos_emb_head_dim)
        return int(round(self.head_dim * self.rotary_percent))

    @property
    def value_projection_size(self) -> int:
        """Width of the attention output that enters the output projection (heads * v head)."""
        if self.multi_latent_attention:
            return self.num_attention_heads * self.v_head_dim
        return self.query_projection_size

    def attention_parameters(self, matrices_only: bool = False) -> int:
        """One layer's attention parameters (``matrices_only``: the GEMM weights, what the
        FLOPs count)."""
        h = self.hidden_size
        if self.multi_latent_attention:
            heads, dqk = self.num_attention_heads, self.qk_head_dim + self.qk_pos_emb_head_dim
            ql, kvl = self.q_lora_rank, self.kv_lora_rank
            q = h * ql + ql * heads * dqk + (0 if matrices_only else ql) if ql else h * heads * dqk
            kv = h * (kvl + self.qk_pos_emb_head_dim) + kvl * heads * (self.qk_head_dim + self.v_head_dim)
            return q + kv + (0 if matrices_only else kvl) + self.value_projection_size * h
        attn = h * (self.query_projection_size + 2 * self.kv_projection_size) + self.query_projection_size * h
        if matrices_only:
            return attn
        if self.add_qkv_bias:
            attn += self.query_projection_size + 2 * self.kv_projection_size
        if self.qk_layernorm:
            attn += (self.query_projection_size + self.kv_projection_size
                     if self.qk_layernorm_scope == "all" else 2 * self.head_dim)
        return attn + self.num_attention_heads * self.attention_sinks + h * self.add_attention_output_bias

    def kv_cache_row(self, tp: int, latent: bool = True) -> tuple[int, int, bool]:
        """(kv heads per tp rank, values per head, keys only) of a generation KV-cache row: with
        MLA and ``latent`` one latent of kv_lora_rank + qk_pos_emb_head_dim per token, whole on
        every tp rank (``GenerationEngine(latent_cache=True)``); otherwise each kv head's K and V."""
        if latent and self.multi_latent_attention:
            return 1, self.kv_lora_rank + self.qk_pos_emb_head_dim, True
        return self.num_query_groups // tp, self.head_dim, False

    def mla_softmax_scale(self) -> float:
        """MLA's softmax scale: (qk_head_dim + qk_pos_emb_head_dim)^-1/2, times YaRN's
        mscale(factor, mscale_all_dim)^2 = (0.1 mscale_all_dim ln(factor) + 1)^2 under YaRN
        scaling with mscale_all_dim (DeepSeek-V3, Kimi K2)."""
        scale = (self.qk_head_dim + self.qk_pos_emb_head_dim) ** -0.5
        scaling = self.rope_scaling or {}
        if scaling.get("rope_type") == "yarn" and scaling.get("mscale_all_dim"):
            scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
        return scale

    @property
    def query_projection_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_projection_size(self) -> int:
        return self.num_query_groups * self.head_dim

    def padded_vocab_size(self, tensor_model_parallel_size: int = 1) -> int:
        """Vocabulary rounded up so every tp rank holds an equal, aligned shard (Megatron rule)."""
        multiple = max(1, self.make_vocab_size_divisible_by) * tensor_model_parallel_size
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, (list, tuple)):
            return [int(i) for i in self.eos_token_id]
        return [int(self.eos_token_id)]

    def num_parameters(self) -> int:
        h, L = self.hidden_size, self.num_layers
        attn = self.attention_parameters()
        norms = 4 if self.norm_placement == "sandwich" else 2
        mlps = sum(self._mlp_parameters(i, self.num_moe_experts) for i in range(L))
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * (attn + norms * h) + mlps + emb + h

    def num_active_parameters(self) -> int:
        """Parameters a token passes through (MoE: the router, its top-k experts and the
        shared expert); the FLOPs per token are 6x this in training."""
        skipped = sum(self._mlp_parameters(i, self.num_moe_experts) - self.active_mlp_parameters(i)
                      for i in range(self.num_layers))
        return self.num_parameters() - skipped

    def active_mlp_parameters(self, layer: int, biases: bool = True) -> int:
        """Layer ``layer``'s MLP weights a token passes through (MoE: the router, k experts and
        the shared expert); ``biases=False``: the matrices only (what the FLOPs count)."""
        return self._mlp_parameters(layer, self.moe_router_topk, biases)

    def _mlp_parameters(self, layer: int, experts: int, biases: bool = True) -> int:
        h = self.hidden_size
        if not self.is_moe_layer(layer):
            return 3 * h * self.ffn_hidden_size
        f = self.moe_ffn_hidden_size
        bias = experts * (2 * f + h) * self.moe_expert_bias + self.num_moe_experts * self.moe_router_bias
        shared = 3 * h * (self.moe_shared_expert_intermediate_size or 0) + h * self.moe_shared_expert_gate
        return experts * 3 * h * f + h * self.num_moe_experts + shared + bias * biases  # + router

    # -- validation ---------------------------------------------------------------------
    def validate(self, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1):
        """Raise ConfigError naming the flag when the shape or the parallel layout cannot work."""
        positive = {
            "--vocab-size": self.vocab_size,
            "--hidden-size": self.hidden_size,
            "--ffn-hidden-size": self.ffn_hidden_size,
            "--num-layers": self.num_layers,
            "--num-attention-heads": self.num_attention_heads,
            "--num-query-groups": self.num_query_groups,
            "--kv-channels": self.kv_channels,
            "--max-position-embeddings": self.max_position_embeddings,
        }
        for flag, value in positive.items():
            if value is None or int(value) <= 0:
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
        if self.multi_latent_attention:
            self._validate_mla()
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            cap = getattr(self, name)
            if cap is not None and not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
                raise ConfigError(f"{name} must be a positive number (or unset), got {cap!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--num-query-groups {self.num_query_groups} (GQA needs whole groups)"
            )
        if self.head_dim % 2:
            raise ConfigError(f"--kv-channels {self.head_dim} must be even for rotary embeddings")
        if self.rotary_base <= 0:
            raise ConfigError(f"--rotary-base must be > 0, got {self.rotary_base}")
        if not self.multi_latent_attention and (
                not 0 < self.rotary_percent <= 1 or self.rotary_dim % 2 or self.rotary_dim < 2
                or abs(self.rotary_dim - self.head_dim * self.rotary_percent) > 1e-6):
            raise ConfigError(f"--rotary-percent {self.rotary_percent} must be in (0, 1] and rotate an even "
                              f"number of the head's {self.head_dim} channels")
        tp, pp = tensor_model_parallel_size, pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ConfigError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be >= 1")
        if self.num_attention_heads % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads "
                f"{self.num_attention_heads}; choose a tp size that divides the number of heads"
            )
        if self.num_query_groups % tp:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} does not divide --num-query-groups "
                f"{self.num_query_groups} (the number of KV heads); choose a tp size that divides it"
            )
        if self.ffn_hidden_size % tp and not self.is_moe:
            raise ConfigError(
                f"--tensor-model-parallel-size {tp} does not divide --ffn-hidden-size {self.ffn_hidden_size}"
            )
        if self.num_moe_experts < 0:
            raise ConfigError(f"--num-experts must be >= 0 (0 = dense), got {self.num_moe_experts}")
        if self.is_moe:
            if not 1 <= self.moe_router_topk <= self.num_moe_experts:
                raise ConfigError(f"--moe-router-topk {self.moe_router_topk} must be between 1 and "
                                  f"--num-experts {self.num_moe_experts}")
            if not self.moe_ffn_hidden_size or self.moe_ffn_hidden_size <= 0:
                raise ConfigError(f"--moe-ffn-hidden-size must be a positive integer, got {self.moe_ffn_hidden_size!r}")
            if self.moe_ffn_hidden_size % tp:
                raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide --moe-ffn-hidden-size "
                                  f"{self.moe_ffn_hidden_size} (each expert is split over tp)")
            self._validate_deepseek_moe(tp)
        if self.num_layers < pp:
            raise ConfigError(
                f"--pipeline-model-parallel-size {pp} exceeds --num-layers {self.num_layers}; "
                "every stage needs at least one layer"
            )
        _check_rope_scaling(self.rope_scaling, "rope_scaling", self.rotary_dim)
        if self.activation not in ("swiglu", "swiglu_clamped", "geglu_tanh"):
            raise ConfigError(f"activation must be 'swiglu', 'swiglu_clamped' or 'geglu_tanh', got {self.activation!r}")
        if self.qk_layernorm_scope not in ("head", "all"):
            raise ConfigError(f"qk_layernorm_scope must be 'head' or 'all', got {self.qk_layernorm_scope!r}")
        if self.norm_placement not in ("pre", "post", "sandwich"):
            raise ConfigError(f"norm_placement must be 'pre', 'post' or 'sandwich', got {self.norm_placement!r}")
        if self.sliding_window is not None and int(self.sliding_window) < 1:
            raise ConfigError(f"--sliding-window must be a positive number of tokens, got {self.sliding_window!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries for --num-layers "
                                  f"{self.num_layers}")
            bad = sorted({t for t in self.layer_types} - {"full_attention", "sliding_attention"})
            if bad:
                raise ConfigError(f"layer_types may hold 'full_attention' and 'sliding_attention', got {bad}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ConfigError("layer_types names sliding_attention layers but sliding_window is not set")
        if self.nope_layers is not None:
            bad = [i for i in self.nope_layers if not (isinstance(i, int) and 0 <= i < self.num_layers)]
            if bad or len(set(self.nope_layers)) != len(self.nope_layers):
                raise ConfigError(f"nope_layers must list distinct layer numbers in [0, {self.num_layers}), "
                                  f"got {self.nope_layers}")
        if self.sliding_rope is not None:
            unknown = sorted(set(self.sliding_rope) - {"rotary_base", "rope_scaling"})
            if unknown or "rotary_base" not in self.sliding_rope:
                raise ConfigError(f"sliding_rope holds rotary_base and rope_scaling, got {sorted(self.sliding_rope)}")
            _check_rope_scaling(self.sliding_rope.get("rope_scaling"), "sliding_rope.rope_scaling", self.rotary_dim)
        return self

    def _validate_mla(self) -> None:
        for flag, value in (("--kv-lora-rank", self.kv_lora_rank), ("--qk-head-dim", self.qk_head_dim),
                            ("--qk-pos-emb-head-dim", self.qk_pos_emb_head_dim), ("--v-head-dim", self.v_head_dim)):
            if value is None or int(value) <= 0:
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"--q-lora-rank must be a positive integer (or unset), got {self.q_lora_rank!r}")
        if self.qk_pos_emb_head_dim % 2:
            raise ConfigError(f"--qk-pos-emb-head-dim {self.qk_pos_emb_head_dim} must be even for rotary embeddings")
        want = max(self.qk_head_dim + self.qk_pos_emb_head_dim, self.v_head_dim)
        if self.kv_channels != want or self.num_query_groups != self.num_attention_heads:
            raise ConfigError(f"multi-latent attention derives --kv-channels ({want}) and --num-query-groups "
                              f"(= heads, {self.num_attention_heads}); got {self.kv_channels} and "
                              f"{self.num_query_groups}")
        unsupported = [name for name, on in (
            ("--add-qkv-bias", self.add_qkv_bias), ("--qk-layernorm", self.qk_layernorm),
            ("attention sinks", self.attention_sinks), ("--rotary-percent", self.rotary_percent != 1.0),
            ("layers without RoPE", bool(self.nope_layers)), ("sliding windows (--window-size)", self.has_sliding_layers),
            ("norm weights offset from 1 (Gemma's)", self.norm_weight_offset != 0.0),
            ("soft-capped attention scores (attn_logit_softcapping)", bool(self.attn_logit_softcapping))) if on]
        if unsupported:
            raise ConfigError(f"multi-latent attention does not take {', '.join(unsupported)}")

    def _validate_deepseek_moe(self, tp: int) -> None:
        """The routing, shared-expert and layer-pattern fields of an MoE model."""
        E = self.num_moe_experts
        if self.moe_router_score_function not in ("softmax", "sigmoid"):
            raise ConfigError(f"--moe-router-score-function must be softmax or sigmoid, got "
                              f"{self.moe_router_score_function!r}")
        if self.moe_router_enable_expert_bias and self.moe_router_score_function != "sigmoid":
            raise ConfigError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (the bias "
                              "shifts sigmoid scores; Megatron-LM refuses it with softmax too)")
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if (groups is None) != (group_topk is None):
            raise ConfigError("--moe-router-num-groups and --moe-router-group-topk go together")
        best = self.moe_router_group_score_topk
        if self.moe_router_dtype not in (None, "fp32"):
            raise ConfigError(f"--moe-router-dtype must be fp32 (or unset), got {self.moe_router_dtype!r}")
        if groups is not None:
            if groups < 1 or E % groups or (groups > 1 and not 1 <= best <= E // groups):
                raise ConfigError(f"--moe-router-num-groups {groups} must divide --num-experts {E} into groups of "
                                  f"at least {best} experts (a group scores by its best {best})")
            if not 1 <= group_topk <= groups or self.moe_router_topk > group_topk * E // groups:
                raise ConfigError(f"--moe-router-group-topk {group_topk} must be in [1, {groups}] and its groups "
                                  f"hold at least --moe-router-topk {self.moe_router_topk} experts")
        if self.moe_router_topk_scaling_factor is not None and not self.moe_router_topk_scaling_factor > 0:
            raise ConfigError(f"--moe-router-topk-scaling-factor must be > 0, got "
                              f"{self.moe_router_topk_scaling_factor}")
        shared = self.moe_shared_expert_intermediate_size
        if shared is not None and (shared <= 0 or shared % tp):
            raise ConfigError(f"--moe-shared-expert-intermediate-size {shared} must be positive and divisible by "
                              f"--tensor-model-parallel-size {tp}")
        if self.moe_shared_expert_gate and not shared:
            raise ConfigError("--moe-shared-expert-gate gates the shared expert: add "
                              "--moe-shared-expert-intermediate-size N")
        freq = self.moe_layer_freq
        if isinstance(freq, (list, tuple)):
            if len(freq) != self.num_layers or any(v not in (0, 1) for v in freq) or not any(freq):
                raise ConfigError(f"--moe-layer-freq as a list needs one 0/1 per layer ({self.num_layers}) and at "
                                  f"least one 1, got {list(freq)}")
        elif not (isinstance(freq, int) and freq >= 1):
            raise ConfigError(f"--moe-layer-freq must be a positive integer or a 0/1 list, got {freq!r}")
        if self.num_moe_layers < self.num_layers and self.ffn_hidden_size % tp:
            raise ConfigError(f"--tensor-model-parallel-size {tp} does not divide --ffn-hidden-size "
                              f"{self.ffn_hidden_size} (the dense layers' MLP)")

    def uses_rope(self, layer: int) -> bool:
        """Whether layer ``layer`` (0-based, of the whole model) rotates its q and k."""
        return not self.nope_layers or layer not in self.nope_layers

    def rope_for_layer(self, layer: int) -> tuple[float, Optional[dict]]:
        """(theta, scaling) of layer ``layer``'s RoPE."""
        if self.sliding_rope is not None and self.is_sliding_layer(layer):
            return float(self.sliding_rope["rotary_base"]), self.sliding_rope.get("rope_scaling")
        return self.rotary_base, self.rope_scaling

    # -- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown model config fields {unknown}")
        return cls(**d)

    def save(self, path: str):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str) -> "GPTConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


def yarn_mscale(factor: float, m: float = 1.0) -> float:
    """YaRN's magnitude correction for a context stretched ``factor`` times: 0.1 m ln(factor) + 1
    (1 without stretching)."""
    return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0


def every_nth_full(num_layers: int, n: int) -> list[str]:
    """``layer_types`` where every n-th layer (1-based: n, 2n, ...) attends to everything and the
    others slide (Megatron-LM's --window-attn-skip-freq; OLMo 3: 4, Gemma 3: 6, gpt-oss: 2)."""
    return ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(num_layers)]


def _check_rope_scaling(scaling: Optional[dict], name: str, rotary_dim: int) -> None:
    if scaling is None:
        return
    kind = scaling.get("rope_type", "llama3")
    needed = ROPE_SCALING_FIELDS.get(kind)
    if needed is None:
        raise ConfigError(f"{name} rope_type {kind!r} is not supported ({sorted(ROPE_SCALING_FIELDS)})")
    missing = [k for k in needed if k not in scaling]
    if missing:
        raise ConfigError(f"{name} is missing {missing} ({kind} scaling needs {list(needed)})")
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            factors = scaling[key]
            if (not isinstance(factors, (list, tuple)) or len(factors) != rotary_dim // 2
                    or not all(isinstance(f, (int, float)) and f > 0 for f in factors)):
                raise ConfigError(f"{name}.{key} must list {rotary_dim // 2} positive numbers (one per rotated "
                                  f"channel pair of the {rotary_dim} rotated channels), got {factors!r}")


def _qwen25(hidden, ffn, layers, heads, groups, tied, vocab=151936):
    return dict(
        vocab_size=vocab, hidden_size=hidden, ffn_hidden_size=ffn, num_layers=layers,
        num_attention_heads=heads, num_query_groups=groups, max_position_embeddings=32768,
        rotary_base=1000000.0, norm_epsilon=1e-6, add_qkv_bias=True, tie_word_embeddings=tied,
        architecture="qwen2", eos_token_id=151643, bos_token_id=151643,
    )


def _qwen3(hidden, ffn, layers, heads, tied):
    """Qwen3 dense: QK-norm, no QKV bias, 8 KV heads of size 128 (decoupled from hidden/heads)."""
    return dict(
        vocab_size=151936, hidden_size=hidden, ffn_hidden_size=ffn, num_layers=layers,
        num_attention_heads=heads, num_query_groups=8, kv_channels=128,
        max_position_embeddings=40960, rotary_base=1000000.0, norm_epsilon=1e-6,
        add_qkv_bias=False, qk_layernorm=True, tie_word_embeddings=tied, architecture="qwen3",
        eos_token_id=151645, bos_token_id=151643,
    )


def _qwen3_moe(hidden, layers, heads, experts, moe_ffn):
    """Qwen3-MoE: Qwen3 attention (4 KV heads), every MLP 128 experts, 8 routed per token."""
    return {**_qwen3(hidden, 6144, layers, heads, False), "num_query_groups": 4,
            "num_moe_experts": experts, "moe_router_topk": 8, "moe_ffn_hidden_size": moe_ffn,
            "moe_norm_topk_prob": True, "architecture": "qwen3_moe"}


def _qwen2_moe(hidden, ffn, layers, heads, kv_heads, experts, topk, moe_ffn, shared, max_positions):
    """Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (QKV bias), softmax top-k not
    renormalised, a shared expert gated by sigmoid(x . g)."""
    return dict(
        vocab_size=151936, hidden_size=hidden, ffn_hidden_size=ffn, num_layers=layers, num_attention_heads=heads,
        num_query_groups=kv_heads, max_position_embeddings=max_positions, rotary_base=1000000.0, norm_epsilon=1e-6,
        add_qkv_bias=True, tie_word_embeddings=False, num_moe_experts=experts, moe_router_topk=topk,
        moe_ffn_hidden_size=moe_ffn, moe_norm_topk_prob=False, moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=True, architecture="qwen2_moe", bos_token_id=151643, eos_token_id=151643,
    )


def _mistral(hidden, layers, vocab, max_positions):
    """Mistral (7B v0.3, Nemo): Llama's layers without sliding window, 32 heads, 8 KV heads."""
    return dict(
        vocab_size=vocab, hidden_size=hidden, ffn_hidden_size=14336, num_layers=layers,
        num_attention_heads=32, num_query_groups=8, max_position_embeddings=max_positions,
        rotary_base=1000000.0, norm_epsilon=1e-5, add_qkv_bias=False, tie_word_embeddings=False,
        architecture="mistral", bos_token_id=1, eos_token_id=2,
    )


def _gemma2(hidden: int, ffn: int, layers: int, heads: int, kv_heads: int, head_dim: int, pre_attn_scalar: int):
    """Gemma 2 (Gemma2ForCausalLM): Gemma's block (Gemma 3's without q/k norms), 4096-token sliding
    windows on every other layer (the first slides), scores soft-capped at 50 and logits at 30."""
    return dict(
        vocab_size=256000, hidden_size=hidden, ffn_hidden_size=ffn, num_layers=layers, num_attention_heads=heads,
        num_query_groups=kv_heads, kv_channels=head_dim, max_position_embeddings=8192, rotary_base=10000.0,
        norm_epsilon=1e-6, add_qkv_bias=False, norm_placement="sandwich", norm_weight_offset=1.0, norm_in_fp32=True,
        activation="geglu_tanh", embedding_multiplier=hidden ** 0.5, attention_softmax_scale=pre_attn_scalar ** -0.5,
        sliding_window=4096, layer_types=every_nth_full(layers, 2), attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0, tie_word_embeddings=True, architecture="gemma2", bos_token_id=2,
        eos_token_id=1,
    )


def _olmo(version: int):
    """OLMo 2 / OLMo 3 7B: multi-head attention (32 KV heads), norms after the sublayers, q/k
    norms over all heads; OLMo 3 adds 4096-token sliding windows on three of every four layers
    and YaRN (x8 of 8192) on the full layers only."""
    shape = dict(
        hidden_size=4096, ffn_hidden_size=11008, num_layers=32, num_attention_heads=32,
        num_query_groups=32, rotary_base=500000.0, norm_epsilon=1e-6, add_qkv_bias=False,
        qk_layernorm=True, qk_layernorm_scope="all", norm_placement="post", norm_in_fp32=True,
        tie_word_embeddings=False, eos_token_id=100257,
    )
    if version == 2:
        return {**shape, "vocab_size": 100352, "max_position_embeddings": 4096, "architecture": "olmo2"}
    return {**shape, "vocab_size": 100278, "max_position_embeddings": 65536, "architecture": "olmo3",
            "rope_scaling": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                             "attention_factor": 1.2079441541679836, "beta_fast": 32.0, "beta_slow": 1.0},
            "sliding_window": 4096, "sliding_rope": {"rotary_base": 500000.0, "rope_scaling": None},
            "layer_types": every_nth_full(32, 4)}


def _gpt_oss(layers: int, experts: int):
    """gpt-oss: 64 query heads of 64 over 8 KV heads with sinks and biases, every other layer a
    128-token sliding window (the first slides), experts of 2880 (top-4, biased, clamped
    SwiGLU), YaRN x32 of 4096 on every layer."""
    return dict(
        vocab_size=201088, hidden_size=2880, ffn_hidden_size=2880, num_layers=layers, num_attention_heads=64,
        num_query_groups=8, kv_channels=64, max_position_embeddings=131072, rotary_base=150000.0,
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
        norm_epsilon=1e-5, add_qkv_bias=True, add_attention_output_bias=True, attention_sinks=True,
        tie_word_embeddings=False, num_moe_experts=experts, moe_router_topk=4, moe_ffn_hidden_size=2880,
        moe_norm_topk_prob=True, moe_router_bias=True, moe_expert_bias=True, activation="swiglu_clamped",
        sliding_window=128, layer_types=every_nth_full(layers, 2),
        architecture="gpt_oss", eos_token_id=200002,
    )


def _deepseek_v3(hidden, ffn, layers, heads, experts, topk, moe_ffn, shared, dense, scaling, vocab, **rest):
    """DeepSeek-V3's block (Moonlight, Kimi K2): multi-latent attention (kv latent 512, heads of
    128 + 64 rotated channels, v of 128), the first ``dense`` layers dense, then experts chosen
    by sigmoid score + correction bias, weighted by the renormalised scores x ``scaling``, and
    ``shared`` shared experts of ``moe_ffn``."""
    return dict(vocab_size=vocab, hidden_size=hidden, ffn_hidden_size=ffn, num_layers=layers,
                num_attention_heads=heads, multi_latent_attention=True, kv_lora_rank=512, qk_head_dim=128,
                qk_pos_emb_head_dim=64, v_head_dim=128, tie_word_embeddings=False,
                num_moe_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=moe_ffn, moe_norm_topk_prob=True,
                moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_dtype="fp32",
                moe_router_topk_scaling_factor=scaling, moe_shared_expert_intermediate_size=shared * moe_ffn,
                moe_layer_freq=[0] * dense + [1] * (layers - dense), architecture="deepseek_v3", **rest)


def _glm45(hidden, ffn, layers, experts, moe_ffn, dense, scaling, qk_norm):
    """GLM-4.5: GQA (96 heads of 128 over 8 KV heads, QKV bias, RoPE on half of each head) and
    DeepSeek-V3's experts (one shared, top-8, the first ``dense`` layers dense)."""
    return dict(vocab_size=151552, hidden_size=hidden, ffn_hidden_size=ffn, num_layers=layers, num_attention_heads=96,
                num_query_groups=8, kv_channels=128, rotary_percent=0.5, max_position_embeddings=131072,
                rotary_base=1000000.0, norm_epsilon=1e-5, add_qkv_bias=True, qk_layernorm=qk_norm,
                tie_word_embeddings=False, num_moe_experts=experts, moe_router_topk=8, moe_ffn_hidden_size=moe_ffn,
                moe_norm_topk_prob=True, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_dtype="fp32", moe_router_topk_scaling_factor=scaling, moe_shared_expert_intermediate_size=moe_ffn,
                moe_layer_freq=[0] * dense + [1] * (layers - dense), architecture="glm4_moe",
                eos_token_id=[151329, 151336, 151338])


PRESETS: dict[str, dict] = {
    # Small enough for CPU tests and the quickstart; byte-level vocabulary (256 bytes + specials).
    "tiny": dict(
        vocab_size=260, hidden_size=64, ffn_hidden_size=176, num_layers=2, num_attention_heads=4,
        num_query_groups=2, max_position_embeddings=2048, rotary_base=10000.0, norm_epsilon=1e-6,
        add_qkv_bias=True, tie_word_embeddings=True, architecture="qwen2",
        bos_token_id=256, eos_token_id=257,
    ),
    "qwen2.5-0.5b": _qwen25(896, 4864, 24, 14, 2, True),
    "qwen2.5-1.5b": _qwen25(1536, 8960, 28, 12, 2, True),
    "qwen2.5-7b": _qwen25(3584, 18944, 28, 28, 4, False, vocab=152064),
    "qwen2.5-32b": _qwen25(5120, 27648, 64, 40, 8, False, vocab=152064),
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, False),
    "qwen3-30b-a3b": _qwen3_moe(2048, 48, 32, 128, 768),
    "qwen3-235b-a22b": {**_qwen3_moe(4096, 94, 64, 128, 1536), "ffn_hidden_size": 12288},
    "qwen1.5-moe-a2.7b": _qwen2_moe(2048, 5632, 24, 16, 16, 60, 4, 1408, 5632, 8192),
    "qwen2-57b-a14b": _qwen2_moe(3584, 18944, 28, 28, 4, 64, 8, 2560, 20480, 32768),
    "llama3-8b": dict(
        vocab_size=128256, hidden_size=4096, ffn_hidden_size=14336, num_layers=32,
        num_attention_heads=32, num_query_groups=8, max_position_embeddings=8192,
        rotary_base=500000.0, norm_epsilon=1e-5, add_qkv_bias=False, tie_word_embeddings=False,
        architecture="llama", bos_token_id=128000, eos_token_id=128001,
    ),
    "mistral-7b": _mistral(4096, 32, 32768, 32768),  # v0.3
    "mistral-nemo-12b": {**_mistral(5120, 40, 131072, 1024000), "kv_channels": 128},
    "phi-4": dict(  # Phi3ForCausalLM: fused qkv / gate_up tensors in HF's checkpoint, full RoPE
        vocab_size=100352, hidden_size=5120, ffn_hidden_size=17920, num_layers=40, num_attention_heads=40,
        num_query_groups=10, max_position_embeddings=16384, rotary_base=250000.0, norm_epsilon=1e-5,
        add_qkv_bias=False, tie_word_embeddings=False, architecture="phi3", bos_token_id=100257,
        eos_token_id=100265,
    ),
    "gpt-oss-20b": _gpt_oss(24, 32),
    "gpt-oss-120b": _gpt_oss(36, 128),
    "gemma3-1b": dict(  # Gemma3ForCausalLM: five 512-token sliding layers per global one
        vocab_size=262144, hidden_size=1152, ffn_hidden_size=6912, num_layers=26, num_attention_heads=4,
        num_query_groups=1, kv_channels=256, max_position_embeddings=32768, rotary_base=1000000.0,
        norm_epsilon=1e-6, add_qkv_bias=False, qk_layernorm=True, norm_placement="sandwich",
        norm_weight_offset=1.0, norm_in_fp32=True, activation="geglu_tanh", embedding_multiplier=1152 ** 0.5,
        attention_softmax_scale=256 ** -0.5, sliding_window=512,
        layer_types=every_nth_full(26, 6),
        sliding_rope={"rotary_base": 10000.0, "rope_scaling": None}, tie_word_embeddings=True,
        architecture="gemma3", bos_token_id=2, eos_token_id=1,
    ),
    "gemma2-2b": _gemma2(2304, 9216, 26, 8, 4, 256, 256),
    "gemma2-9b": _gemma2(3584, 14336, 42, 16, 8, 256, 256),
    "gemma2-27b": _gemma2(4608, 36864, 46, 32, 16, 128, 144),  # query_pre_attn_scalar = hidden / heads
    "olmo2-7b": _olmo(2),
    "olmo3-7b": _olmo(3),
    # Moonshot's Moonlight-16B-A3B (Muon-trained, DeepSeek-V3's block), Kimi K2 and DeepSeek-V3
    "moonlight-16b-a3b": _deepseek_v3(2048, 11264, 27, 16, 64, 6, 1408, 2, 1, 2.446, 163840,
                                      max_position_embeddings=8192, rotary_base=50000.0, norm_epsilon=1e-5,
                                      bos_token_id=163584, eos_token_id=163585),
    "kimi-k2": _deepseek_v3(7168, 18432, 61, 64, 384, 8, 2048, 1, 1, 2.827, 163840, q_lora_rank=1536,
                            max_position_embeddings=131072, rotary_base=50000.0, norm_epsilon=1e-6,
                            rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                                          "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
                            bos_token_id=163584, eos_token_id=163585),
    "deepseek-v3": _deepseek_v3(7168, 18432, 61, 128, 256, 8, 2048, 1, 3, 2.5, 129280, q_lora_rank=1536,
                                moe_router_num_groups=8, moe_router_group_topk=4, max_position_embeddings=163840,
                                rotary_base=10000.0, norm_epsilon=1e-6,
                                rope_scaling={"rope_type": "yarn", "factor": 40.0,
                                              "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                                              "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
                                bos_token_id=0, eos_token_id=1),
    # DeepSeek-V2-Lite: V3's attention without the q latent; softmax-routed experts, not renormalised
    "deepseek-v2-lite": {**_deepseek_v3(2048, 10944, 27, 16, 64, 6, 1408, 2, 1, 1.0, 102400,
                                        max_position_embeddings=163840, rotary_base=10000.0, norm_epsilon=1e-6,
                                        rope_scaling={"rope_type": "yarn", "factor": 40.0,
                                                      "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                                                      "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707},
                                        bos_token_id=100000, eos_token_id=100001),
                         "moe_router_score_function": "softmax", "moe_router_enable_expert_bias": False,
                         "moe_norm_topk_prob": False, "moe_router_group_score_topk": 1, "architecture": "deepseek_v2"},
    "glm-4.5-air": _glm45(4096, 10944, 46, 128, 1408, 1, 1.0, False),
    "glm-4.5": _glm45(5120, 12288, 92, 160, 1536, 3, 2.5, True),
}


def preset(name: str, **overrides) -> GPTConfig:
    """A preset model shape, optionally with some fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"--model-preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})
