"""Compile the Triton kernels the GPU check uses, in parallel, before it runs them.

Every new (dtype, head_dim, causal, varlen, GQA-or-not, ...) variant of the flash-attention
kernels compiles its whole autotuning list (9 forward, 8 dK/dV, 7 dQ configs) one after the
other on the first call: minutes, single-threaded, if the tests and benches meet them one by
one. This script starts one process per variant (``--jobs`` at a time) that calls the kernel on
small inputs with the same specialisation (head counts, strides and lengths keep Triton's
"divisible by 16" / "equal to 1" classes), so the compiled binaries land in Triton's on-disk
cache (~/.triton/cache) where the later stages find them; only autotuning's timing runs remain.

    python tests/gpu/warm_triton_cache.py            # all variants, 8 processes
    python tests/gpu/warm_triton_cache.py --list     # what would be compiled
    python tests/gpu/warm_triton_cache.py --variant flash-bf16-d64-g7-causal-varlen

Without CUDA it prints a message and exits 0 (the interpreter compiles nothing).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# name: (dtype, head_dim, heads, kv_heads, causal, varlen, backward, lengths[, window_left]) -- who
# uses it (a sliding window is another specialisation of the kernels).
# Lengths: Triton specialises integer arguments on "divisible by 16", so a variant met with
# ragged lengths (generation's prompts, RL's short padded batches) is warmed with both kinds.
FLASH = {
    "flash-bf16-d128-g4-causal": ("bf16", 128, 8, 2, True, False, True, (512,)),  # tests, ring
    "flash-bf16-d128-g4-full": ("bf16", 128, 8, 2, False, False, True, (512,)),  # ring blocks
    "flash-fp16-d128-g4-causal": ("fp16", 128, 8, 2, True, False, True, (512,)),  # tests
    "flash-bf16-d64-g7-causal": ("bf16", 64, 14, 2, True, False, True, (512, 500)),  # model, RL
    "flash-bf16-d64-g7-causal-varlen": ("bf16", 64, 14, 2, True, True, True, (512, 500)),  # prefill
    "flash-bf16-d128-mha16-causal": ("bf16", 128, 16, 16, True, False, True, (512,)),  # attention
    "flash-fp32-d64-g7-causal": ("fp32", 64, 14, 2, True, False, False, (512, 500)),  # generation
    "flash-fp32-d64-g7-causal-varlen": ("fp32", 64, 14, 2, True, True, False, (512, 500)),
    "flash-bf16-d128-mha16-causal-window": ("bf16", 128, 16, 16, True, False, True, (512,), 4095),  # attention
    "flash-bf16-d128-g4-causal-window": ("bf16", 128, 8, 2, True, False, True, (512,), 1023),  # tests
    "flash-bf16-d64-g4-causal-window": ("bf16", 64, 8, 2, True, False, True, (512,), 127),  # tests
    "flash-bf16-d64-g8-causal-varlen-window": ("bf16", 64, 64, 8, True, True, True, (512, 500), 127),  # gpt-oss
}
# paged decode (bf16/fp16/fp32) and fused log-probs (bf16/fp16); the MoE grouped GEMM (bf16/fp16)
OTHER = ("decode-and-logprobs", "grouped-gemm")
VARIANTS = list(FLASH) + list(OTHER)


def _dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def warm_flash(name: str) -> None:
    import torch

    from megatron_k15.kernels.flash_attention import flash_attn_func, flash_attn_varlen_func

    dt, d, h, hkv, causal, varlen, backward, lengths, *window = FLASH[name]
    kw = {"window_size": (window[0], 0)} if window else {}
    dtype = _dtype(dt)
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device="cuda").to(dtype).requires_grad_(backward)

    for s in lengths:
        if varlen:  # two sequences; max_seqlen (s + 112) in the same class as s
            q, k, v = randn(2 * s, h, d), randn(2 * s, hkv, d), randn(2 * s, hkv, d)
            cu = torch.tensor([0, s - 112, 2 * s], dtype=torch.int32, device="cuda")
            out = flash_attn_varlen_func(q, k, v, cu, s + 112, causal=causal, **kw)
        else:
            q, k, v = randn(2, s, h, d), randn(2, s, hkv, d), randn(2, s, hkv, d)
            out = flash_attn_func(q, k, v, causal=causal, **kw)
        if backward:
            out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


def warm_other() -> None:
    import torch

    from megatron_k15.kernels.decode_attention import paged_decode_attention
    from megatron_k15.kernels.fused_logprobs import fused_logprobs

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for heads, kv, d in ((28, 4, 128), (14, 2, 64)):
            kc = torch.randn(64, 16, kv, d, device="cuda").to(dtype)
            vc = torch.randn_like(kc)
            q = torch.randn(4, heads, d, device="cuda").to(dtype)
            bt = torch.arange(64, dtype=torch.int32, device="cuda").view(4, 16)
            lens = torch.tensor([256, 1, 100, 17], dtype=torch.int32, device="cuda")
            for splits in (None, 1):
                paged_decode_attention(q, kc, vc, bt, lens, num_splits=splits, return_lse=True,
                                       impl="triton")
    for dtype in (torch.bfloat16, torch.float16):
        for H in (3584, 896):
            h = torch.randn(256, H, device="cuda").to(dtype).requires_grad_()
            w = torch.randn(1024, H, device="cuda").to(dtype).requires_grad_()
            t = torch.randint(0, 1024, (256,), device="cuda")
            lp, ent = fused_logprobs(h, w, t, return_entropy=True, impl="triton")
            (lp.sum() + ent.sum()).backward()
    torch.cuda.synchronize()


def warm_grouped_gemm() -> None:
    """Forward, input and weight gradients of fc1 / fc2 at the shapes of tests/gpu and
    bench/moe_experts.py (hidden 2048, expert ffn 768, 128 experts; one config list per
    launch, so few rows suffice)."""
    import torch

    from megatron_k15.kernels.grouped_gemm import grouped_linear

    ends = torch.arange(1, 129, device="cuda") * 4
    for dtype in (torch.bfloat16, torch.float16):
        for out_f, in_f in ((1536, 2048), (2048, 768)):
            x = torch.randn(512, in_f, device="cuda").to(dtype).requires_grad_()
            w = torch.randn(128, out_f, in_f, device="cuda").to(dtype).requires_grad_()
            grouped_linear(x, w, ends, impl="triton").sum().backward()
    torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", choices=VARIANTS, help="compile one variant (a worker)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--timeout", type=float, default=170.0, help="seconds per variant")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(VARIANTS))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("warm_triton_cache.py: no CUDA GPU available; nothing to compile.")
        return 0
    if args.variant:
        if args.variant == "grouped-gemm":
            warm_grouped_gemm()
        elif args.variant in OTHER:
            warm_other()
        else:
            warm_flash(args.variant)
        return 0
    pending, running, results = list(VARIANTS), {}, {}
    t_start = time.time()
    while pending or running:
        while pending and len(running) < max(1, args.jobs):
            name = pending.pop(0)
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--variant", name],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            running[name] = (proc, time.time())
        time.sleep(0.5)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None and time.time() - t0 < args.timeout:
                continue
            if proc.poll() is None:
                proc.kill()
            out = proc.communicate()[0] or ""
            status = "ok" if proc.returncode == 0 else (
                "timeout" if time.time() - t0 >= args.timeout else f"failed (rc {proc.returncode})")
            results[name] = (status, time.time() - t0, out)
            del running[name]
    print(f"# Triton cache warm-up: {len(VARIANTS)} variants, {args.jobs} processes, "
          f"{time.time() - t_start:.0f} s in all")
    print("| variant | status | seconds |")
    print("|---|---|---|")
    for name in VARIANTS:
        status, secs, _ = results[name]
        print(f"| {name} | {status} | {secs:.0f} |")
    for name in VARIANTS:
        status, _, out = results[name]
        if status != "ok":
            print(f"\n--- {name}: {status}\n" + "\n".join(out.strip().splitlines()[-25:]))
    return 0 if all(r[0] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
