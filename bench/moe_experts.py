"""Benchmark: an MoE layer's experts (SwiGLU, fc1 -> silu(gate) * up -> fc2) run as a loop of one
GEMM pair per expert (what the model did before), as our grouped GEMM (``--moe-grouped-gemm``,
kernels/grouped_gemm.py) and as PyTorch's ``torch._grouped_mm`` (bf16, sm90) where it exists.

Prints one table row per (tokens, mode, implementation): milliseconds and TFLOP/s, counting
6 x rows x hidden x ffn per forward (rows = tokens x top-k) and 3x that for forward+backward.
Default shapes: Qwen3-30B-A3B's (hidden 2048, expert ffn 768, 128 experts, top-8), routing
drawn from a softmax router on random tokens (uneven, as real routing is).

    python bench/moe_experts.py                                   # GPU: 64 to 16K tokens
    python bench/moe_experts.py --tokens 4096 --experts 64 --ffn 1408 --topk 6
    python bench/moe_experts.py --smoke                           # CPU: the script at tiny sizes
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench._cli import cuda_or_explain  # noqa: E402  (the repository root is on sys.path above)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 1024, 4096, 16384],
                   help="tokens per call (64: a decode step of 64 sequences)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=768, help="expert ffn width (fc1 is hidden -> 2 x ffn)")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwd_bwd"], default=["fwd", "fwd_bwd"])
    p.add_argument("--impls", nargs="+", choices=["loop", "grouped", "torch_grouped_mm"],
                   default=["loop", "grouped", "torch_grouped_mm"])
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="CPU check of the script: tiny shapes, 1 iteration")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens, args.hidden, args.ffn, args.experts, args.topk = [16], 32, 16, 4, 2
        args.iters, args.warmup, args.dtype = 1, 0, "fp32"
    if args.topk > args.experts:
        p.error(f"--topk {args.topk} exceeds --experts {args.experts}")
    return args


def routed_counts(tokens, hidden, experts, topk, device):
    """Rows per expert of a softmax router (random weights) on random tokens: uneven."""
    import torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g)
    router = torch.randn(experts, hidden, generator=g) / hidden ** 0.5
    chosen = (x @ router.T).topk(topk, dim=-1).indices.reshape(-1)
    return torch.bincount(chosen, minlength=experts).to(device)


def expert_mlp(impl, x, w1, w2, counts):
    """SwiGLU experts on rows grouped by expert (``counts`` on the device)."""
    import torch
    import torch.nn.functional as F

    from megatron_k15.kernels.grouped_gemm import grouped_linear

    if impl == "loop":  # the host reads the counts, then one GEMM pair per expert
        outs = []
        for e, xs in enumerate(x.split(counts.tolist())):
            gate, up = F.linear(xs, w1[e]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, w2[e]))
        return torch.cat(outs)
    ends = counts.cumsum(0)
    if impl == "grouped":
        gate, up = grouped_linear(x, w1, ends).chunk(2, dim=-1)
        return grouped_linear(F.silu(gate) * up, w2, ends)
    offs = ends.to(torch.int32)  # torch._grouped_mm: out = x @ w per group, w (G, in, out)
    gate, up = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs).chunk(2, dim=-1)
    return torch._grouped_mm((F.silu(gate) * up).contiguous(), w2.transpose(1, 2), offs=offs)


def time_ms(fn, iters, warmup, cuda):
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    if not cuda_or_explain("bench/moe_experts.py", smoke=args.smoke):
        return 0
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are imported
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    h, f, e, k = args.hidden, args.ffn, args.experts, args.topk
    g = torch.Generator().manual_seed(1)
    w1 = (torch.randn(e, 2 * f, h, generator=g) / h ** 0.5).to(device, dtype).requires_grad_()
    w2 = (torch.randn(e, h, f, generator=g) / f ** 0.5).to(device, dtype).requires_grad_()
    name = torch.cuda.get_device_name() if cuda else "CPU (smoke: the grouped GEMM interpreted)"
    print(f"# MoE experts on {name}, {args.dtype}: hidden {h}, expert ffn {f}, {e} experts, top-{k}; "
          f"median of {args.iters} after {args.warmup} warm-up")
    print("| tokens | rows | busiest expert | mode | implementation | ms | TFLOP/s | vs loop |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        counts = routed_counts(tokens, h, e, k, device)
        rows = int(counts.sum())
        x = torch.randn(rows, h, generator=g).to(device, dtype).requires_grad_()
        dy = torch.randn(rows, h, generator=g).to(device, dtype)
        flops = 6.0 * rows * h * f
        for mode in args.modes:
            loop_ms = None
            for impl in args.impls:
                if impl == "torch_grouped_mm" and not (cuda and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
                    continue

                def run():
                    y = expert_mlp(impl, x, w1, w2, counts)
                    if mode == "fwd_bwd":
                        torch.autograd.grad(y, (x, w1, w2), dy)

                try:
                    with torch.set_grad_enabled(mode == "fwd_bwd"):
                        ms = time_ms(run, args.iters, args.warmup, cuda)
                except Exception as err:  # noqa: BLE001 - e.g. _grouped_mm not built for this GPU
                    print(f"| {tokens} | {rows} | {int(counts.max())} | {mode} | {impl} | failed: "
                          f"{type(err).__name__}: {str(err)[:60]} | | |")
                    continue
                loop_ms = ms if impl == "loop" else loop_ms
                tflops = flops * (3 if mode == "fwd_bwd" else 1) / ms / 1e9
                speed = f"{loop_ms / ms:.2f}x" if loop_ms else ""
                print(f"| {tokens} | {rows} | {int(counts.max())} | {mode} | {impl} | {ms:.3f} | {tflops:.1f} | {speed} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
