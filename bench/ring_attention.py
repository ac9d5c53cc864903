"""Ring attention (zigzag context parallelism) simulated on one GPU.

Runs the ring schedule of ``megatron_k15.kernels.ring_attention`` for cp virtual ranks in one
process, on one sequence of --seqlen tokens (default 128K) with Qwen2.5-7B attention shapes
(28 query heads, 4 kv heads, head_dim 128, bf16). For every step it times each virtual rank's
kernels and its fp32 LSE merge (forward) / gradient accumulation (backward); in a real ring a
step lasts as long as its slowest rank, so the table shows per step the slowest rank.

    achieved = sum over steps of the slowest rank's step time (compute only)
    ideal    = single-GPU causal flash attention of the whole sequence / cp
    eff      = ideal / achieved

Communication: per step a rank sends its current K/V (2 * local_tokens * kv_heads * head_dim
* bytes) to the next rank, overlapped with the step's compute; the backward also passes the
fp32 dK/dV accumulators (2 * local_tokens * kv_heads * head_dim * 4 bytes) and ends with one
exposed hop of them. "need GB/s" is the bandwidth (per direction) that hides the K/V exchange
behind the shortest overlapped step. NVLink on H100/H200 is 900 GB/s bidirectional, i.e.
450 GB/s per direction, and a ring uses both directions at once, so we compare with 450; a
400 Gb/s inter-node NIC gives 50 GB/s per direction. "eff@NVL" / "eff@IB" add the modelled
communication (each overlapped step lasts max(compute, bytes / bandwidth), plus the exposed
last hop) to the forward+backward efficiency.

Examples:
    python bench/ring_attention.py                         # 128K, cp 2 4 8 16
    python bench/ring_attention.py --cp 8 --seqlen 256k --iters 5
    python bench/ring_attention.py --smoke                 # tiny sizes; CPU ok (Triton interpreter)

Needs a CUDA GPU (except --smoke); without one it prints a message and exits with status 0.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench._cli import cuda_or_explain, size_arg  # noqa: E402  (the repository root is on sys.path above)

NVLINK_GBPS = 450.0  # per direction (900 GB/s bidirectional)
IB_GBPS = 50.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=size_arg, default=128 * 1024, help="total tokens (128k style ok)")
    p.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8, 16], help="cp sizes")
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--iters", type=int, default=3, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations (autotuning)")
    p.add_argument("--no-steps", action="store_true", help="only the summary table")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes (seqlen 128, 2/1 heads, head_dim 16, cp 2 4, 1 iter); runs on "
                        "CPU under the Triton interpreter, to check the script")
    args = p.parse_args(argv)
    if args.smoke:
        args.seqlen, args.heads, args.kv_heads, args.head_dim = 128, 2, 1, 16
        args.cp, args.iters, args.warmup = [c for c in args.cp if c <= 4] or [2], 1, 0
    for cp in args.cp:
        if cp < 2 or args.seqlen % (2 * cp):
            p.error(f"cp {cp}: need cp >= 2 and seqlen divisible by 2 * cp")
    if args.heads % args.kv_heads:
        p.error("--heads must be a multiple of --kv-heads")
    return args


class _Timer:
    """CUDA events on GPU (read after one synchronize), wall clock on CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.spans = []  # (key, start, end)

    def run(self, key, fn):
        import torch

        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            res = fn()
            b.record()
        else:
            a = time.perf_counter()
            res = fn()
            b = time.perf_counter()
        self.spans.append((key, a, b))
        return res

    def totals(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        out = {}
        for key, a, b in self.spans:
            ms = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
            out[key] = out.get(key, 0.0) + ms
        self.spans = []
        return out


def _sync(cuda):
    import torch

    if cuda:
        torch.cuda.synchronize()


def _time_full(q, k, v, do, scale, iters, warmup, cuda):
    from megatron_k15.kernels import flash_attention as fa

    fwd, bwd = [], []
    for it in range(warmup + iters):
        timer = _Timer(cuda)
        out, lse = timer.run("fwd", lambda: fa._forward(q, k, v, None, 0, True, scale))
        timer.run("bwd", lambda: fa._backward(do, None, q, k, v, out, lse, None, 0, True, scale))
        t = timer.totals()
        del out, lse
        if it >= warmup:
            fwd.append(t["fwd"])
            bwd.append(t["bwd"])
    return statistics.median(fwd), statistics.median(bwd)


def _simulate(shards, cp, scale, causal, timer):
    """One forward + backward of every virtual rank, timing kernels and merges per step."""
    import torch

    from megatron_k15.kernels import flash_attention as fa
    from megatron_k15.kernels import ring_attention as ra

    qs, ks, vs, dos = shards
    parts = ra._Parts(False, qs[0].shape[1])
    for r in range(cp):
        out_acc, lse_acc = ra._empty_acc(qs[r], False)
        for step in range(cp):
            src = (r - step) % cp
            for qsel, ksel, c in ra.ring_step_plan(step, r, cp, causal):
                o, l = timer.run(("fwd", step, r, "kern"), lambda: ra._block_forward(
                    qs[r], ks[src], vs[src], parts, qsel, ksel, c, scale))
                timer.run(("fwd", step, r, "merge"),
                          lambda: parts.merge(out_acc, lse_acc, qsel, o, l))
        out = timer.run(("fwd", cp - 1, r, "merge"), lambda: out_acc.to(qs[r].dtype))
        del out_acc
        dq_acc = torch.zeros(qs[r].shape, device=qs[r].device, dtype=torch.float32)
        for step in range(cp):
            src = (r - step) % cp
            dk_acc = torch.zeros(ks[src].shape, device=out.device, dtype=torch.float32)
            dv_acc = torch.zeros_like(dk_acc)
            for qsel, ksel, c in ra.ring_step_plan(step, r, cp, causal):
                lse_s = timer.run(("bwd", step, r, "merge"),
                                  lambda: parts.lse(lse_acc, qsel).contiguous())
                dq, dk, dv = timer.run(("bwd", step, r, "kern"), lambda: fa._backward(
                    parts.tok(dos[r], qsel), None, parts.tok(qs[r], qsel),
                    parts.tok(ks[src], ksel), parts.tok(vs[src], ksel), parts.tok(out, qsel),
                    lse_s, None, 0, c, scale))

                def acc():
                    parts.tok(dq_acc, qsel).add_(dq)
                    parts.tok(dk_acc, ksel).add_(dk)
                    parts.tok(dv_acc, ksel).add_(dv)

                timer.run(("bwd", step, r, "merge"), acc)
            del dk_acc, dv_acc
        del dq_acc, out, lse_acc


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not cuda_or_explain("bench/ring_attention.py", args.smoke):
        return 0
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from megatron_k15.parallel.context import zigzag_split

    device = torch.device("cuda" if cuda else "cpu")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if not cuda:
        dtype = torch.float32  # the interpreter is only a logic check
    S, H, HKV, D = args.seqlen, args.heads, args.kv_heads, args.head_dim
    scale = 1.0 / math.sqrt(D)
    elt = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    q, do = randn(1, S, H, D), randn(1, S, H, D)
    k, v = randn(1, S, HKV, D), randn(1, S, HKV, D)
    name = torch.cuda.get_device_name(device) if cuda else "CPU (Triton interpreter)"
    print(f"Ring attention, simulated on one GPU ({name}): seqlen {S}, heads {H}/{HKV}, "
          f"head_dim {D}, {str(dtype).replace('torch.', '')}, causal, zigzag")
    full_fwd, full_bwd = _time_full(q, k, v, do, scale, args.iters, args.warmup, cuda)
    flops = 4 * S * S * H * D / 2
    print(f"full attention on 1 GPU: fwd {full_fwd:.2f} ms ({flops / full_fwd / 1e9:.0f} "
          f"TFLOP/s), bwd {full_bwd:.2f} ms ({2.5 * flops / full_bwd / 1e9:.0f} TFLOP/s)\n")

    summary = []
    for cp in args.cp:
        local = S // cp
        shards = [[zigzag_split(x, 1, cp, r).contiguous() for r in range(cp)]
                  for x in (q, k, v, do)]
        runs = []
        for it in range(args.warmup + args.iters):
            timer = _Timer(cuda)
            _simulate(shards, cp, scale, True, timer)
            t = timer.totals()
            if it >= args.warmup:
                runs.append(t)
        del shards
        if cuda:
            torch.cuda.empty_cache()

        def med(key):
            return statistics.median(run.get(key, 0.0) for run in runs)

        kv_bytes = 2 * local * HKV * D * elt
        dkv_bytes = 2 * local * HKV * D * 4
        rows, step_t = [], {"fwd": [], "bwd": []}
        for pas in ("fwd", "bwd"):
            for step in range(cp):
                per_rank = [(med((pas, step, r, "kern")), med((pas, step, r, "merge")))
                            for r in range(cp)]
                worst = max(range(cp), key=lambda r: sum(per_rank[r]))
                kern, merge = per_rank[worst]
                step_t[pas].append(kern + merge)
                sent = (kv_bytes if step + 1 < cp else 0) + (dkv_bytes if pas == "bwd" else 0)
                need = sent / ((kern + merge) * 1e-3) / 1e9 if sent else 0.0
                rows.append((pas, step, kern, merge, kern + merge,
                             min(sum(x) for x in per_rank), sent / 1e6, need))
        fwd_ms, bwd_ms = sum(step_t["fwd"]), sum(step_t["bwd"])
        ideal_f, ideal_fb = full_fwd / cp, (full_fwd + full_bwd) / cp
        # bandwidth to hide the overlapped exchanges behind the shortest overlapped step
        need_f = max(kv_bytes / (t * 1e-3) / 1e9 for t in step_t["fwd"][:-1])
        need_b = max((kv_bytes + dkv_bytes) / (t * 1e-3) / 1e9 for t in step_t["bwd"][:-1])

        def with_comm(gbps):
            bw = gbps * 1e9
            f = sum(max(t, kv_bytes / bw * 1e3) for t in step_t["fwd"][:-1]) + step_t["fwd"][-1]
            b = (sum(max(t, (kv_bytes + dkv_bytes) / bw * 1e3) for t in step_t["bwd"][:-1])
                 + step_t["bwd"][-1] + dkv_bytes / bw * 1e3)  # last dK/dV hop is exposed
            return ideal_fb / (f + b)

        summary.append((cp, local, fwd_ms, ideal_f, fwd_ms + bwd_ms, ideal_fb, need_f, need_b,
                        with_comm(NVLINK_GBPS), with_comm(IB_GBPS)))
        if not args.no_steps:
            print(f"cp={cp}: {local} tokens per rank; per step the slowest virtual rank "
                  "(all ranks' compute in a real ring runs in parallel)")
            print(f"{'pass':>4} {'step':>4} {'kernels ms':>10} {'merge ms':>9} {'step ms':>8} "
                  f"{'fastest':>8} {'MB sent':>8} {'need GB/s':>9}")
            for pas, step, kern, merge, tot, fastest, mb, need in rows:
                print(f"{pas:>4} {step:>4} {kern:>10.3f} {merge:>9.3f} {tot:>8.3f} "
                      f"{fastest:>8.3f} {mb:>8.1f} {need:>9.1f}")
            print(f"fwd {fwd_ms:.2f} ms vs ideal {ideal_f:.2f} ({100 * ideal_f / fwd_ms:.1f}%), "
                  f"fwd+bwd {fwd_ms + bwd_ms:.2f} ms vs ideal {ideal_fb:.2f} "
                  f"({100 * ideal_fb / (fwd_ms + bwd_ms):.1f}%)\n")

    print("summary (compute only unless marked; need = GB/s per direction to hide the exchange)")
    print(f"{'cp':>3} {'tokens/rank':>11} {'fwd ms':>8} {'ideal':>8} {'eff%':>6} "
          f"{'f+b ms':>8} {'ideal':>8} {'eff%':>6} {'need fwd':>9} {'need bwd':>9} "
          f"{'NVL450':>7} {'IB50':>6} {'eff@NVL':>8} {'eff@IB':>7}")
    for cp, local, f, fi, fb, fbi, nf, nb, enl, eib in summary:
        nvl = "hidden" if max(nf, nb) <= NVLINK_GBPS else "NO"
        ib = "hidden" if max(nf, nb) <= IB_GBPS else "NO"
        print(f"{cp:>3} {local:>11} {f:>8.2f} {fi:>8.2f} {100 * fi / f:>6.1f} {fb:>8.2f} "
              f"{fbi:>8.2f} {100 * fbi / fb:>6.1f} {nf:>9.1f} {nb:>9.1f} {nvl:>7} {ib:>6} "
              f"{100 * enl:>8.1f} {100 * eib:>7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
