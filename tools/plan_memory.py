#!/usr/bin/env python
"""Memory per GPU of training and rollout for a model, a parallel layout and a workload.

    python tools/plan_memory.py --model-preset qwen2.5-7b --bf16 --seq-length 131072 \\
        --micro-batch-size 1 --tensor-model-parallel-size 4 --context-parallel-size 2 \\
        --world-size 8 --recompute-granularity full --logprob-impl fused --gpu-memory-gb 80
    python tools/plan_memory.py --suggest --model-preset qwen2.5-7b --bf16 --seq-length 131072 \\
        --gpus 8 --recompute-granularity full --gpu-memory-gb 80
    python tools/plan_memory.py --hf-config /data/Qwen2.5-7B/config.json --seq-length 32768 --json

Prints, for the most loaded pipeline stage, the bytes per GPU of parameters, gradients,
optimizer state, saved activations, the backward working set, the log-prob path and the
rollout KV cache, each with its formula, then whether it fits in --gpu-memory-gb. --suggest
lists every valid (tp, pp, cp, dp) for --world-size GPUs, the fitting ones first, cheapest
first; for a mixture-of-experts model every expert-parallel size too, unless
--expert-model-parallel-size fixes it. The formulas live in ``megatron_k15/memory_plan.py`` and are checked against measured
peaks in ``tests/test_plan_memory.py``; docs/memory_planning.md explains them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _bootstrap  # noqa: F401,E402

from megatron_k15.arguments import (  # noqa: E402
    add_model_args, add_parallel_args, add_precision_args, apply_model_overrides, explicit_model_fields,
    megatron_settings_problem, resolve_model_config,
)
from megatron_k15.memory_plan import (  # noqa: E402
    GIB, RECOMPUTE_CHOICES, Layout, MemoryPlan, Workload, plan_memory, suggest_layouts,
    validate_plan_inputs,
)
from megatron_k15.models.config import ConfigError, GPTConfig  # noqa: E402

FORMULAS = """\
formulas (bytes per GPU; e = 2 for --bf16/--fp16, 4 for fp32; P = parameters of the stage on
this tp rank; D = dp * cp; N = micro_batch * seq / cp tokens; Ns = N / tp with sequence
parallelism, else N; h hidden, q = heads*head_dim, k = kv_heads*head_dim, f ffn, a heads;
V = padded vocabulary / tp):
  parameters            e * P
  gradients             4 * P (fp32 buckets; e * P with --no-accumulate-allreduce-grads-in-fp32)
  fp32 grad copies      16-bit buckets with D > 1: each bucket's fp32 copy lives from its launch
                        in backward to finish_grad_sync (at most the two latest buckets)
  optimizer (ZeRO-1)    16 * P / D  (fp32 master, Adam m and v, reduced grad shard; 12 * P at
                        D = 1 with fp32 buckets, which are the reduced grad themselves); an MoE
                        model's experts: E / ep per rank, their state sharded over D / ep
  activations / layer   none:      2 * [(4 + e) Ns h + 4 Ns] + 2 e Ns h + e N (3q + 3k) / tp
                                   + 4 N a / tp + 4 e N f / tp
                        selective: the same without 4 N a / tp (flash: no s^2 term to drop)
                        full:      e Ns h (the layer input)
                        MoE (E experts, top-k, expert ffn fm, routing assumed balanced):
                        the MLP's e Ns h + 4 e N f / tp becomes e N h + 2 e N k h
                                   + 4 e N k fm / tp + 4 N E + 16 N k + e N k
                                   (+ 4 N k + 4 N renormalised top-k, + 16 N k under ep)
     Megatron-LM (Korthikanti et al.): s b h (34 + 5 a s / h) in 16-bit without flash; the
     a s^2 term vanishes with flash attention, sequence parallelism divides by tp, full
     recompute keeps 2 s b h per layer.
  in flight             1F1B stage r keeps min(pp - r, num_microbatches) microbatches
  log-probs  ce         4 N V fp32 softmax (+ e N V before the cast, + 4 N V with padding)
             fused      no (N, V): 4 N h + e V h + 4 cV h + 16 cN cV, chunks cN = 2048
                        tokens, cV = 8192 vocabulary rows
  working set           last layer's backward: e Ns h + 2 e N f / tp (MoE: e Ns h + 3 e N k h
                        + e N k) (+ one recomputed layer; under ep an MoE one holds e N k h more)
  optimizer step        4 * largest grad bucket / D (the clipped fp32 gradient; 12 with
                        --adam-impl unfused; buckets of 40M)
  KV cache              2 * L_stage * (kv_heads / tp) * head_dim * e per token; blocks of
                        --kv-block-size, --rollout-batch-size sequences of
                        --rollout-max-tokens, plus one scratch block
  training peak         static + max(activation peak (with the fp32 copies of the buckets
                        already reduced at that point of backward), optimizer step)
  rollout peak          static + KV cache
  fits                  max(training, rollout) + --reserved-gb <= --gpu-memory-gb
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="plan_memory.py", description=__doc__, epilog=FORMULAS, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_parallel_args(p)
    add_precision_args(p)
    helps = {"model_preset": "preset model shape (or --hf-config); shape flags override it",
             "logprob_impl": "auto plans for the GPU default, fused",
             "attention_backend": "no effect on the plan: every backend is flash-style (no s^2 term)"}
    for action in p._actions:
        action.help = helps.get(action.dest, action.help)
    g = p.add_argument_group("memory planning")
    g.add_argument("--adam-impl", choices=["auto", "apex", "fused", "unfused"], default="auto",
                   help="the optimizer's AdamW kernel (train flag of the same name); auto plans for "
                        "the fused/apex kernels")
    g.add_argument("--hf-config", default=None,
                   help="HF config.json (or its directory) instead of --model-preset")
    g.add_argument("--data-parallel-size", type=int, default=None,
                   help="default: --world-size / (tp * pp * cp), or 1")
    g.add_argument("--world-size", "--gpus", dest="world_size", type=int, default=None,
                   help="number of GPUs (required with --suggest)")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--max-tokens-per-gpu", type=int, default=None,
                   help="RL packed microbatches (train_rl --use-dynamic-batch-size): tokens per GPU "
                        "and microbatch, in every layout (replaces --micro-batch-size x --seq-length / cp)")
    g.add_argument("--ref-load", dest="reference_model", nargs="?", const=True, default=False, metavar="DIR",
                   help="RL GRPO with a fixed reference (train_rl --ref-load DIR): one more copy of the weights "
                        "(DIR, if given, is not read)")
    g.add_argument("--num-microbatches", type=int, default=None,
                   help="microbatches per step and dp rank (default: pp, which fills 1F1B)")
    g.add_argument("--recompute-granularity", choices=RECOMPUTE_CHOICES, default="none")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with full: block recomputes only the first --recompute-num-layers layers "
                        "of each stage (the training flags of the same names)")
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--rollout-max-tokens", type=int, default=None,
                   help="cached tokens per rollout sequence, prompt + response (default: --seq-length)")
    g.add_argument("--rollout-batch-size", "--rollout-batch", dest="rollout_batch", type=int, default=1,
                   help="sequences held in the KV cache at once (0: no rollout phase)")
    g.add_argument("--kv-block-size", type=int, default=16, help="tokens per KV-cache block")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GPU memory, GiB")
    g.add_argument("--reserved-gb", type=float, default=3.0,
                   help="not available to tensors: CUDA context, NCCL buffers, allocator fragmentation")
    g.add_argument("--gpus-per-node", type=int, default=8, help="for --suggest: tp beyond a node costs more")
    g.add_argument("--suggest", action="store_true", help="list the layouts that fit --world-size GPUs")
    g.add_argument("--top", type=int, default=10, help="with --suggest: how many layouts to list")
    g.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


def model_config(args) -> GPTConfig:
    """--model-preset (with shape overrides, as in training) or --hf-config."""
    problem = megatron_settings_problem(args)
    if problem:
        raise ConfigError(problem)
    if args.hf_config and args.model_preset:
        raise ConfigError("--hf-config conflicts with --model-preset; give one of them")
    if not args.hf_config:
        if not args.model_preset:
            raise ConfigError("give --model-preset NAME or --hf-config PATH")
        return resolve_model_config(args)
    from megatron_k15.models.hf_mapping import HFCheckpointError, gpt_config_from_hf

    path = args.hf_config
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            cfg = gpt_config_from_hf(json.load(f), where=path)
    except OSError as e:
        raise ConfigError(f"--hf-config {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"--hf-config {path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except HFCheckpointError as e:
        raise ConfigError(f"--hf-config {e}") from None
    return apply_model_overrides(cfg, explicit_model_fields(args))


def workload(args) -> Workload:
    if args.bf16 and args.fp16:
        raise ConfigError("--bf16 and --fp16 are mutually exclusive; pick one")
    if args.seq_length is None:
        raise ConfigError("--seq-length is required")
    if args.rollout_batch < 0:
        raise ConfigError(f"--rollout-batch-size must be >= 0, got {args.rollout_batch}")
    if args.rollout_max_tokens is not None and args.rollout_max_tokens < 1:
        raise ConfigError(f"--rollout-max-tokens must be >= 1, got {args.rollout_max_tokens}")
    for flag, value in (("--gpu-memory-gb", args.gpu_memory_gb), ("--gpus-per-node", args.gpus_per_node),
                        ("--top", args.top)):
        if value <= 0:
            raise ConfigError(f"{flag} must be > 0, got {value}")
    if args.reserved_gb < 0:
        raise ConfigError(f"--reserved-gb must be >= 0, got {args.reserved_gb}")
    return Workload(
        seq_length=args.seq_length, micro_batch_size=args.micro_batch_size,
        num_microbatches=args.num_microbatches,
        params_dtype="bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        recompute=args.recompute_granularity,
        recompute_num_layers=args.recompute_num_layers if args.recompute_method == "block" else None,
        logprob_impl="ce" if args.logprob_impl == "ce" else "fused",
        adam_impl="unfused" if args.adam_impl == "unfused" else "fused",
        rollout_max_tokens=args.rollout_max_tokens, rollout_batch=args.rollout_batch,
        kv_block_size=args.kv_block_size,
        first_stage_layers=args.decoder_first_pipeline_num_layers,
        last_stage_layers=args.decoder_last_pipeline_num_layers, tokens_per_gpu=args.max_tokens_per_gpu,
        reference_model=bool(args.reference_model),
        fp32_grads=args.accumulate_allreduce_grads_in_fp32)


def layout(args) -> Layout:
    tp, pp, cp = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                  args.context_parallel_size)
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--context-parallel-size", cp)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1, got {value}")
    dp, world = args.data_parallel_size, args.world_size
    if world is not None:
        if world < 1:
            raise ConfigError(f"--world-size must be >= 1, got {world}")
        if world % (tp * pp * cp):
            raise ConfigError(f"--world-size {world} is not divisible by --tensor-model-parallel-size {tp} x "
                              f"--pipeline-model-parallel-size {pp} x --context-parallel-size {cp}")
        if dp is not None and dp * tp * pp * cp != world:
            raise ConfigError(f"--data-parallel-size {dp} x tp {tp} x pp {pp} x cp {cp} != --world-size {world}")
        dp = world // (tp * pp * cp)
    return Layout(tp, pp, cp, 1 if dp is None else dp, args.sequence_parallel,
                  getattr(args, "expert_model_parallel_size", 1))


# -- output ----------------------------------------------------------------------------------
def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def describe(cfg: GPTConfig, w: Workload, name: str) -> str:
    ffn = (f"{cfg.num_moe_experts} experts (top-{cfg.moe_router_topk}, ffn {cfg.moe_ffn_hidden_size})"
           if cfg.is_moe else f"ffn {cfg.ffn_hidden_size}")
    return (f"{name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, {ffn}, "
            f"heads {cfg.num_attention_heads} (kv {cfg.num_query_groups}, head dim {cfg.head_dim}), "
            f"vocab {cfg.vocab_size}; seq {w.seq_length}, "
            + (f"packed microbatches of {w.tokens_per_gpu} tokens per GPU, " if w.tokens_per_gpu
               else f"micro batch {w.micro_batch_size}, ") +
            f"{w.params_dtype}, recompute {w.recompute}"
            f"{'' if w.recompute_num_layers is None else f' (block: {w.recompute_num_layers} layers per stage)'}, "
            f"log-probs {w.logprob_impl}")


def render_plan(plan: MemoryPlan, gpu_bytes: int, reserved: int) -> str:
    s = plan.most_loaded
    lines = [f"layout {plan.layout} (world {plan.layout.world_size}), sequence parallel "
             f"{'on' if plan.layout.sp else 'off'}",
             f"most loaded pipeline stage: {s.pp_rank} of {plan.layout.pp} (layers "
             f"{s.layers[0]}-{s.layers[-1]}, {s.in_flight} microbatch(es) in flight, "
             f"{s.parameters:,} parameters on this GPU)", ""]
    static = sum(c.bytes for c in s.components if c.kind == "static")
    activations = sum(c.bytes for c in s.components if c.kind == "activations")
    kv = sum(c.bytes for c in s.components if c.kind == "rollout")
    sections = [
        ("static, held all run", "static", ("static total", static)),
        (f"activation peak ({s.train_peak_phase if s.train_peak_phase != 'optimizer step' else 'below the optimizer step'})",
         "activations", ("activations total", activations)),
        ("other phases (not added; the training peak is static + the largest phase)", "other", None),
        ("rollout", "rollout", None),
    ]
    rows = []
    for title, kind, total in sections:
        rows.append((title, None, None))
        rows += [("  " + c.name, c.formula, _gib(c.bytes)) for c in s.components if c.kind == kind]
        if total:
            rows.append(("  = " + total[0], "", _gib(total[1])))
    w0 = max(len(r[0]) for r in rows if r[1] is not None)
    w1 = max(len(r[1]) for r in rows if r[1] is not None)
    lines.append(f"{'component':<{w0}}  {'formula':<{w1}}  {'GiB/GPU':>8}")
    lines.append("-" * (w0 + w1 + 12))
    for a, b, c in rows:
        lines.append(a if b is None else f"{a:<{w0}}  {b:<{w1}}  {c:>8}")
    by = s.activations_by_recompute
    lines += ["", "activation peak by --recompute-granularity: " + ", ".join(
        f"{r} {_gib(by[r])}" for r in RECOMPUTE_CHOICES) + " GiB",
        f"training peak = static + {s.train_peak_phase}: {_gib(s.train_peak_bytes)} GiB",
        f"rollout peak = static + KV cache {_gib(kv)}: {_gib(s.rollout_peak_bytes)} GiB"]
    need = s.peak_bytes + reserved
    verdict = "fits" if need <= gpu_bytes else "does NOT fit"
    lines.append(f"{verdict} in {gpu_bytes / GIB:g} GiB with {reserved / GIB:g} GiB reserved: "
                 f"headroom {(gpu_bytes - need) / GIB:+.2f} GiB")
    if plan.layout.pp > 1:
        lines.append("peak GiB per pipeline stage: " + ", ".join(
            f"{st.pp_rank}: {_gib(st.peak_bytes)}" for st in plan.stages))
    return "\n".join(lines)


def render_suggestions(suggestions, top: int, gpu_bytes: int) -> str:
    fitting = [s for s in suggestions if s.fits]
    shown = (fitting or suggestions)[:top]
    head = (f"{len(fitting)} of {len(suggestions)} valid layouts fit in {gpu_bytes / GIB:.0f} GiB"
            + ("" if fitting else "; none fits, the smallest peaks are") + ":")
    with_ep = any(s.layout.ep > 1 for s in suggestions)
    lines = [head, f"{'#':>2}  {'tp':>3} {'pp':>3} {'cp':>3} {'dp':>3}" + (f" {'ep':>3}" if with_ep else "")
             + f"  {'train GiB':>9} {'rollout GiB':>11} {'headroom':>9}  cost"]
    if not fitting:
        shown = sorted(suggestions, key=lambda s: s.peak_bytes)[:top]
    for i, s in enumerate(shown, 1):
        lines.append(f"{i:>2}  {s.layout.tp:>3} {s.layout.pp:>3} {s.layout.cp:>3} {s.layout.dp:>3}"
                     + (f" {s.layout.ep:>3}" if with_ep else "")
                     + f"  {_gib(s.plan.train_peak_bytes):>9} {_gib(s.plan.rollout_peak_bytes):>11} "
                     f"{s.headroom_bytes / GIB:>+9.2f}  {s.cost:.3f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = build_parser()
    parser.set_defaults(expert_model_parallel_size=None)  # None: not given (--suggest then tries every ep)
    args = parser.parse_args(argv)
    given_ep = args.expert_model_parallel_size is not None
    if not given_ep:
        args.expert_model_parallel_size = 1
    try:
        cfg = model_config(args)
        w = workload(args)
        gpu_bytes, reserved = int(args.gpu_memory_gb * GIB), int(args.reserved_gb * GIB)
        name = args.model_preset or args.hf_config
        notes = []
        if args.seq_length > cfg.max_position_embeddings:
            notes.append(f"note: --seq-length {args.seq_length} exceeds --max-position-embeddings "
                         f"{cfg.max_position_embeddings}; training needs --max-position-embeddings "
                         f">= {args.seq_length}")
        if args.suggest:
            if args.world_size is None:
                raise ConfigError("--suggest needs --world-size (or --gpus)")
            if args.world_size < 1:
                raise ConfigError(f"--world-size must be >= 1, got {args.world_size}")
            ep = getattr(args, "expert_model_parallel_size", 1)
            # what does not depend on the layout (ep with its own dp, so that only ep's own
            # problems are named: a dense model, experts it does not divide)
            validate_plan_inputs(cfg, Layout(dp=max(ep, 1), ep=ep), w)
            suggestions = suggest_layouts(cfg, args.world_size, w, gpu_bytes, reserved, args.gpus_per_node,
                                          args.sequence_parallel, ep if given_ep or not cfg.is_moe else None)
            if not suggestions:
                raise ConfigError(f"no valid (tp, pp, cp, dp) for --world-size {args.world_size} with this "
                                  "model and --seq-length")
            best = suggestions[0]
            if args.json:
                print(json.dumps({"suggestions": [
                    {"layout": {"tp": s.layout.tp, "pp": s.layout.pp, "cp": s.layout.cp, "dp": s.layout.dp,
                                "ep": s.layout.ep},
                     "cost": s.cost, "peak_bytes": s.peak_bytes, "fits": s.fits,
                     "headroom_gib": round(s.headroom_bytes / GIB, 4)} for s in suggestions],
                    "chosen": best.plan.to_dict(gpu_bytes, reserved), "notes": notes}, indent=2))
                return 0
            print(describe(cfg, w, name))
            print(render_suggestions(suggestions, args.top, gpu_bytes))
            print(f"\nchosen: {best.layout}" + ("" if best.fits else " (does not fit)") + "\n")
            print(render_plan(best.plan, gpu_bytes, reserved))
        else:
            lay = layout(args)
            validate_plan_inputs(cfg, lay, w)
            plan = plan_memory(cfg, lay, w)
            if args.json:
                print(json.dumps({**plan.to_dict(gpu_bytes, reserved), "notes": notes}, indent=2))
                return 0
            print(describe(cfg, w, name))
            print(render_plan(plan, gpu_bytes, reserved))
        for n in notes:
            print(n)
    except ConfigError as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
