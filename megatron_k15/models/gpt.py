"""The Llama/Qwen2/Qwen3-family GPT with tensor, sequence and (stage-wise) pipeline parallelism.

    ids (b, s) -> embedding -> [TransformerLayer] x L -> RMSNorm -> output layer (vocab shard)

One module is one pipeline stage: the first stage owns the embedding, the last the final norm
and the output layer; a middle stage maps hidden states to hidden states. Parameter names use
global layer numbers (``layers.{i}.…``) so checkpoints reshard by name (``models/sharding.py``).

Outputs are vocab-parallel: ``forward(ids)`` returns this tp rank's logits shard
(b, s, V_padded / tp); ``forward(ids, labels=…)`` returns per-token log-probs (b, s) through
vocab-parallel cross-entropy, never gathering the full vocabulary.

Context parallelism (``cp_group`` with more than one rank, DESIGN.md section 4): the caller
passes this rank's zigzag shard of the tokens (``parallel.context.zigzag_split`` /
``zigzag_split_varlen``, packed batches with the *local* ``cu_seqlens``) and the original
position ids (RoPE uses them; derived from the zigzag layout when omitted). Attention runs as
ring attention over the cp group (``--cp-comm-type ring|allgather``); everything else is
token-wise, so sequence parallelism splits the local sequence over tp. Outputs (logits,
log-probs) are local: each cp rank returns its own tokens, and losses are partial sums to add
over cp (gradients are reduced over dp x cp by the optimizer).
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
import torch.distributed as dist
import torch.utils.checkpoint
from megatron.core import parallel_state
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_k15.models.attention import (
    context_parallel_attention,
    get_attention_backend,
    pad_head_dim,
    resolve_attention_backend,
)
from megatron_k15.models.config import GPTConfig
from megatron_k15.models.layers import ColumnLinear, Embedding, RMSNorm, TransformerLayer, normal_init
from megatron_k15.models.rope import RotaryEmbedding, with_longrope_choice
from megatron_k15.models.sharding import pipeline_layer_ranges
from megatron_k15.parallel.context import zigzag_position_ids
from megatron_k15.parallel.expert import gather_experts, own_experts
from megatron_k15.parallel.tensor import all_gather_last_dim, gather_from_sequence_parallel_region


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position of every token inside its own packed sequence: (1, total)."""
    idx = torch.arange(total, device=cu_seqlens.device)
    starts = cu_seqlens[torch.searchsorted(cu_seqlens, idx, right=True) - 1]
    return (idx - starts).unsqueeze(0)


def zigzag_positions_from_local_cu_seqlens(cu_seqlens: torch.Tensor, total: int, cp_size: int,
                                           cp_rank: int) -> torch.Tensor:
    """Original positions (1, total) of this rank's packed zigzag shard, from its *local*
    ``cu_seqlens`` (``zigzag_split_varlen``): local sequence i of 2 c_i tokens holds chunks
    ``cp_rank`` and ``2 cp - 1 - cp_rank`` (c_i tokens each) of its padded sequence."""
    cu = cu_seqlens.to(torch.int64)
    idx = torch.arange(total, device=cu.device)
    seq = torch.searchsorted(cu, idx, right=True) - 1
    offset = idx - cu[seq]
    c = (cu[1:] - cu[:-1])[seq] // 2
    first = offset < c
    pos = torch.where(first, cp_rank * c + offset, (2 * cp_size - 1 - cp_rank) * c + offset - c)
    return pos.unsqueeze(0)


class GPTModel(torch.nn.Module):
    def __init__(
        self,
        config: GPTConfig,
        *,
        tp_group: Optional[dist.ProcessGroup] = None,
        sequence_parallel: Optional[bool] = None,
        pp_rank: int = 0,
        pp_size: int = 1,
        layer_ranges: Optional[list[range]] = None,
        attention_backend: str = "auto",
        params_dtype: torch.dtype = torch.float32,
        recompute_granularity: Optional[str] = None,
        recompute_num_layers: Optional[int] = None,
        logprob_impl: str = "auto",
        device: Optional[torch.device] = None,
        cp_group: Optional[dist.ProcessGroup] = None,
        cp_comm_type: str = "ring",
        ep_group: Optional[dist.ProcessGroup] = None,
        moe_grouped_gemm: Optional[bool] = None,
        longrope_factors: str = "auto",
        max_sequence_length: Optional[int] = None,
    ):
        super().__init__()
        if tp_group is None:
            tp_group = parallel_state.get_tensor_model_parallel_group()
        tp = tp_group.size()
        config.validate(tp, pp_size)
        self.config = config
        self.tp_group = tp_group
        self.tp_size = tp
        self.tp_rank = tp_group.rank()
        self.sequence_parallel = (tp > 1) if sequence_parallel is None else (sequence_parallel and tp > 1)
        self.pre_process = pp_rank == 0
        self.post_process = pp_rank == pp_size - 1
        self.padded_vocab_size = config.padded_vocab_size(tp)
        self.vocab_per_rank = self.padded_vocab_size // tp
        ranges = layer_ranges or pipeline_layer_ranges(config.num_layers, pp_size)
        self.layer_range = ranges[pp_rank]

        mp_config = ModelParallelConfig(
            tensor_model_parallel_size=tp,
            sequence_parallel=False,  # SP communication is done by our layers (device-neutral)
            use_cpu_initialization=device is None or torch.device(device).type == "cpu",
            # on GPU, our reset_parameters (layout-independent) or a checkpoint sets every weight;
            # megatron-core's own init would draw them first through an RNG tracker that only a
            # seeded process has (generate.py's is not: "model-parallel-rng is not added"). On CPU
            # its init is kept: a model built without either still has sane random weights
            perform_initialization=device is None or torch.device(device).type == "cpu",
            params_dtype=params_dtype,
            gradient_accumulation_fusion=False,
        )
        self.mp_config = mp_config
        # context parallelism: only with an explicit cp group (callers that do not zigzag-split
        # their batches, e.g. generation, build the model without one)
        self.cp_group = cp_group
        self.cp_size = 1 if cp_group is None else dist.get_world_size(cp_group)
        self.cp_rank = 0 if cp_group is None else dist.get_rank(cp_group)
        self.cp_comm_type = cp_comm_type
        # expert parallelism (parallel/expert.py): this rank holds E / ep of every MoE layer's experts
        self.ep_group = ep_group if ep_group is not None and dist.get_world_size(ep_group) > 1 else None
        self.ep_size = 1 if self.ep_group is None else dist.get_world_size(self.ep_group)
        self.ep_rank = 0 if self.ep_group is None else dist.get_rank(self.ep_group)
        if self.ep_size > 1 and not config.is_moe:
            raise ValueError(f"--expert-model-parallel-size {self.ep_size} needs a mixture-of-experts model "
                             "(--num-experts)")
        # the single-device backend; generation prefills with it even under cp (the engine runs
        # whole sequences on every cp rank)
        self.local_attention_backend = resolve_attention_backend(attention_backend, config.head_dim)
        if (self.local_attention_backend == "triton" or self.cp_size > 1) and config.head_dim > 256:
            raise ValueError(f"head_dim {config.head_dim}: our Triton flash attention (--attention-backend triton, "
                             "and context parallelism's ring attention) takes head sizes up to 256; "
                             "use --attention-backend sdpa without --context-parallel-size")
        # other head sizes than powers of two are zero-padded to the next one for our kernels
        if self.cp_size > 1:
            attention_fn = pad_head_dim(context_parallel_attention(cp_group, cp_comm_type), config.head_dim)
            self.attention_backend = f"ring-{cp_comm_type}"
        else:
            attention_fn = get_attention_backend(self.local_attention_backend, config.head_dim)
            self.attention_backend = self.local_attention_backend
        init = normal_init(config.init_method_std)

        tied = config.tie_word_embeddings
        if self.pre_process or (tied and self.post_process):
            self.embedding = Embedding(
                self.padded_vocab_size, config.hidden_size, mp_config=mp_config, init_method=init,
                tp_group=tp_group, sequence_parallel=self.sequence_parallel,
            )
            if not self.pre_process:
                # the last stage's copy of the tied embedding: synced with the first stage's,
                # counted once in the grad norm
                self.embedding.weight.tied_copy = True
        self.pp_size = pp_size
        if recompute_granularity not in (None, "full", "selective"):
            raise ValueError(f"--recompute-granularity must be full or selective, got {recompute_granularity!r}")
        self.recompute_granularity = recompute_granularity
        # full recompute of only the first N layers of this stage (Megatron-LM's block method);
        # None: every layer
        self.recompute_num_layers = recompute_num_layers
        if logprob_impl not in ("auto", "ce", "fused"):
            raise ValueError(f"--logprob-impl must be auto, ce or fused, got {logprob_impl!r}")
        # auto: the fused kernel (never materialises [tokens, vocab] logits) on GPU; on CPU the
        # vocab-parallel cross-entropy, which is faster there
        self.logprob_impl = ("fused" if torch.cuda.is_available() else "ce") if logprob_impl == "auto" else logprob_impl
        # LongRoPE's list of factors is fixed for the run (rope.py): by the longest sequence it
        # will see (``max_sequence_length``), or as --longrope-factors says
        def run_scaling(scaling):
            return with_longrope_choice(scaling, longrope_factors, max_sequence_length)

        scaling = run_scaling(config.rope_scaling)
        self.rotary = RotaryEmbedding(config.rotary_dim, config.rotary_base, scaling)
        self.longrope_factors = (scaling or {}).get("factors")  # None: no LongRoPE
        # the sliding layers' own RoPE, where it differs (OLMo 3: unscaled)
        self.rotary_sliding = None
        if config.sliding_rope is not None and config.has_sliding_layers:
            theta, scaling = config.rope_for_layer(next(i for i in range(config.num_layers) if config.is_sliding_layer(i)))
            self.rotary_sliding = RotaryEmbedding(config.rotary_dim, theta, run_scaling(scaling))
        self.layers = torch.nn.ModuleDict({
            str(i): TransformerLayer(config, mp_config, tp_group, self.sequence_parallel, attention_fn,
                                     cp_group if self.cp_size > 1 else None, self.ep_group, layer_number=i)
            for i in self.layer_range
        })
        # MoE experts: one grouped-GEMM launch per projection; None (auto): on CUDA tensors,
        # where the kernels compile (decided per call: a model built on CPU may move), the
        # per-expert loop on CPU (faster than anything interpreted)
        self.moe_grouped_gemm = moe_grouped_gemm if config.is_moe else None
        for m in self.moe_layers():
            m.grouped_gemm = self.moe_grouped_gemm
        if self.post_process:
            self.final_layernorm = RMSNorm(
                config.hidden_size, config.norm_epsilon, self.sequence_parallel, params_dtype,
                weight_in_fp32=config.norm_in_fp32, offset=config.norm_weight_offset,
            )
            self.output_layer = ColumnLinear(
                config.hidden_size, self.padded_vocab_size, mp_config=mp_config, init_method=init,
                bias=False, tp_group=tp_group, sequence_parallel=self.sequence_parallel,
                skip_weight_param_allocation=tied,
            )
        if device is not None:
            self.to(device)

    @property
    def tied_embedding_name(self) -> Optional[str]:
        """The parameter shared by the first and last pipeline stage, if any."""
        if self.config.tie_word_embeddings and self.pp_size > 1 and hasattr(self, "embedding"):
            return "embedding.weight"
        return None

    @torch.no_grad()
    def reset_parameters(self, seed: int) -> None:
        """Initialise every parameter from its global name and the seed, independent of the
        tp/pp layout: the full tensor is drawn, then this rank's shard is kept.

        normal(0, std) for matrices (std / sqrt(2 L) for the output projections of attention
        and MLP, as in Megatron), ones for norms, zeros for biases."""
        from megatron_k15.models.hf_mapping import expected_shape
        from megatron_k15.models.sharding import VOCAB_PARAMS, pad_vocab, split_tensor

        cfg = self.config
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("_norm_all_heads.weight"):
                p.fill_(1.0 - cfg.norm_weight_offset)  # a scale of 1
                continue
            if name.endswith(".bias") or name.endswith(".sinks"):
                p.zero_()
                continue
            std = cfg.init_method_std
            if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
                std = std / math.sqrt(2.0 * cfg.num_layers)
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
            full = torch.randn(expected_shape(name, cfg), generator=gen) * std
            if name in VOCAB_PARAMS:
                full = pad_vocab(full, self.padded_vocab_size)
            p.copy_(self.own_experts(name, split_tensor(full, name, self.tp_size, self.tp_rank)).to(p.dtype))

    # -- pieces -------------------------------------------------------------------------
    def output_weight(self) -> torch.Tensor:
        """(V_padded / tp, h): this rank's rows of the output projection."""
        if self.config.tie_word_embeddings:
            return self.embedding.weight
        return self.output_layer.weight

    def hidden_states(self, input_ids=None, position_ids=None, cu_seqlens=None, max_seqlen=None,
                      hidden=None, inference=None, token_mask=None) -> torch.Tensor:
        """Run this stage's layers. Returns [s, b, h] (s / tp of it under sequence parallelism),
        after the final norm on the last stage. Under context parallelism ``s`` is this cp
        rank's local length and ``position_ids`` the original positions of its tokens.
        ``inference`` (generation): a ``generation.inference_batch.InferenceBatch`` whose
        ``layer(j)`` is the KV cache of this stage's j-th layer. ``token_mask`` (b, s): 0 on
        padding, left out of the MoE load-balancing loss."""
        if self.pre_process:
            if input_ids is None:
                raise ValueError("the first pipeline stage needs input_ids")
            b, s = input_ids.shape
            hidden = self.embedding(input_ids)
            if self.config.embedding_multiplier != 1.0:  # Gemma: x sqrt(hidden), rounded to the dtype
                hidden = hidden * torch.tensor(self.config.embedding_multiplier, dtype=hidden.dtype)
        else:
            if hidden is None:
                raise ValueError("a later pipeline stage needs the previous stage's hidden states")
            s = hidden.shape[0] * (self.tp_size if self.sequence_parallel else 1)
            b = hidden.shape[1]
        if self.sequence_parallel and s % self.tp_size:
            raise ValueError(
                f"sequence length {s} must be a multiple of --tensor-model-parallel-size "
                f"{self.tp_size} under sequence parallelism (pad the batch)"
            )
        device = hidden.device
        if self.cp_size > 1 and s % 2 and inference is None:
            raise ValueError(
                f"the local sequence length {s} must be even under context parallelism (two zigzag "
                "chunks per rank; see parallel.context.zigzag_split)")
        if inference is not None and position_ids is None:
            raise ValueError("generation passes the position ids of its packed tokens")
        if position_ids is None and self.cp_size > 1:
            if cu_seqlens is not None:
                position_ids = zigzag_positions_from_local_cu_seqlens(
                    cu_seqlens.to(device), s, self.cp_size, self.cp_rank)
            else:
                position_ids = zigzag_position_ids(s * self.cp_size, self.cp_size, self.cp_rank,
                                                   device=device).unsqueeze(0).expand(b, s)
        elif position_ids is None:
            if cu_seqlens is not None:
                position_ids = positions_from_cu_seqlens(cu_seqlens.to(device), s)
            else:
                position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
        cos_full, sin_full = self.rotary(position_ids.to(device), hidden.dtype)
        rope_sliding = (None if self.rotary_sliding is None
                        else self.rotary_sliding(position_ids.to(device), hidden.dtype))
        recompute = self.recompute_granularity if (self.training and torch.is_grad_enabled()) else None
        for j, (i, layer) in enumerate(zip(self.layer_range, self.layers.values())):
            cos, sin = (rope_sliding if rope_sliding is not None and self.config.is_sliding_layer(i)
                        else (cos_full, sin_full))
            if inference is not None:
                hidden = layer(hidden, cos, sin, cu_seqlens, max_seqlen, kv_cache=inference.layer(j))
            elif recompute == "full" and (self.recompute_num_layers is None or j < self.recompute_num_layers):
                # keep only each layer's input; recompute the layer in backward
                hidden = torch.utils.checkpoint.checkpoint(
                    layer, hidden, cos, sin, cu_seqlens, max_seqlen, token_mask=token_mask, use_reentrant=False)
            else:
                hidden = layer(hidden, cos, sin, cu_seqlens, max_seqlen, recompute_attention=recompute == "selective",
                               token_mask=token_mask)
        if self.post_process:
            hidden = self.final_layernorm(hidden)
        return hidden

    def _mask_padded_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits of padding rows (ids >= vocab_size) are -inf so they never get probability."""
        start = self.tp_rank * self.vocab_per_rank
        n_valid = self.config.vocab_size - start
        if n_valid >= self.vocab_per_rank:
            return logits
        keep = torch.arange(self.vocab_per_rank, device=logits.device) < n_valid
        return logits.masked_fill(~keep, float("-inf"))

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma 2's final soft cap, cap * tanh(logits / cap) (before padding ids are masked)."""
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap else logits

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden [s(/tp), b, h] -> this rank's logits shard (b, s, V_padded / tp)."""
        logits = self._softcap(self.output_layer(hidden, weight=self.output_weight()))
        return self._mask_padded_vocab(logits).transpose(0, 1)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits (…, vocab_size) from vocab shards (inference and tests)."""
        full = all_gather_last_dim(logits, self.tp_group) if self.tp_size > 1 else logits
        return full[..., : self.config.vocab_size]

    def token_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """log p(labels) (b, s) in fp32: the fused kernel or vocab-parallel cross-entropy."""
        if self.logprob_impl == "fused":
            return self._fused_token_logprobs(hidden, labels)
        logits = self.output_layer(hidden, weight=self.output_weight())  # [s, b, V/tp]
        logits = self._mask_padded_vocab(self._softcap(logits.float()))
        loss = vocab_parallel_cross_entropy(logits, labels.transpose(0, 1).contiguous())
        return -loss.transpose(0, 1)

    def _fused_token_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Chunked hidden @ W^T with an online logsumexp (kernels/fused_logprobs.py). Padding rows
        of the vocabulary are cut off this rank's weight, so they get no probability. Under SP
        the sequence gather's backward already sums d_hidden over tp, so the kernel must not."""
        from megatron_k15.kernels.fused_logprobs import fused_logprobs

        full = gather_from_sequence_parallel_region(hidden, self.tp_group) if self.sequence_parallel else hidden
        s, b, h = full.shape
        start = self.tp_rank * self.vocab_per_rank
        n_valid = min(self.vocab_per_rank, self.config.vocab_size - start)
        if n_valid <= 0:
            raise NotImplementedError("a tp rank holding only vocabulary padding; lower "
                                      "--make-vocab-size-divisible-by or use --logprob-impl ce")
        logp = fused_logprobs(
            full.transpose(0, 1).reshape(b * s, h), self.output_weight()[:n_valid], labels.reshape(-1),
            tp_group=self.tp_group if self.tp_size > 1 else None,
            reduce_hidden_grad=not self.sequence_parallel, vocab_start=start,
            softcap=self.config.final_logit_softcapping or 0.0,
        )
        return logp.view(b, s)

    # -- the forward the trainer and generator use ----------------------------------------
    def forward(self, input_ids=None, position_ids=None, labels=None, cu_seqlens=None,
                max_seqlen=None, hidden=None, token_mask=None):
        hidden = self.hidden_states(input_ids, position_ids, cu_seqlens, max_seqlen, hidden, token_mask=token_mask)
        if not self.post_process:
            return hidden
        if labels is not None:
            return self.token_logprobs(hidden, labels)
        return self.logits_from_hidden(hidden)

    def last_token_logits(self, input_ids, last_index, position_ids=None) -> torch.Tensor:
        """Full-vocab logits (b, vocab_size) at position ``last_index[i]`` of each row; only those
        rows go through the output layer (used by generation)."""
        if self.cp_size > 1:
            raise NotImplementedError("last_token_logits (generation) does not support context "
                                      "parallelism; use generation.engine.GenerationEngine")
        hidden = self.hidden_states(input_ids, position_ids)
        return self.logits_at(hidden, last_index, torch.arange(hidden.shape[1], device=hidden.device))

    def local_logits_at(self, hidden: torch.Tensor, seq_index: torch.Tensor,
                        batch_index: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary shard of the logits, (n, padded_vocab / tp) for global ids
        tp_rank * vocab_per_rank + j (padding ids >= vocab_size not masked), of the final
        hidden states [s(/tp), b, h] at (seq_index[i], batch_index[i]): what vocab-parallel
        sampling needs, with no gather of the vocabulary."""
        if self.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, self.tp_group)
        rows = hidden[seq_index, batch_index]  # (n, h)
        logits = torch.nn.functional.linear(rows, self.output_weight())
        # a soft cap in fp32, as the training log-probs take it (bf16 logits capped in bf16 would
        # move a sampled token's log-prob by up to ~0.05 from what training computes)
        return self._softcap(logits.float()) if self.config.final_logit_softcapping else logits

    def logits_at(self, hidden: torch.Tensor, seq_index: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """Full-vocab logits (n, vocab_size) of the final hidden states [s(/tp), b, h] at
        (seq_index[i], batch_index[i]); only those rows go through the output layer."""
        logits = self.local_logits_at(hidden, seq_index, batch_index)
        return self.gather_logits(self._mask_padded_vocab(logits))

    # -- mixture of experts ----------------------------------------------------------------
    def moe_layers(self) -> list:
        from megatron_k15.models.layers import MoEMLP

        return [m for m in self.modules() if isinstance(m, MoEMLP)]

    def set_moe_aux_loss(self, coeff: float, scale: float = 1.0) -> None:
        """The load-balancing loss weight of every MoE layer, and the step's scale of it
        (1 / microbatches, so the step adds coeff x the mean over microbatches; times the fp16
        loss scale, as the gradient enters backward apart from the loss)."""
        for m in self.moe_layers():
            m.aux_loss_coeff, m.aux_loss_scale = coeff, scale

    def take_moe_aux_losses(self) -> list[float]:
        """The unscaled load-balancing losses recorded since the last call (one per MoE layer
        of this stage and training forward)."""
        values = []
        for m in self.moe_layers():
            values += m.aux_losses
            m.aux_losses = []
        return torch.stack(values).tolist() if values else []  # one device sync

    def count_expert_tokens(self, on: bool) -> None:
        """Whether MoE layers count the real tokens routed to each expert in training forwards
        (for ``update_expert_bias``)."""
        for m in self.moe_layers():
            m.count_tokens = on

    @torch.no_grad()
    def update_expert_bias(self, rate: float, group=None) -> float:
        """DeepSeek-V3's aux-loss-free balancing after a step: the loads counted since the last
        update are summed over ``group`` (the data x context ranks: tp ranks route the same
        tokens) and each expert's bias moves by rate * sign(mean load - load), so an overloaded
        expert is chosen less often. The counts restart; counting stops until switched on.
        Returns the most loaded expert's tokens over the mean, the largest of this stage's
        layers (1: balanced; 0 without layers or tokens)."""
        layers = [m for m in self.moe_layers() if hasattr(m.router, "expert_bias")]
        if not layers:
            return 0.0
        bias = layers[0].router.expert_bias
        loads = torch.stack([bias.new_zeros(m.num_experts) if m.tokens_per_expert is None
                             else m.tokens_per_expert.to(bias.device) for m in layers])
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(loads, group=group)
        for m, load in zip(layers, loads):
            m.router.expert_bias.add_(rate * torch.sign(load.mean() - load))
            m.tokens_per_expert = None
        self.count_expert_tokens(False)
        mean = loads.mean(dim=1)
        return float(torch.where(mean > 0, loads.amax(dim=1) / mean.clamp(min=1e-9), 0.0).max())

    def serve_experts(self) -> None:
        """Every MoE layer of this stage, in order, serves the other ranks of the ep group one
        forward's tokens without any of its own (``MoEMLP.serve_experts``)."""
        for m in self.moe_layers():
            m.serve_experts()

    # -- state dict in checkpoint naming ------------------------------------------------
    def checkpoint_state_dict(self, all_experts: bool = False) -> dict[str, torch.Tensor]:
        """This rank's parameters by checkpoint name; ``all_experts`` (a collective over the ep
        group) gathers every layer's E experts to the CPU, as checkpoints store them (any ep
        loads them), one layer's tensor at a time on the device."""
        state = {
            k: v for k, v in self.state_dict().items()
            if not k.endswith("_extra_state") and not k.startswith("rotary.")
        }
        return gather_experts(state, self.ep_group, to_cpu=True) if all_experts else state

    def own_experts(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``parallel.expert.own_experts`` for this model's ep rank."""
        return own_experts(name, tensor, self.config.num_moe_experts // self.ep_size, self.ep_size, self.ep_rank)

    def load_checkpoint_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.checkpoint_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, tensor in own.items():
                src = self.own_experts(name, state[name])
                if tuple(src.shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: checkpoint shape {tuple(src.shape)} != model shape {tuple(tensor.shape)}")
                tensor.copy_(src.to(tensor.dtype))
