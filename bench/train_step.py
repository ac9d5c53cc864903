"""One training step of a Qwen2.5-0.5B-shaped model on one GPU at long sequence lengths.

Per sequence length s (default 32K, 64K, 128K; one packed sequence, micro batch 1): forward +
backward + optimizer step through ``megatron_k15.training.train_step`` with the SFT loss (as
``train_sft`` runs it: ``build_train_context``, ``sft_forward_step``), full activation
recompute, bf16 parameters (fp32 master weights in the ZeRO-1 Adam), fused log-probs, random
weights and tokens. ``--warmup`` untimed steps (Triton autotuning, optimizer state) come first;
the table gives the median of ``--steps`` timed steps.

    model FLOPs per step = 6 * N * s  +  6 * L * s^2 * h_q
        N    parameters in matmuls: the layers' weight matrices + the output layer (V x h; the
             input embedding is a lookup, and a tied embedding counts once)
        L    layers; h_q = heads * head_dim (query width)
        6 * L * s^2 * h_q = causal attention (QK^T and PV, 2 * 2 * s^2 * h_q per layer forward,
             halved by the mask, x 3 for forward + backward)
    MFU = model FLOPs / step time / peak bf16 dense (megatron_k15.flops: 989 TFLOP/s for H100 SXM, H200;
          --peak-tflops overrides); the forward that full recompute repeats is not counted.
    peak memory = torch.cuda.max_memory_allocated() over the timed steps, against
          megatron_k15.memory_plan.plan_memory() for the same model, layout (one GPU) and workload
          (what tools/plan_memory.py prints as the training peak).

Examples:
    python bench/train_step.py                                   # 32K 64K 128K on one GPU
    python bench/train_step.py --seq-lengths 16k 32k --steps 3
    python bench/train_step.py --smoke                           # CPU ok: tiny, s=64, fp32, sdpa

Without a GPU and without --smoke it prints a message and exits with status 0. On CPU
(``--smoke``) the peak is ``MemoryMeter``'s exact tensor high-water mark instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench._cli import add_profile_ops_arg, cuda_or_explain, profile_ops, size_arg  # noqa: E402  (root on sys.path)
from megatron_k15.flops import matmul_parameters, training_flops  # noqa: E402
from megatron_k15.flops import peak_tflops as device_peak  # noqa: E402

DTYPES = ("bf16", "fp16", "fp32")
MIB = 2 ** 20


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lengths", type=size_arg, nargs="+", default=[32768, 65536, 131072],
                   help="tokens of the one packed sequence (32k style ok; default 32K 64K 128K)")
    p.add_argument("--model-preset", default="qwen2.5-0.5b", help="megatron_k15.models.config preset")
    p.add_argument("--num-layers", type=int, default=None, help="override the preset's layers")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="parameter dtype")
    p.add_argument("--attention-backend", default="auto", help="auto (triton on GPU) | triton | sdpa")
    p.add_argument("--recompute-granularity", choices=("full", "selective", "none"), default="full")
    p.add_argument("--logprob-impl", choices=("fused", "ce"), default="fused")
    p.add_argument("--steps", type=int, default=2, help="timed steps per sequence length")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (autotuning)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="peak dense TFLOP/s for MFU (default: from the GPU name)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    add_profile_ops_arg(p, "after the timed steps at the first sequence length, run one step")
    p.add_argument("--smoke", action="store_true",
                   help="tiny preset, s = 64, fp32, sdpa, 1 + 1 steps: checks the script on CPU")
    args = p.parse_args(argv)
    if args.smoke:
        args.model_preset, args.seq_lengths, args.dtype = "tiny", [64], "fp32"
        args.attention_backend, args.steps, args.warmup, args.num_layers = "sdpa", 1, 1, None
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def model_flops(cfg, s: int) -> float:
    return training_flops(cfg, [s])


def peak_tflops(args, device_name: str):
    return args.peak_tflops or device_peak(device_name, args.dtype)


def predicted_peak_bytes(cfg, s: int, args):
    """The planner's training peak (MoE: tokens assumed evenly routed)."""
    from megatron_k15.memory_plan import Layout, Workload, plan_memory

    w = Workload(seq_length=s, micro_batch_size=1, params_dtype=args.dtype,
                 recompute=args.recompute_granularity, logprob_impl=args.logprob_impl)
    return plan_memory(cfg, Layout(), w).train_peak_bytes


def measure(ctx, cfg, s: int, args, device, meter) -> dict:
    import torch

    from megatron_k15.train_sft import sft_forward_step
    from megatron_k15.training import train_step

    cuda = device.type == "cuda"
    row = {"seq_length": s, "predicted_peak_bytes": predicted_peak_bytes(cfg, s, args)}
    gen = torch.Generator().manual_seed(s)
    ids = torch.randint(0, cfg.vocab_size, (1, s + 1), generator=gen)
    mb = {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device),
          "loss_mask": torch.ones(1, s, device=device),
          "cu_seqlens": torch.tensor([0, s], dtype=torch.int32, device=device), "max_seqlen": s}
    del ids
    step = sft_forward_step(ctx.model, float(s))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    try:
        for _ in range(args.warmup):
            train_step(ctx, [mb], step, args.lr)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            meter.reset_peak()
        times, norms, losses = [], [], []
        for _ in range(args.steps):
            sync()
            t0 = time.perf_counter()
            results, grad_norm = train_step(ctx, [mb], step, args.lr)
            sync()
            times.append(time.perf_counter() - t0)
            norms.append(float(grad_norm))
            losses.append(sum(r[0] for r in results) / s)
        row.update(status="ok", step_s=statistics.median(times), grad_norm=norms[-1],
                   loss=losses[-1],
                   peak_bytes=int(torch.cuda.max_memory_allocated() if cuda else meter.peak_bytes))
        if args.profile_ops and s == args.seq_lengths[0]:
            row["profile"] = profile_ops(lambda mb=mb: train_step(ctx, [mb], step, args.lr), args.profile_ops,
                                         f"one step at {s} tokens under torch.profiler, the {args.profile_ops} "
                                         "most expensive ops:")
    except torch.OutOfMemoryError as e:
        row.update(status="oom", error=str(e).splitlines()[0][:200])
    except Exception as e:  # noqa: BLE001 - one failing length must not hide the others
        traceback.print_exc()
        row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
    finally:
        del mb
        if cuda:
            torch.cuda.empty_cache()
    return row


def header(cfg, args, device_name, peak, attention) -> str:
    n = matmul_parameters(cfg)
    return "\n".join([
        f"# train_step: {args.model_preset} ({cfg.num_layers} layers, {cfg.num_parameters() / 1e6:.1f}M "
        f"parameters), {args.dtype}, recompute {args.recompute_granularity}, log-probs "
        f"{args.logprob_impl}, attention {attention}, micro batch 1, one packed sequence, "
        f"{device_name}",
        f"# model FLOPs/step = 6*N*s + 6*L*s^2*h_q with N = {n / 1e6:.1f}M matmul parameters, "
        f"L = {cfg.num_layers}, h_q = {cfg.query_projection_size}; MFU against "
        f"{f'{peak:g} TFLOP/s' if peak else 'n/a (no known peak for this device)'}; median of "
        f"{args.steps} step(s) after {args.warmup} warm-up",
        "| seq | step s | tokens/s | model TFLOP/s | MFU | peak MiB (measured) | predicted MiB "
        "| predicted - measured | grad norm |",
        "|---|---|---|---|---|---|---|---|---|",
    ])


def row_line(r, cfg, peak) -> str:
    predicted = r["predicted_peak_bytes"]
    pred = "n/a" if predicted is None else f"{predicted / MIB:,.1f}"
    if r["status"] != "ok":
        return f"| {r['seq_length']} | {r['status']} | | | | | {pred} | | |"
    tflops = model_flops(cfg, r["seq_length"]) / r["step_s"] / 1e12
    mfu = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
    err = "n/a" if predicted is None else f"{100 * (predicted - r['peak_bytes']) / r['peak_bytes']:+.1f}%"
    return (f"| {r['seq_length']} | {r['step_s']:.3f} | {r['seq_length'] / r['step_s']:,.0f} | "
            f"{tflops:.3g} | {mfu} | {r['peak_bytes'] / MIB:,.1f} | {pred} | {err} | "
            f"{r['grad_norm']:.4g} |")


def write_json(path, rows, cfg, args, device_name, attention) -> None:
    with open(path, "w") as f:
        json.dump({"model": args.model_preset, "dtype": args.dtype, "device": device_name,
                   "recompute": args.recompute_granularity, "logprob_impl": args.logprob_impl,
                   "attention": attention, "matmul_parameters": matmul_parameters(cfg),
                   "rows": [dict(r, model_flops=model_flops(cfg, r["seq_length"])) for r in rows]},
                  f, indent=2)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not cuda_or_explain("bench/train_step.py", args.smoke):
        return 0
    cuda = torch.cuda.is_available()
    if not cuda:  # the torch chunked forward: what tests/test_plan_memory.py measures on CPU
        os.environ.setdefault("MEGATRON_K15_FUSED_LOGPROBS_IMPL", "torch")
    from megatron_k15.initialize import initialize_model_parallel, set_seed
    from megatron_k15.memory_plan import MemoryMeter
    from megatron_k15.models.attention import resolve_attention_backend
    from megatron_k15.models.config import preset
    from megatron_k15.training import build_train_context

    initialize_model_parallel(1)
    set_seed(args.seed)
    overrides = {"num_layers": args.num_layers} if args.num_layers else {}
    cfg = preset(args.model_preset, **overrides)
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, max(args.seq_lengths))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    ns = argparse.Namespace(
        lr=args.lr, attention_backend=args.attention_backend, sequence_parallel=True,
        logprob_impl=args.logprob_impl, params_dtype=dtype,
        recompute_granularity=None if args.recompute_granularity == "none" else args.recompute_granularity)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    device_name = (f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}" if cuda
                   else f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}")
    attention = resolve_attention_backend(args.attention_backend, cfg.head_dim)
    peak = peak_tflops(args, device_name) if cuda else None
    print(header(cfg, args, device_name, peak, attention), flush=True)
    meter = None if cuda else MemoryMeter()
    if meter is not None:
        meter.__enter__()  # counts the model and optimizer too, as max_memory_allocated does
    rows = []
    try:
        ctx = build_train_context(ns, cfg, seed=args.seed)
        for s in args.seq_lengths:  # a row as soon as it is measured: a timeout keeps the others
            rows.append(measure(ctx, cfg, s, args, device, meter))
            print(row_line(rows[-1], cfg, peak), flush=True)
            if "profile" in rows[-1]:
                print(rows[-1]["profile"], flush=True)
            if args.json:
                write_json(args.json, rows, cfg, args, device_name, attention)
    finally:
        if meter is not None:
            meter.__exit__(None, None, None)
    for r in rows:
        if r.get("error"):
            print(f"# {r['seq_length']}: {r['error']}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
