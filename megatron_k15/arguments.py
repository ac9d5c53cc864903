"""Megatron-LM style command-line flags, parsed and validated in one place.

Entry points build their parser with ``build_parser(extra_args_provider)`` and call
``parse_args``; every inconsistent combination fails here, before any work, with a message
that names the flag and what to change. The model shape comes from (later wins):
``--model-preset`` < explicit shape flags; with ``--load`` the checkpoint's recorded config is
used and an explicit shape flag that contradicts it is an error.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Optional, Sequence

from megatron_k15.checkpointing import add_checkpoint_switches, check_checkpoint_switches, start_fresh_if_nothing_saved
from megatron_k15.data.tokenizer import add_trust_remote_code_arg, allow_remote_code
from megatron_k15.exit_conditions import add_exit_args, check_exit_args
from megatron_k15.initialize import DEFAULT_TIMEOUT_MINUTES
from megatron_k15.manual_gc import add_manual_gc_args, check_manual_gc_args
from megatron_k15.models.config import PRESETS, ConfigError, GPTConfig, every_nth_full, preset
from megatron_k15.profiling import add_profile_args, check_profile_args
from megatron_k15.wandb_logging import add_wandb_args, check_wandb_args

# flag -> GPTConfig field, for the model-shape flags (default None = "not given")
MODEL_FLAGS = {
    "num_experts": "num_moe_experts",
    "moe_router_topk": "moe_router_topk",
    "moe_ffn_hidden_size": "moe_ffn_hidden_size",
    "moe_router_score_function": "moe_router_score_function",
    "moe_router_num_groups": "moe_router_num_groups",
    "moe_router_group_topk": "moe_router_group_topk",
    "moe_router_topk_scaling_factor": "moe_router_topk_scaling_factor",
    "moe_shared_expert_intermediate_size": "moe_shared_expert_intermediate_size",
    "moe_layer_freq": "moe_layer_freq",
    "moe_router_dtype": "moe_router_dtype",
    "q_lora_rank": "q_lora_rank",
    "kv_lora_rank": "kv_lora_rank",
    "qk_head_dim": "qk_head_dim",
    "qk_pos_emb_head_dim": "qk_pos_emb_head_dim",
    "v_head_dim": "v_head_dim",
    "num_layers": "num_layers",
    "hidden_size": "hidden_size",
    "ffn_hidden_size": "ffn_hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_query_groups",
    "kv_channels": "kv_channels",
    "vocab_size": "vocab_size",
    "max_position_embeddings": "max_position_embeddings",
    "rotary_base": "rotary_base",
    "rotary_percent": "rotary_percent",
    "norm_epsilon": "norm_epsilon",
    "make_vocab_size_divisible_by": "make_vocab_size_divisible_by",
    "init_method_std": "init_method_std",
}


class ArgumentError(ValueError):
    """An invalid flag combination; the message names the flag."""


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


# Megatron-LM switches that describe what this model always is (or a fusion it does not
# have), so a Megatron-LM launch script for a Llama/Qwen model runs with its flags unchanged.
MEGATRON_MODEL_SWITCHES = {
    "--group-query-attention": "GQA follows --num-query-groups",
    "--swiglu": "the MLP is always SwiGLU",
    "--disable-bias-linear": "linear layers have no bias (only --add-qkv-bias adds one)",
    "--use-rotary-position-embeddings": "RoPE is always used",
    "--use-flash-attn": "attention is flash-style in every backend (--attention-backend)",
    "--no-masked-softmax-fusion": "no such fusion here",
    "--no-bias-swiglu-fusion": "no such fusion here",
    "--no-bias-dropout-fusion": "no such fusion here",
    "--no-rope-fusion": "no such fusion here",
    "--use-mcore-models": "the model is always this codebase's",
    "--attention-softmax-in-fp32": "the softmax always accumulates in fp32",
    "--no-position-embedding": "there is no learned position embedding (RoPE only)",
}
MEGATRON_LOGGING_SWITCHES = {
    "--log-throughput": "model TFLOP/s per GPU is always logged (tflops_per_gpu; MFU on known GPUs)",
    "--log-timers-to-tensorboard": "the iteration's time (and RL's per-phase times) are always logged",
    "--log-validation-ppl-to-tensorboard": "valid_loss is logged with --valid-data or --split (perplexity = "
                                           "exp of it)",
    "--log-memory-to-tensorboard": "peak memory is always logged (peak_memory_bytes)",
    "--log-world-size-to-tensorboard": "the layout is printed at start and kept in every checkpoint",
    "--use-checkpoint-args": "the model shape always comes from --load's checkpoint; with this switch a "
                             "contradicting shape flag is ignored with a warning instead of refused",
}
MEGATRON_TRAINING_SWITCHES = {
    "--use-distributed-optimizer": "the optimizer is always ZeRO-1 sharded over data parallelism",
    "--overlap-grad-reduce": "gradient reduction always overlaps backward",
    "--overlap-param-gather": "the updated parameters are all-gathered right after the optimizer step "
                              "(not overlapped with the next forward)",
    "--no-gradient-accumulation-fusion": "no such fusion here",
    "--check-for-nan-in-loss-and-grad": "a non-finite gradient always stops train_sft (with --fp16 once the loss "
                                        "scale cannot back off) and is skipped and counted by train_rl",
    "--cross-entropy-loss-fusion": "on GPU the loss is always the fused hidden-states-to-log-prob kernel "
                                   "(--logprob-impl)",
    "--calculate-per-token-loss": "the SFT loss is always the mean over every response token of the global "
                                  "batch (not a mean of microbatch means)",
    "--no-mmap-bin-files": "indexed datasets are always memory-mapped",
    "--no-async-tensor-model-parallel-allreduce": "tensor-parallel all-reduces are megatron-core's layers' own",
    "--tp-comm-overlap": "transformer-engine's communication overlap is not used (its flag is accepted so a "
                         "launch script runs)",
}


# Megatron-LM's --attention-backend values -> the implementation here computing the same attention
MEGATRON_ATTENTION_BACKENDS = {"flash": "triton", "fused": "sdpa", "unfused": "sdpa", "local": "sdpa"}


def _window_size(text: str) -> int:
    """Megatron-LM's --window-size "LEFT,RIGHT" (or "(LEFT, RIGHT)") -> LEFT."""
    parts = [x.strip() for x in text.strip().strip("()").split(",")]
    try:
        left, right = (int(x) for x in parts) if len(parts) == 2 else (int(parts[0]), 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT integers, got {text!r}") from None
    if left < 0:
        raise argparse.ArgumentTypeError(f"LEFT must be >= 0 keys, got {left}")
    if right not in (0, -1):
        raise argparse.ArgumentTypeError(f"RIGHT must be 0 (causal attention sees no later keys), got {right}")
    return left


def moe_layer_freq(text: str):
    """Megatron-LM's --moe-layer-freq: N (every N-th layer is MoE) or a 0/1 list per layer,
    written as a list or a sum of repeated lists ("[0]*3+[1]*58"); parsed, never evaluated."""
    import ast

    def value(node):
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.List):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError

    try:
        out = value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"expected N or a 0/1 list such as [0]*3+[1]*58, got {text!r}") from None
    if isinstance(out, list) and any(v not in (0, 1) for v in out):
        raise argparse.ArgumentTypeError(f"a --moe-layer-freq list holds 0 (dense) and 1 (MoE), got {out}")
    return out


def layer_pattern_fields(args, num_layers: int) -> dict:
    """The config fields --window-size / --window-attn-skip-freq and --no-rope-freq set ({}
    without them)."""
    left, freq = _get(args, "window_size"), _get(args, "window_attn_skip_freq")
    nope = _get(args, "no_rope_freq")
    out = {}
    if nope is not None:  # Megatron-LM's: RoPE on N - 1 layers, then one without (SmolLM3: 4)
        if nope < 1:
            raise ArgumentError(f"--no-rope-freq must be >= 1, got {nope}")
        out["nope_layers"] = [i for i in range(num_layers) if (i + 1) % nope == 0] or None
    if left is None:
        if freq is not None:
            raise ArgumentError("--window-attn-skip-freq needs --window-size (the window of the other layers)")
        return out
    if freq is not None and freq < 1:
        raise ArgumentError(f"--window-attn-skip-freq must be >= 1, got {freq}")
    types = None if freq is None else every_nth_full(num_layers, freq)
    return {**out, "sliding_window": left + 1, "layer_types": types}


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model-preset", choices=sorted(PRESETS), default=None,
                   help="start from a preset shape (default: tiny, unless --load gives one)")
    for dest, kind in [("num_layers", int), ("hidden_size", int), ("ffn_hidden_size", int),
                       ("num_attention_heads", int), ("num_query_groups", int), ("kv_channels", int),
                       ("vocab_size", int), ("max_position_embeddings", int), ("rotary_base", float),
                       ("norm_epsilon", float), ("make_vocab_size_divisible_by", int),
                       ("init_method_std", float), ("num_experts", int), ("moe_router_topk", int),
                       ("moe_ffn_hidden_size", int)]:
        g.add_argument(_flag(dest), type=kind, default=None)
    g.add_argument("--longrope-factors", choices=["auto", "short", "long"], default="auto",
                   help="LongRoPE models (Phi-3.5-mini, Phi-4-mini): the list of per-frequency factors this run "
                        "rotates every sequence with; auto: long when the run's sequences may exceed the "
                        "pretraining context (original_max_position_embeddings; judged by --seq-length, RL's "
                        "longest prompt + --rollout-max-tokens, generate's / evaluate's longest prompt + "
                        "--max-new-tokens, or else the model's whole context), short otherwise")
    g.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default=None,
                   help="router scores: softmax over the experts (Qwen3-MoE) or a sigmoid per expert "
                        "(DeepSeek-V3, Moonlight, Kimi K2, GLM-4.5)")
    g.add_argument("--moe-router-dtype", choices=["fp32"], default=None,
                   help="the router's GEMM and scores in fp32 whatever the parameters' dtype (DeepSeek's and "
                        "GLM-4.5's routers; their presets and checkpoints set it)")
    g.add_argument("--moe-shared-expert-gate", action="store_true", default=None,
                   help="scale the shared expert's output by sigmoid(x . g), g learned (Qwen2-MoE)")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true", default=None,
                   help="a per-expert bias added to the scores only to choose the experts (DeepSeek-V3's "
                        "aux-loss-free balancing; the checkpoint's e_score_correction_bias)")
    g.add_argument("--moe-router-bias-update-rate", type=float, default=0.0,
                   help="after each step the expert bias moves by this much towards balance: + rate for "
                        "experts under the mean load, - rate above it (DeepSeek-V3: 1e-3 in pre-training); "
                        "0 (default) keeps the checkpoint's bias")
    for dest, kind, why in (
            ("moe_router_num_groups", int, "experts split into this many groups; tokens choose among the "
                                           "best --moe-router-group-topk groups (DeepSeek-V3: 8)"),
            ("moe_router_group_topk", int, "groups a token's experts may come from (DeepSeek-V3: 4)"),
            ("moe_router_topk_scaling_factor", float, "the routed experts' weights are multiplied by this "
                                                      "(DeepSeek's routed_scaling_factor)"),
            ("moe_shared_expert_intermediate_size", int, "ffn size of an expert every token passes (DeepSeek: "
                                                         "n_shared_experts x --moe-ffn-hidden-size)"),
            ("q_lora_rank", int, "multi-latent attention: q comes up from a latent of this size (unset: from x)"),
            ("kv_lora_rank", int, "multi-latent attention: K and V come up from a latent of this size"),
            ("qk_head_dim", int, "multi-latent attention: a head's q/k channels without position"),
            ("qk_pos_emb_head_dim", int, "multi-latent attention: a head's rotated q/k channels"),
            ("v_head_dim", int, "multi-latent attention: a head's v channels")):
        g.add_argument(_flag(dest), type=kind, default=None, help=why)
    g.add_argument("--moe-layer-freq", type=moe_layer_freq, default=None,
                   help="which layers are MoE: N (every N-th from the first) or a 0/1 list such as "
                        "[0]*1+[1]*26 (DeepSeek's first dense layers); the dense ones use --ffn-hidden-size")
    g.add_argument("--multi-latent-attention", action="store_true", default=None,
                   help="DeepSeek-V2/V3's multi-latent attention (--q-lora-rank, --kv-lora-rank, "
                        "--qk-head-dim, --qk-pos-emb-head-dim, --v-head-dim)")
    g.add_argument("--moe-router-pre-softmax", action="store_true", default=None,
                   help="Megatron-LM's: the top-k experts' weights are their softmax probabilities over "
                        "all experts, not renormalised over the k (Qwen3-MoE's norm_topk_prob false); "
                        "a model built from --num-experts renormalises otherwise")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0,
                   help="weight of the MoE load-balancing loss (Switch/GShard, per layer, mean over "
                        "microbatches; Qwen3-MoE trained with 0.001); 0 = off")
    gg = g.add_mutually_exclusive_group()
    gg.add_argument("--moe-grouped-gemm", dest="moe_grouped_gemm", action="store_true", default=None,
                    help="MoE experts as one grouped-GEMM launch per projection (our Triton kernel: no "
                         "per-expert loop, no host sync of the routing); the default on GPU")
    gg.add_argument("--no-moe-grouped-gemm", dest="moe_grouped_gemm", action="store_false",
                    help="MoE experts as a loop of one GEMM pair per expert (the default on CPU)")
    for flag, why in MEGATRON_MODEL_SWITCHES.items():
        g.add_argument(flag, action="store_true", help=f"accepted for Megatron-LM scripts: {why}")
    g.add_argument("--position-embedding-type", choices=["rope"], default="rope",
                   help="accepted for Megatron-LM scripts: RoPE is the only position embedding")
    g.add_argument("--normalization", choices=["RMSNorm"], default="RMSNorm",
                   help="accepted for Megatron-LM scripts: RMSNorm is the only normalization")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default="local",
                   help="accepted for Megatron-LM scripts: the layers are always ours")
    g.add_argument("--rotary-percent", type=float, default=None,
                   help="RoPE rotates this fraction of each head's channels, the first ones (GLM-4: 0.5; "
                        "default 1.0)")
    g.add_argument("--attention-dropout", type=float, default=0.0, help="must be 0 (no dropout)")
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="must be 0 (no dropout)")
    g.add_argument("--add-qkv-bias", action="store_true", default=None)
    g.add_argument("--qk-layernorm", action="store_true", default=None,
                   help="RMSNorm over each head's query and key before RoPE (Qwen3)")
    g.add_argument("--window-size", type=_window_size, default=None, metavar="LEFT,RIGHT",
                   help="Megatron-LM's sliding-window attention: each query sees the LEFT keys before it "
                        "and itself (RIGHT must be 0: causal); Hugging Face's sliding_window = LEFT + 1")
    g.add_argument("--no-rope-freq", type=int, default=None, metavar="N",
                   help="Megatron-LM's: every N-th layer (N, 2N, ...) has no position embedding (NoPE; "
                        "SmolLM3: 4), the others RoPE")
    g.add_argument("--window-attn-skip-freq", type=int, default=None, metavar="N",
                   help="with --window-size: every N-th layer attends to everything (OLMo 3: 4); "
                        "default: every layer slides")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--seq-length", type=int, default=None, help="training/packing sequence length")
    g.add_argument("--logprob-impl", choices=["auto", "fused", "ce"], default="auto",
                   help="per-token log-probs: fused Triton kernel (auto on GPU) or vocab-parallel CE")
    g.add_argument("--attention-backend", choices=["auto", "triton", "sdpa", *MEGATRON_ATTENTION_BACKENDS],
                   default="auto",
                   help="auto = our Triton flash attention on GPU, PyTorch SDPA on CPU; Megatron-LM's "
                        "names are accepted: flash = triton, fused / unfused / local = sdpa")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--cp-comm-type", choices=["ring", "allgather"], default="ring")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="expert parallelism: every MoE layer's experts split over this many of the "
                        "data x context parallel ranks, tokens sent to them by all-to-all (each expert "
                        "still split over --tensor-model-parallel-size); divides --num-experts and dp x cp")
    sp = g.add_mutually_exclusive_group()
    sp.add_argument("--no-sequence-parallel", dest="sequence_parallel", action="store_false",
                    help="sequence parallelism is on whenever tp > 1; this turns it off")
    sp.add_argument("--sequence-parallel", dest="sequence_parallel", action="store_true", default=True,
                    help="accepted for Megatron-LM scripts: on by default here")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl with GPUs, gloo without")
    g.add_argument("--distributed-timeout-minutes", type=float, default=DEFAULT_TIMEOUT_MINUTES,
                   help="how long a collective may wait for the slowest rank before the run aborts; RL ranks "
                        "that finish their rollouts wait for the others' (raise it for very long segments)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)


def add_precision_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("precision")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters/activations (GPU)")
    g.add_argument("--fp16", action="store_true",
                   help="fp16 parameters/activations (GPU) with loss scaling (dynamic unless --loss-scale)")
    g.add_argument("--loss-scale", type=float, default=None,
                   help="--fp16: a constant loss scale (a power of two) instead of the dynamic one")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32,
                   help="--fp16: the dynamic loss scale's start")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="--fp16: the dynamic loss scale's floor")
    g.add_argument("--loss-scale-window", type=int, default=1000,
                   help="--fp16: clean steps before the dynamic loss scale doubles")
    g.add_argument("--hysteresis", type=int, default=2,
                   help="--fp16: overflowing steps before the dynamic loss scale halves")
    acc = g.add_mutually_exclusive_group()
    acc.add_argument("--accumulate-allreduce-grads-in-fp32", dest="accumulate_allreduce_grads_in_fp32",
                     action="store_true", default=True,
                     help="Megatron-LM's: gradients of 16-bit parameters accumulate over microbatches, "
                          "and are reduced, in fp32 buffers (the default here, as Megatron forces for bf16)")
    acc.add_argument("--no-accumulate-allreduce-grads-in-fp32", dest="accumulate_allreduce_grads_in_fp32",
                     action="store_false",
                     help="16-bit gradient buffers (half the gradient memory; each microbatch's gradient "
                          "is added in bf16/fp16, the reduction still sums in fp32)")


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None,
                   help="Megatron-LM's sample-based length: --train-iters = N // --global-batch-size; the "
                        "schedule then takes --lr-warmup-samples / --lr-decay-samples / --lr-wsd-decay-samples")
    g.add_argument("--lr-warmup-samples", type=int, default=None, help="with --train-samples: warm-up length")
    g.add_argument("--lr-decay-samples", type=int, default=None,
                   help="with --train-samples: decay length (default: --train-samples)")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None,
                   help="with --train-samples: WSD's decay phase")
    g.add_argument("--dataloader-type", choices=["single", "cyclic"], default=None,
                   help="accepted for Megatron-LM scripts: samples are drawn in a seeded shuffle, epoch after "
                        "epoch (as cyclic), resumed exactly from the checkpoint's position")
    g.add_argument("--empty-unused-memory-level", type=int, choices=[0, 1, 2], default=0,
                   help="accepted for Megatron-LM scripts: the caching allocator is left alone")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="refused: the 1F1B schedule here is not interleaved")
    g.add_argument("--main-grads-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="gradients are reduced and accumulated in fp32 (bf16 is refused)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="accepted for Megatron-LM scripts: samples are read from memory-mapped indexed "
                        "datasets in the training process (no loader workers)")
    g.add_argument("--data-cache-path", default=None,
                   help="accepted for Megatron-LM scripts: blend and packing indices are built in memory at "
                        "start (nothing is cached)")
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None, metavar=("START", "INCR", "SAMPLES"),
                   help="refused: the global batch is constant here")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0,
                   help="Megatron-LM's: the warm-up rises linearly from this lr to --lr")
    g.add_argument("--optimizer", choices=["adam"], default="adam",
                   help="Megatron-LM's: AdamW (decoupled --weight-decay), the only optimizer here")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm-up over this fraction of --lr-decay-iters (instead of --lr-warmup-iters)")
    g.add_argument("--lr-decay-style", choices=["constant", "cosine", "linear", "inverse-square-root", "WSD"],
                   default="cosine", help="WSD: warmup-stable-decay, constant until the last "
                                          "--lr-wsd-decay-iters of --lr-decay-iters")
    g.add_argument("--lr-wsd-decay-style", choices=["exponential", "linear", "cosine", "minus_sqrt"],
                   default=None, help="WSD's decay shape (default exponential)")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None,
                   help="WSD: iterations of the decay phase, which ends at --lr-decay-iters")
    g.add_argument("--lr-decay-iters", type=int, default=None,
                   help="iterations over which the lr decays to --min-lr (default: --train-iters); "
                        "it stays at --min-lr after them")
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--adam-impl", choices=["auto", "apex", "fused", "unfused"], default="auto",
                   help="AdamW kernel: apex's multi-tensor Adam (CUDA, when installed), PyTorch's fused "
                        "AdamW, or plain elementwise ops; auto: the first available in that order")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with --recompute-granularity full: uniform (the default) recomputes every "
                        "layer on its own; block recomputes only the first --recompute-num-layers "
                        "layers of each pipeline stage and keeps the others' activations (faster "
                        "where memory allows; tools/plan_memory.py shows what fits)")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="block: layers recomputed per stage; uniform: must be 1")
    for flag, why in MEGATRON_TRAINING_SWITCHES.items():
        g.add_argument(flag, action="store_true", help=f"accepted for Megatron-LM scripts: {why}")
    add_wandb_args(g)
    add_exit_args(g)
    add_manual_gc_args(g)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--log-params-norm", action="store_true",
                   help="log the L2 norm of all weights (params_norm) with each logged iteration")
    g.add_argument("--log-num-zeros-in-grad", action="store_true",
                   help="log how many gradient elements are exactly 0 (num_zeros_in_grad: parameters the step "
                        "does not reach, e.g. unused embedding rows or experts)")
    add_profile_args(p)


def add_inference_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference (generation engine)")
    g.add_argument("--inference-engine", choices=["paged", "recompute"], default="paged",
                   help="paged: KV-cached engine with continuous batching; recompute: the O(n^2) "
                        "reference generator (no cache)")
    g.add_argument("--kv-cache-block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--kv-cache-memory-fraction", type=float, default=0.5,
                   help="GPU: fraction of the free memory given to the KV cache (allocated once)")
    g.add_argument("--max-prefill-tokens", type=int, default=16384,
                   help="most prompt tokens prefilled in one engine step")


def add_reasoning_tags_arg(g) -> None:
    """``--reasoning-tags`` for the commands that grade responses (train_rl, evaluate)."""
    g.add_argument("--reasoning-tags", default="auto",
                   help="grade only the answer after a reasoning block: auto = <think>,</think>; "
                        "harmony = gpt-oss's final channel after its analysis channel; "
                        "OPEN,CLOSE for other tags; none = grade the whole response. A response "
                        "that ends inside its reasoning scores 0 (megatron_k15/rewards/reasoning.py)")


def check_reasoning_tags(args) -> None:
    from megatron_k15.rewards.reasoning import parse_reasoning_tags

    try:
        parse_reasoning_tags(args.reasoning_tags)
    except ValueError as e:
        raise ArgumentError(str(e)) from None


def add_grading_args(g) -> None:
    """The flags of the commands that grade responses (train_rl, evaluate): ``--reasoning-tags``
    and ``--reward-workers``."""
    add_reasoning_tags_arg(g)
    g.add_argument("--reward-workers", type=int, default=1,
                   help="threads grading this rank's responses (ranks split them already): sandboxed "
                        "code tests run in parallel, e.g. 8")


def check_grading_args(args) -> None:
    check_reasoning_tags(args)
    if args.reward_workers < 1:
        raise ArgumentError(f"--reward-workers must be >= 1, got {args.reward_workers}")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None, help="directory to save checkpoints to")
    g.add_argument("--load", default=None, help="checkpoint directory to load (with its config)")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--save-retain-interval", type=int, default=None,
                   help="after each save keep only the newest checkpoint and those at multiples of this "
                        "(a multiple of --save-interval); older ones are deleted")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background: a save stalls training only to copy the "
                        "shard to host memory (which it then holds twice while writing); the checkpoint "
                        "becomes current once every rank has written it")
    g.add_argument("--finetune", action="store_true", help="with --load: weights only, iteration 0")
    add_checkpoint_switches(g)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--tensorboard-queue-size", type=int, default=None,
                   help="accepted for Megatron-LM scripts: scalars are flushed at every record")
    g.add_argument("--timing-log-level", type=int, choices=[0, 1, 2], default=None,
                   help="accepted for Megatron-LM scripts: the iteration's time (RL: per phase) is always "
                        "logged; --profile gives kernel-level timings")
    g.add_argument("--log-interval", type=int, default=1,
                   help="iterations per console line; train_sft also merges their metrics into one record "
                        "(Megatron-LM's averaging), train_rl records every iteration (each is a rollout batch)")
    g.add_argument("--tensorboard-log-interval", type=int, default=None,
                   help="iterations per record in metrics.jsonl / TensorBoard / W&B (train_sft: merged over "
                        "them; default: --log-interval for train_sft, 1 for train_rl), so curves can be "
                        "finer than the console")
    g.add_argument("--tokenizer", default=None, help="'byte' or an HF tokenizer path (default: the checkpoint's)")
    add_trust_remote_code_arg(g)
    g.add_argument("--tokenizer-type", default=None,
                   help="accepted for Megatron-LM scripts: HuggingFaceTokenizer (with --tokenizer-model)")
    g.add_argument("--tokenizer-model", default=None, help="Megatron-LM's name for --tokenizer PATH")
    for flag, why in MEGATRON_LOGGING_SWITCHES.items():
        g.add_argument(flag, action="store_true", help=f"accepted for Megatron-LM scripts: {why}")
    g.add_argument("--ckpt-format", choices=["torch_dist", "torch"], default=None,
                   help="accepted for Megatron-LM scripts: checkpoints are always this project's sharded "
                        "format, which loads at any tp/pp as torch_dist does (Megatron-LM checkpoints "
                        "themselves go through Hugging Face: tools/checkpoint/convert_hf_to_megatron.py)")


def build_parser(description: str = "megatron_k15",
                 extra_args_provider: Optional[Callable[[argparse.ArgumentParser], None]] = None,
                 groups: Sequence[str] = ("model", "parallel", "precision", "training", "checkpoint"),
                 ) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    adders = {"model": add_model_args, "parallel": add_parallel_args, "precision": add_precision_args,
              "training": add_training_args, "checkpoint": add_checkpoint_args,
              "inference": add_inference_args}
    for name in groups:
        adders[name](p)
    if extra_args_provider is not None:
        extra_args_provider(p)
    return p


def _get(args, name, default=None):
    return getattr(args, name, default)


# config field -> the switch that sets it (value flags are MODEL_FLAGS)
MODEL_SWITCHES = {"add_qkv_bias": "--add-qkv-bias", "qk_layernorm": "--qk-layernorm",
                  "tie_word_embeddings": "--untie-embeddings-and-output-weights",
                  "moe_norm_topk_prob": "--moe-router-pre-softmax",
                  "moe_router_enable_expert_bias": "--moe-router-enable-expert-bias",
                  "moe_shared_expert_gate": "--moe-shared-expert-gate",
                  "multi_latent_attention": "--multi-latent-attention"}


def explicit_model_fields(args) -> dict:
    """The model-config fields the command line sets explicitly (value flags and switches;
    Megatron-LM's ``--disable-bias-linear`` without ``--add-qkv-bias`` means no QKV bias)."""
    explicit = {field: _get(args, dest) for dest, field in MODEL_FLAGS.items() if _get(args, dest) is not None}
    for switch in ("add_qkv_bias", "qk_layernorm", "moe_router_enable_expert_bias", "moe_shared_expert_gate",
                   "multi_latent_attention"):
        if _get(args, switch):
            explicit[switch] = True
    if _get(args, "disable_bias_linear") and not _get(args, "add_qkv_bias"):
        explicit["add_qkv_bias"] = False
    if _get(args, "untie_embeddings_and_output_weights"):
        explicit["tie_word_embeddings"] = False
    if _get(args, "moe_router_pre_softmax"):
        explicit["moe_norm_topk_prob"] = False
    return explicit


def apply_model_overrides(cfg: GPTConfig, explicit: dict) -> GPTConfig:
    """Explicit flags over a preset or an HF config. The head size follows a changed hidden
    size or head count when the base has it coupled (hidden / heads) and --kv-channels is not
    given (Qwen3's decoupled 128 stays); a changed vocabulary drops the base's BOS/EOS ids
    (they name tokens of another vocabulary); the HF class follows the switches (QK-norm:
    Qwen3; a Qwen2 base without QKV bias: Llama; a Llama base with it: Qwen2), so every
    flag-built model exports."""
    changed = {f for f, v in explicit.items() if getattr(cfg, f) != v}
    if explicit.get("num_moe_experts") and not cfg.is_moe and "moe_norm_topk_prob" not in explicit:
        explicit = {**explicit, "moe_norm_topk_prob": True}  # Megatron-LM's default router renormalises
    coupled = cfg.kv_channels == cfg.hidden_size // cfg.num_attention_heads
    if coupled and changed & {"hidden_size", "num_attention_heads"} and "kv_channels" not in explicit:
        cfg.kv_channels = None
    if "vocab_size" in changed:
        cfg.bos_token_id = cfg.eos_token_id = None
    for field, value in explicit.items():
        setattr(cfg, field, value)
    qwen2_moe = cfg.is_moe and cfg.moe_shared_expert_gate and cfg.moe_router_score_function == "softmax" and not (
        cfg.multi_latent_attention or cfg.moe_router_num_groups or cfg.moe_router_topk_scaling_factor)
    deepseek_moe = cfg.is_moe and not qwen2_moe and (
        cfg.moe_router_score_function == "sigmoid" or cfg.moe_shared_expert_intermediate_size)
    if qwen2_moe:  # a gated shared expert next to softmax-routed ones: Qwen2-MoE's class
        cfg.architecture = "qwen2_moe"
    if cfg.multi_latent_attention:  # V2's router: softmax scores without a bias
        v2 = cfg.is_moe and cfg.moe_router_score_function == "softmax" and not cfg.moe_router_enable_expert_bias
        cfg.architecture = "deepseek_v2" if v2 else "deepseek_v3"
        cfg.moe_router_group_score_topk = 1 if v2 else 2  # their rules for a group's score
    elif deepseek_moe:  # DeepSeek's experts behind GQA attention: GLM-4.5's class
        cfg.architecture = "glm4_moe"
    if (cfg.multi_latent_attention or deepseek_moe) and cfg.is_moe and "moe_router_dtype" not in explicit:
        cfg.moe_router_dtype = "fp32"  # these classes route in fp32 (transformers keeps their gate fp32)
    elif cfg.qk_layernorm and cfg.qk_layernorm_scope == "head":
        cfg.architecture = "qwen3_moe" if cfg.num_moe_experts else "qwen3"
    elif cfg.architecture == "qwen2" and not cfg.add_qkv_bias:
        cfg.architecture = "llama"
    elif cfg.architecture == "llama" and cfg.add_qkv_bias and not cfg.add_attention_output_bias:
        cfg.architecture = "qwen2"  # (Llama's attention_bias would bias o_proj too)
    cfg.__post_init__()
    return cfg


def resolve_model_config(args) -> GPTConfig:
    """The model config from the checkpoint (--load), the preset and the explicit flags."""
    explicit = explicit_model_fields(args)
    load = _get(args, "load")
    if load:
        from megatron_k15.checkpointing import CheckpointError, load_config

        try:
            cfg = load_config(load, step=_get(args, "ckpt_step"))
        except (CheckpointError, OSError) as e:
            raise ArgumentError(str(e)) from None
        if _get(args, "model_preset"):
            raise ArgumentError("--model-preset conflicts with --load: the checkpoint records its model shape")
        for field, value in explicit.items():
            if field in ("make_vocab_size_divisible_by", "init_method_std"):
                setattr(cfg, field, value)
            elif getattr(cfg, field) != value:
                flag = (MODEL_SWITCHES[field] if field in MODEL_SWITCHES
                        else _flag(next(d for d, f in MODEL_FLAGS.items() if f == field)) + f" {value}")
                if _get(args, "use_checkpoint_args"):  # Megatron-LM's meaning: the checkpoint wins
                    import sys

                    print(f"warning: {flag} ignored: --use-checkpoint-args takes {field}={getattr(cfg, field)} "
                          f"from --load {load}", file=sys.stderr)
                    continue
                raise ArgumentError(
                    f"{flag} contradicts the checkpoint in --load {load} "
                    f"({field}={getattr(cfg, field)}); drop the flag (or add --use-checkpoint-args to let "
                    "the checkpoint win)"
                )
        window = layer_pattern_fields(args, cfg.num_layers)
        if window and any(getattr(cfg, f) != v for f, v in window.items()) and not _get(args, "use_checkpoint_args"):
            raise ArgumentError(
                f"--window-size / --window-attn-skip-freq / --no-rope-freq contradict the checkpoint in --load "
                f"{load} (sliding_window={cfg.sliding_window}, layer_types={cfg.layer_types}, nope_layers="
                f"{cfg.nope_layers}); drop them")
        return cfg
    cfg = apply_model_overrides(preset(_get(args, "model_preset") or "tiny"), explicit)
    for field, value in layer_pattern_fields(args, cfg.num_layers).items():
        setattr(cfg, field, value)
    return cfg


def megatron_settings_problem(args) -> Optional[str]:
    """A Megatron-LM setting this model cannot honour (dropout, partial RoPE, ...), or None."""
    block = _get(args, "recompute_method") == "block"
    for dest, required, why in (("attention_dropout", 0.0, "the model has no dropout"),
                                ("hidden_dropout", 0.0, "the model has no dropout"),
                                ("main_grads_dtype", "fp32", "gradients are reduced and accumulated in fp32"),
                                ("recompute_num_layers", None if block else 1,
                                 "uniform recompute checkpoints each layer; use --recompute-method block")):
        value = _get(args, dest)
        if value is not None and required is not None and value != required:
            return f"{_flag(dest)} {value} is not supported ({why}); drop it or use {required}"
    if _get(args, "num_layers_per_virtual_pipeline_stage") is not None:
        return ("--num-layers-per-virtual-pipeline-stage is not supported (the 1F1B schedule here is not "
                "interleaved); drop it")
    if _get(args, "recompute_method") and _get(args, "recompute_granularity") != "full":
        return "--recompute-method applies to --recompute-granularity full"
    if block and (_get(args, "recompute_num_layers") is None or args.recompute_num_layers < 0):
        return "--recompute-method block needs --recompute-num-layers N >= 0 (layers recomputed per stage)"
    return None


def check_tokenizer_flags(args) -> None:
    """Megatron-LM's ``--tokenizer-type HuggingFaceTokenizer --tokenizer-model PATH`` is our
    ``--tokenizer PATH``."""
    kind, model = _get(args, "tokenizer_type"), _get(args, "tokenizer_model")
    if kind not in (None, "HuggingFaceTokenizer"):
        raise ArgumentError(f"--tokenizer-type {kind} is not supported: tokenizers here are Hugging Face's "
                            "(--tokenizer-type HuggingFaceTokenizer --tokenizer-model PATH, or --tokenizer PATH) "
                            "or the built-in --tokenizer byte")
    if model is not None:
        if _get(args, "tokenizer") not in (None, model):
            raise ArgumentError(f"--tokenizer-model {model} and --tokenizer {args.tokenizer} disagree; give one")
        args.tokenizer = model
    elif kind is not None and _get(args, "tokenizer") is None:
        raise ArgumentError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model PATH")


def check_loss_scale_args(args) -> Optional[str]:
    """Loss scaling is fp16's; its flags elsewhere are a mistake worth naming."""
    fp16 = bool(_get(args, "fp16"))
    if _get(args, "loss_scale") is not None:
        if not fp16:
            return "--loss-scale applies to --fp16 training only (bf16 and fp32 need no loss scaling); drop it"
        if not _get(args, "loss_scale") > 0:
            return f"--loss-scale must be > 0, got {_get(args, 'loss_scale')}"
    initial, floor = _get(args, "initial_loss_scale", 2.0 ** 32), _get(args, "min_loss_scale", 1.0)
    if initial is not None and floor is not None and not 0 < floor <= initial:
        return (f"--min-loss-scale {floor} must be > 0 and <= --initial-loss-scale {initial}; "
                f"lower --min-loss-scale or raise --initial-loss-scale")
    for flag in ("loss_scale_window", "hysteresis"):
        value = _get(args, flag)
        if value is not None and value < 1:
            return f"{_flag(flag)} must be >= 1, got {value}"
    return None


def validate_args(args, world_size: Optional[int] = None) -> None:
    """Raise ArgumentError for any combination that cannot work. Fills ``args.model_config``,
    ``args.data_parallel_size`` and ``args.params_dtype``."""
    import torch

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    allow_remote_code(bool(_get(args, "trust_remote_code")))  # (cleared without the flag, as in preprocess_data)
    tp = _get(args, "tensor_model_parallel_size", 1)
    pp = _get(args, "pipeline_model_parallel_size", 1)
    cp = _get(args, "context_parallel_size", 1)
    for dest, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp)):
        if value < 1:
            raise ArgumentError(f"{_flag(dest)} must be >= 1, got {value}")
    if world_size % (tp * pp * cp):
        raise ArgumentError(
            f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp}; launch a multiple "
            f"of {tp * pp * cp} processes or change the sizes"
        )
    dp = world_size // (tp * pp * cp)
    args.data_parallel_size = dp
    ep = _get(args, "expert_model_parallel_size", 1)
    ep = 1 if ep is None else ep
    if ep < 1:
        raise ArgumentError(f"--expert-model-parallel-size must be >= 1, got {ep}")
    if (dp * cp) % ep:
        raise ArgumentError(
            f"--expert-model-parallel-size {ep} must divide the data x context parallel size {dp * cp} "
            f"(world size {world_size} / (--tensor-model-parallel-size {tp} x --pipeline-model-parallel-size "
            f"{pp})); experts are split over ranks that hold different data")
    if _get(args, "bf16") and _get(args, "fp16"):
        raise ArgumentError("--bf16 and --fp16 are mutually exclusive; pick one")
    args.params_dtype = torch.bfloat16 if _get(args, "bf16") else torch.float16 if _get(args, "fp16") else torch.float32
    problem = check_loss_scale_args(args)
    if problem:
        raise ArgumentError(problem)
    block = _get(args, "kv_cache_block_size")
    if block is not None and block < 1:
        raise ArgumentError(f"--kv-cache-block-size must be >= 1, got {block}")
    frac = _get(args, "kv_cache_memory_fraction")
    if frac is not None and not 0.0 < frac <= 1.0:
        raise ArgumentError(f"--kv-cache-memory-fraction must be in (0, 1], got {frac}")
    prefill = _get(args, "max_prefill_tokens")
    if prefill is not None and prefill < 1:
        raise ArgumentError(f"--max-prefill-tokens must be >= 1, got {prefill}")
    problem = (megatron_settings_problem(args) or check_wandb_args(args) or check_exit_args(args)
               or check_profile_args(args, world_size) or check_checkpoint_switches(args)
               or check_manual_gc_args(args))
    if problem:
        raise ArgumentError(problem)
    timeout = _get(args, "distributed_timeout_minutes")
    if timeout is not None and not timeout > 0:
        raise ArgumentError(f"--distributed-timeout-minutes must be > 0, got {timeout}")
    backend = _get(args, "distributed_backend")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ArgumentError("--distributed-backend nccl needs GPUs and this process sees none; use gloo "
                            "(or leave the flag out)")
    if backend == "gloo" and torch.cuda.is_available():
        raise ArgumentError("--distributed-backend gloo on GPUs: the model's tensors live on the GPU, and "
                            "gloo cannot reduce-scatter or send them; use nccl (or leave the flag out)")
    check_tokenizer_flags(args)
    start_fresh_if_nothing_saved(args)
    if _get(args, "finetune") and not _get(args, "load"):
        raise ArgumentError("--finetune needs --load DIR (the weights to start from)")
    load = _get(args, "load")
    if load and not os.path.exists(load):
        raise ArgumentError(f"--load {load}: directory does not exist")
    backend = _get(args, "attention_backend")
    if backend in MEGATRON_ATTENTION_BACKENDS:
        args.attention_backend = MEGATRON_ATTENTION_BACKENDS[backend]
    kernel_flags = [flag for flag, on in (("--attention-backend triton", _get(args, "attention_backend") == "triton"),
                                          (f"--context-parallel-size {cp}", cp > 1)) if on]
    if kernel_flags:  # what runs our Triton attention kernels
        try:
            import triton  # noqa: F401
        except ImportError:
            raise ArgumentError(f"{' and '.join(kernel_flags)} need(s) the triton package; use "
                                "--attention-backend sdpa and --context-parallel-size 1") from None
        from megatron_k15.kernels.interpreter import interpreting

        if not torch.cuda.is_available() and not interpreting():
            raise ArgumentError(
                f"{' and '.join(kernel_flags)}: our Triton attention kernels need a GPU, and this process "
                "sees none; on CPU run them under Triton's interpreter (TRITON_INTERPRET=1 in the "
                "environment: slow, for tests) or use --attention-backend sdpa and --context-parallel-size 1")

    try:
        cfg = resolve_model_config(args)
        cfg.validate(tp, pp)
    except ConfigError as e:
        raise ArgumentError(str(e)) from None
    args.model_config = cfg
    if _get(args, "longrope_factors", "auto") != "auto" and (cfg.rope_scaling or {}).get("rope_type") != "longrope":
        raise ArgumentError(f"--longrope-factors {args.longrope_factors} applies to models with LongRoPE (rope_type "
                            "longrope: Phi-3.5-mini, Phi-4-mini); this one has none: drop the flag")
    if cp > 1 and cfg.attn_logit_softcapping:
        raise ArgumentError(f"--context-parallel-size {cp}: ring attention does not soft-cap scores "
                            f"(attn_logit_softcapping={cfg.attn_logit_softcapping}, Gemma 2); use "
                            "--context-parallel-size 1")
    if not cfg.is_moe:
        for dest in ("moe_router_topk", "moe_ffn_hidden_size", "moe_router_pre_softmax", "moe_grouped_gemm",
                     "moe_router_score_function", "moe_router_enable_expert_bias", "moe_router_num_groups",
                     "moe_router_group_topk", "moe_router_topk_scaling_factor",
                     "moe_shared_expert_intermediate_size", "moe_layer_freq", "moe_router_dtype",
                     "moe_shared_expert_gate"):
            if _get(args, dest) is not None:
                raise ArgumentError(f"{_flag(dest)} applies to mixture-of-experts models; add --num-experts N "
                                    "(this model is dense)")
    if ep > 1 and not cfg.is_moe:
        raise ArgumentError(f"--expert-model-parallel-size {ep} applies to mixture-of-experts models "
                            "(--num-experts); this model is dense")
    if ep > 1 and _get(args, "inference_engine") == "recompute":
        raise ArgumentError(f"--inference-engine recompute does not run expert parallelism "
                            f"(--expert-model-parallel-size {ep}); use --inference-engine paged")
    if ep > 1 and cfg.num_moe_experts % ep:
        raise ArgumentError(f"--expert-model-parallel-size {ep} must divide --num-experts {cfg.num_moe_experts}")
    rate = _get(args, "moe_router_bias_update_rate") or 0.0
    if rate < 0 or (rate > 0 and not cfg.moe_router_enable_expert_bias):
        raise ArgumentError(f"--moe-router-bias-update-rate {rate} must be >= 0 and needs a router with an expert "
                            "bias (--moe-router-enable-expert-bias, or a DeepSeek-V3 / GLM-4.5 checkpoint)")
    if not cfg.multi_latent_attention:
        for dest in ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim"):
            if _get(args, dest) is not None:
                raise ArgumentError(f"{_flag(dest)} applies to multi-latent attention; add --multi-latent-attention")
    aux = _get(args, "moe_aux_loss_coeff") or 0.0
    if aux < 0:
        raise ArgumentError(f"--moe-aux-loss-coeff must be >= 0, got {aux}")
    if aux > 0 and not cfg.is_moe:
        raise ArgumentError(f"--moe-aux-loss-coeff {aux} applies to mixture-of-experts models (--num-experts); "
                            "this model is dense")

    seq = _get(args, "seq_length")
    if seq is not None:
        if seq < 1:
            raise ArgumentError(f"--seq-length must be >= 1, got {seq}")
        if seq > cfg.max_position_embeddings:
            raise ArgumentError(
                f"--seq-length {seq} exceeds --max-position-embeddings {cfg.max_position_embeddings}; "
                "raise --max-position-embeddings or shorten --seq-length"
            )
        if cp > 1 and seq % (2 * cp):
            raise ArgumentError(
                f"--seq-length {seq} must be a multiple of 2 x --context-parallel-size ({2 * cp}) "
                "for the zigzag split"
            )
        if tp > 1 and _get(args, "sequence_parallel", True) and seq % tp:
            raise ArgumentError(
                f"--seq-length {seq} must be a multiple of --tensor-model-parallel-size {tp} under "
                "sequence parallelism (or pass --no-sequence-parallel)"
            )
    first = _get(args, "decoder_first_pipeline_num_layers")
    last = _get(args, "decoder_last_pipeline_num_layers")
    if (first is not None or last is not None) and pp > 1:
        from megatron_k15.models.sharding import pipeline_layer_ranges

        try:
            pipeline_layer_ranges(cfg.num_layers, pp, first, last)
        except ValueError as e:
            raise ArgumentError(f"--decoder-first/last-pipeline-num-layers: {e}") from None

    mbs = _get(args, "micro_batch_size")
    if mbs is not None and mbs < 1:
        raise ArgumentError(f"--micro-batch-size must be >= 1, got {mbs}")
    gbs = _get(args, "global_batch_size")
    if gbs is not None and mbs is not None and gbs % (mbs * dp):
        raise ArgumentError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x data-parallel "
            f"size {dp}; use a multiple of {mbs * dp}"
        )
    _samples_to_iterations(args, gbs if gbs is not None else (mbs or 1) * dp)
    warmup_fraction, decay_iters = _get(args, "lr_warmup_fraction"), _get(args, "lr_decay_iters")
    if warmup_fraction is not None:
        if not 0.0 <= warmup_fraction <= 1.0:
            raise ArgumentError(f"--lr-warmup-fraction must be in [0, 1], got {warmup_fraction}")
        if _get(args, "lr_warmup_iters"):
            raise ArgumentError("--lr-warmup-fraction and --lr-warmup-iters both set the warm-up; give one")
    if decay_iters is not None and decay_iters < 1:
        raise ArgumentError(f"--lr-decay-iters must be >= 1, got {decay_iters}")
    _check_wsd_args(args)
    lr, min_lr = _get(args, "lr"), _get(args, "min_lr")
    if lr is not None and lr < 0:
        raise ArgumentError(f"--lr must be >= 0, got {lr}")
    if lr is not None and min_lr is not None and min_lr > lr:
        raise ArgumentError(f"--min-lr {min_lr} is larger than --lr {lr}")
    for dest in ("log_interval", "tensorboard_log_interval"):
        value = _get(args, dest)
        if value is not None and value < 1:
            raise ArgumentError(f"{_flag(dest)} must be >= 1, got {value}")
    save_interval = _get(args, "save_interval")
    if save_interval is not None and save_interval < 1:
        raise ArgumentError(f"--save-interval must be >= 1, got {save_interval}")
    if save_interval is not None and not _get(args, "save"):
        raise ArgumentError("--save-interval needs --save DIR")
    if _get(args, "async_save") and not _get(args, "save"):
        raise ArgumentError("--async-save needs --save DIR")
    retain = _get(args, "save_retain_interval")
    if retain is not None:
        if retain < 1:
            raise ArgumentError(f"--save-retain-interval must be >= 1, got {retain}")
        if not _get(args, "save"):
            raise ArgumentError("--save-retain-interval needs --save DIR")
        if save_interval and retain % save_interval:
            raise ArgumentError(f"--save-retain-interval {retain} is not a multiple of --save-interval "
                                f"{save_interval}: only iterations that are multiples of both would be kept; "
                                f"use a multiple of {save_interval}")


SAMPLE_FLAGS = {"lr_warmup_samples": "lr_warmup_iters", "lr_decay_samples": "lr_decay_iters",
                "lr_wsd_decay_samples": "lr_wsd_decay_iters"}


def _samples_to_iterations(args, gbs: int) -> None:
    """Megatron-LM's sample-based flags as iterations of ``gbs`` samples: --train-iters =
    --train-samples // gbs; the schedule's lengths may end mid-iteration (fractional
    iterations: the lr is then the one at that many samples)."""
    if _get(args, "rampup_batch_size") is not None:
        raise ArgumentError("--rampup-batch-size is not supported: the global batch is constant; drop it (or "
                            "train a first stage at the smaller --global-batch-size and --load it)")
    samples = _get(args, "train_samples")
    given = [dest for dest in SAMPLE_FLAGS if _get(args, dest) is not None]
    if samples is None:
        if given:
            raise ArgumentError(f"{_flag(given[0])} needs --train-samples (with --train-iters use "
                                f"{_flag(SAMPLE_FLAGS[given[0]])})")
        return
    if _get(args, "train_iters") is not None:
        raise ArgumentError("--train-samples and --train-iters both set the length; give one")
    if samples < gbs:
        raise ArgumentError(f"--train-samples {samples} is less than one global batch ({gbs} samples)")
    for dest, iters_dest in SAMPLE_FLAGS.items():  # Megatron-LM: a schedule in samples, or none
        if _get(args, iters_dest) not in (None, 0):
            raise ArgumentError(f"{_flag(iters_dest)} counts iterations; with --train-samples give {_flag(dest)}")
    if _get(args, "lr_warmup_samples") and _get(args, "lr_warmup_fraction") is not None:
        raise ArgumentError("--lr-warmup-fraction and --lr-warmup-samples both set the warm-up; give one")
    args.train_iters = samples // gbs
    for dest, iters_dest in SAMPLE_FLAGS.items():
        value = _get(args, dest)
        if value is None:
            continue
        if value < 0 or (value < gbs and dest != "lr_warmup_samples"):
            raise ArgumentError(f"{_flag(dest)} {value} is less than one global batch ({gbs} samples)")
        setattr(args, iters_dest, value / gbs)
    if _get(args, "lr_decay_samples") is None:  # Megatron-LM: decay over all the samples
        args.lr_decay_iters = samples / gbs


def _check_wsd_args(args) -> None:
    """WSD needs its decay length, inside the iterations after warm-up; its flags need WSD."""
    style, wsd_iters = _get(args, "lr_decay_style"), _get(args, "lr_wsd_decay_iters")
    if style != "WSD":
        for dest in ("lr_wsd_decay_iters", "lr_wsd_decay_style"):
            if _get(args, dest) is not None:
                raise ArgumentError(f"--{dest.replace('_', '-')} applies to --lr-decay-style WSD; add it or drop "
                                    "the flag")
        return
    if wsd_iters is None:
        raise ArgumentError("--lr-decay-style WSD needs --lr-wsd-decay-iters N (the decay phase's length)")
    if wsd_iters < 1:
        raise ArgumentError(f"--lr-wsd-decay-iters must be >= 1, got {wsd_iters}")
    decay = _get(args, "lr_decay_iters") or _get(args, "train_iters")
    fraction = _get(args, "lr_warmup_fraction")
    if decay is not None:
        warmup = int(round(fraction * decay)) if fraction is not None else (_get(args, "lr_warmup_iters") or 0)
        if wsd_iters > decay - warmup:
            raise ArgumentError(f"--lr-wsd-decay-iters {wsd_iters} is longer than the {decay - warmup} iterations "
                                f"between warm-up ({warmup}) and the end of the decay ({decay}); use at most "
                                f"{decay - warmup}")


def parse_args(argv: Optional[Sequence[str]] = None, description: str = "megatron_k15",
               extra_args_provider=None, extra_validation=None, groups=None, world_size=None):
    """Parse and validate; on a bad combination print ``error: <message>`` and exit 2."""
    kwargs = {"groups": groups} if groups is not None else {}
    parser = build_parser(description, extra_args_provider, **kwargs)
    args = parser.parse_args(argv)
    try:
        validate_args(args, world_size)
        if extra_validation is not None:
            extra_validation(args)
    except ArgumentError as e:
        parser.error(str(e))
    return args
