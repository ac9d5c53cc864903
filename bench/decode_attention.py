"""Benchmark the paged split-KV decode attention kernel against the HBM bandwidth bound.

One call = one decode step of one layer: every sequence of the batch attends with its new
token to its whole cached context. Decode attention is memory bound, so the floor on its time is

    bound = bytes of K and V read / HBM bandwidth
          = batch * context * n_kv_heads * head_dim * 2 (K and V) * element size / bandwidth

(3.35 TB/s for an H100 SXM, 4.8 TB/s for an H200; picked from the device name, or
``--bandwidth-tbs``). The table prints, per (batch, context): the time per call, the decode
rate it would allow if attention were the only cost (``batch / time`` tokens/s for one layer),
the achieved bandwidth and the fraction of the bound reached. Timings use
``triton.testing.do_bench`` (L2 flushed between runs); blocks are shuffled in the cache to
mimic a fragmented cache. Configurations whose cache does not fit in GPU memory are skipped.

Examples:
    python bench/decode_attention.py                        # batch 1/64/256, context 4K..128K
    python bench/decode_attention.py --batch 64 --contexts 32k --heads 28 --kv-heads 4
    python bench/decode_attention.py --num-splits 1 8 32 --check

Needs a CUDA GPU; without one it prints a message and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import sys


import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from bench._cli import cuda_or_explain, size_arg  # noqa: E402  (the repository root is on sys.path above)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
KNOWN_BANDWIDTH_TBS = {"H200": 4.8, "H100": 3.35, "A100": 2.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=size_arg, nargs="+", default=[1, 64, 256])
    p.add_argument("--contexts", type=size_arg, nargs="+",
                   default=[4096, 16384, 32768, 65536, 131072], help="accepts 4k style")
    p.add_argument("--heads", type=int, default=32, help="query heads (per tp rank)")
    p.add_argument("--kv-heads", type=int, default=8, help="kv heads (per tp rank)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16, help="tokens per cache block")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--num-splits", type=int, nargs="+", default=[0],
                   help="splits per sequence to time (0 = the kernel's heuristic)")
    p.add_argument("--bandwidth-tbs", type=float, default=None,
                   help="HBM bandwidth in TB/s (default: from the device name)")
    p.add_argument("--mem-fraction", type=float, default=0.8,
                   help="largest fraction of free GPU memory a cache may take")
    p.add_argument("--check", action="store_true",
                   help="compare each output with the PyTorch fallback (small configs only)")
    return p.parse_args(argv)


def _bandwidth(args) -> tuple:
    if args.bandwidth_tbs:
        return args.bandwidth_tbs, "given"
    name = torch.cuda.get_device_name()
    for key, bw in KNOWN_BANDWIDTH_TBS.items():
        if key in name:
            return bw, name
    return 3.35, f"{name} (unknown; assuming H100 3.35 TB/s)"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not cuda_or_explain("bench/decode_attention.py"):
        return 0
    import triton.testing

    from megatron_k15.kernels.decode_attention import (
        default_num_splits,
        paged_decode_attention,
        paged_decode_attention_torch,
    )

    dtype = DTYPES[args.dtype]
    elt = torch.empty((), dtype=dtype).element_size()
    bw_tbs, bw_src = _bandwidth(args)
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()} | bandwidth bound at {bw_tbs} TB/s ({bw_src})")
    print(f"heads {args.heads}, kv heads {args.kv_heads}, head_dim {args.head_dim}, "
          f"block {args.block_size}, {args.dtype}; one layer, one decode step per call")
    header = (f"{'batch':>5} {'context':>8} {'splits':>6} {'KV GB':>8} {'time us':>10} "
              f"{'bound us':>9} {'% bound':>8} {'TB/s':>6} {'tok/s (1 layer)':>16}")
    print(header)
    print("-" * len(header))
    torch.manual_seed(0)
    for batch in args.batch:
        for ctx in args.contexts:
            blocks_per_seq = -(-ctx // args.block_size)
            num_blocks = batch * blocks_per_seq
            cache_bytes = 2 * num_blocks * args.block_size * args.kv_heads * args.head_dim * elt
            free, _ = torch.cuda.mem_get_info()
            if cache_bytes > args.mem_fraction * free:
                print(f"{batch:>5} {ctx:>8} {'-':>6} {cache_bytes / 1e9:>8.2f}  skipped: cache "
                      f"needs {cache_bytes / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
                continue
            shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
            k_cache = torch.randn(shape, device=dev, dtype=dtype)
            v_cache = torch.randn(shape, device=dev, dtype=dtype)
            bt = torch.randperm(num_blocks, device=dev, dtype=torch.int64)
            bt = bt.to(torch.int32).reshape(batch, blocks_per_seq)
            lens = torch.full((batch,), ctx, device=dev, dtype=torch.int32)
            q = torch.randn(batch, args.heads, args.head_dim, device=dev, dtype=dtype)
            kv_bytes = 2 * batch * ctx * args.kv_heads * args.head_dim * elt
            bound_us = kv_bytes / (bw_tbs * 1e12) * 1e6
            for ns in args.num_splits:
                splits = ns or default_num_splits(batch, args.kv_heads, ctx, dev)

                def fn(splits=splits):
                    return paged_decode_attention(q, k_cache, v_cache, bt, lens,
                                                  num_splits=splits)

                if args.check and kv_bytes < 2**30:
                    ref = paged_decode_attention_torch(q, k_cache, v_cache, bt, lens)
                    err = (fn().float() - ref.float()).abs().max().item()
                    if err > 2e-2:
                        print(f"  check failed: max abs error {err:.3g}")
                ms = triton.testing.do_bench(fn, warmup=25, rep=100)
                us = ms * 1e3
                print(f"{batch:>5} {ctx:>8} {splits:>6} {kv_bytes / 1e9:>8.3f} {us:>10.1f} "
                      f"{bound_us:>9.1f} {100 * bound_us / us:>7.1f}% "
                      f"{kv_bytes / (us * 1e-6) / 1e12:>6.2f} {batch / (us * 1e-6):>16,.0f}")
            del k_cache, v_cache, bt, q
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
