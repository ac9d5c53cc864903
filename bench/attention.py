"""Benchmark our Triton flash attention against PyTorch SDPA's flash and cuDNN backends.

Prints one table row per (head_dim, causal, seqlen) with TFLOP/s for forward and for
forward+backward, per backend. FLOP convention (as in flash-attn's benchmarks):
forward = 4 * batch * seqlen^2 * n_heads * head_dim, halved when causal; backward = 2.5x the
forward, so forward+backward = 3.5x the forward.

The batch is chosen so that batch * seqlen == --tokens (at least 1 sequence), and
n_heads = --hidden / head_dim, as flash-attn's benchmark does.

Examples:
    python bench/attention.py                                  # 1K..128K, head_dim 64 and 128
    python bench/attention.py --seqlens 16384 --head-dims 128 --causal on --modes fwd fwd_bwd
    python bench/attention.py --backends ours sdpa_cudnn --kv-heads 4 --dtype fp16
    python bench/attention.py --window 4096 --causal on --backends ours   # sliding window (OLMo 3)

With ``--window W`` (causal only) each query sees its W most recent keys; FLOPs count the
pairs inside the window (W^2/2 + (s - W) W per sequence), so a kernel that skips the blocks
outside it shows the rate of the work done. SDPA has no sliding window: its columns read n/a.

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

BACKENDS = ("ours", "sdpa_flash", "sdpa_cudnn")
MODES = ("fwd", "fwd_bwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DEFAULT_SEQLENS = [1024 * 2**i for i in range(8)]  # 1K .. 128K


def _head_dim(text: str) -> int:
    value = size_arg(text)
    if value < 16 or value > 256 or value & (value - 1):
        raise argparse.ArgumentTypeError(
            f"head_dim must be a power of two in [16, 256], got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlens", type=size_arg, nargs="+", default=DEFAULT_SEQLENS,
                   help="sequence lengths (accepts 16k style; default 1K..128K)")
    p.add_argument("--head-dims", type=_head_dim, nargs="+", default=[64, 128],
                   help="head dimensions (default 64 128)")
    p.add_argument("--hidden", type=size_arg, default=2048,
                   help="n_heads * head_dim (default 2048)")
    p.add_argument("--kv-heads", type=size_arg, default=None,
                   help="kv heads for GQA (default: as many as query heads)")
    p.add_argument("--tokens", type=size_arg, default=16384,
                   help="batch * seqlen per measurement (default 16384)")
    p.add_argument("--causal", choices=("on", "off", "both"), default="both")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--modes", choices=MODES, nargs="+", default=list(MODES))
    p.add_argument("--backends", choices=BACKENDS, nargs="+", default=list(BACKENDS))
    p.add_argument("--warmup", type=size_arg, default=25, help="warm-up time, ms")
    p.add_argument("--rep", type=size_arg, default=100, help="measurement time, ms")
    p.add_argument("--window", type=size_arg, default=None,
                   help="causal sliding window of W keys (Hugging Face's sliding_window); ours only")
    p.add_argument("--softcap", type=float, default=0.0,
                   help="soft-cap the scores at this value (Gemma 2: 50); ours only, SDPA cannot")
    p.add_argument("--check", action="store_true",
                   help="also report max |ours - sdpa| of the forward output per row")
    args = p.parse_args(argv)
    if args.window is not None and (args.window < 1 or args.causal != "on"):
        p.error("--window needs --causal on and at least 1 key")
    for d in args.head_dims:
        if args.hidden % d:
            p.error(f"--hidden {args.hidden} is not a multiple of head_dim {d}")
        heads = args.hidden // d
        if args.kv_heads is not None and heads % args.kv_heads:
            p.error(f"n_heads {heads} (hidden {args.hidden} / head_dim {d}) is not a multiple "
                    f"of --kv-heads {args.kv_heads}")
    return args


def attention_flops(batch, seqlen, heads, head_dim, causal, mode, window=None) -> float:
    from megatron_k15.flops import attended_pairs

    pairs = attended_pairs(seqlen, window) if causal else float(seqlen) * seqlen
    return 4.0 * batch * pairs * heads * head_dim * (3.5 if mode == "fwd_bwd" else 1.0)


def _make_fn(backend, q, k, v, causal, window=None, softcap=0.0):
    """A closure computing the output of ``backend`` on (b, s, h, d) tensors."""
    if backend == "ours":
        from megatron_k15.kernels.flash_attention import flash_attn_func

        window_size = (-1, -1) if window is None else (window - 1, 0)
        return lambda: flash_attn_func(q, k, v, causal=causal, window_size=window_size, softcap=softcap)
    if window is not None or softcap:
        raise RuntimeError("not supported: SDPA has no sliding window or soft cap")

    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
    gqa = q.shape[2] != k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

    def run():
        with sdpa_kernel(which[backend]):
            kwargs = {"enable_gqa": True} if gqa else {}
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, **kwargs)

    return run


def bench_one(backend, mode, q, k, v, causal, warmup, rep, window=None, softcap=0.0):
    """Milliseconds per call, or an error string."""
    import triton.testing

    try:
        fn = _make_fn(backend, q, k, v, causal, window, softcap)
    except RuntimeError:
        return "n/a"
    try:
        if mode == "fwd":
            with torch.no_grad():
                fn()
                return triton.testing.do_bench(fn, warmup=warmup, rep=rep)
        out = fn()
        dout = torch.randn_like(out)

        def fwd_bwd():
            fn().backward(dout)

        fwd_bwd()
        return triton.testing.do_bench(fwd_bwd, warmup=warmup, rep=rep, grad_to_none=[q, k, v])
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "oom"
    except RuntimeError as e:  # backend not available for this shape / dtype / GPU
        torch.cuda.empty_cache()
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return "n/a" if "No available kernel" in msg or "not supported" in msg.lower() else "err"


def main(argv=None) -> int:
    args = parse_args(argv)
    if not cuda_or_explain("bench/attention.py"):
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench/attention.py: TRITON_INTERPRET is set; unset it to benchmark compiled "
              "kernels.",
              file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype]
    causals = {"on": [True], "off": [False], "both": [True, False]}[args.causal]
    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name(device)
    print(f"# {gpu}, torch {torch.__version__}, dtype {args.dtype}, tokens/batch {args.tokens}, "
          f"hidden {args.hidden}, kv_heads {args.kv_heads or 'MHA'}"
          + (f", sliding window {args.window}" if args.window else "")
          + (f", scores soft-capped at {args.softcap}" if args.softcap else ""))
    print("# TFLOP/s; forward = 4*b*s^2*h*d (/2 causal), fwd_bwd = 3.5x forward")

    cols = [f"{b}:{m}" for m in args.modes for b in args.backends]
    header = f"{'d':>4} {'causal':>6} {'seqlen':>7} {'batch':>5} "
    header += " ".join(f"{c:>16}" for c in cols)
    if args.check:
        header += f" {'max|diff|':>10}"
    print(header)
    print("-" * len(header))
    for d in args.head_dims:
        heads = args.hidden // d
        kv_heads = args.kv_heads or heads
        for causal in causals:
            for s in args.seqlens:
                batch = max(1, args.tokens // s)
                torch.manual_seed(0)
                try:
                    q = torch.randn(batch, s, heads, d, device=device, dtype=dtype,
                                    requires_grad=True)
                    k = torch.randn(batch, s, kv_heads, d, device=device, dtype=dtype,
                                    requires_grad=True)
                    v = torch.randn(batch, s, kv_heads, d, device=device, dtype=dtype,
                                    requires_grad=True)
                except torch.OutOfMemoryError:
                    print(f"{d:>4} {str(causal):>6} {s:>7} {batch:>5}  (inputs do not fit)")
                    torch.cuda.empty_cache()
                    continue
                cells = []
                for mode in args.modes:
                    for backend in args.backends:
                        ms = bench_one(backend, mode, q, k, v, causal, args.warmup, args.rep, args.window,
                                       args.softcap)
                        if isinstance(ms, str):
                            cells.append(ms)
                        else:
                            flops = attention_flops(batch, s, heads, d, causal, mode, args.window)
                            tflops = flops / (ms * 1e-3) / 1e12
                            cells.append(f"{tflops:.1f}")
                line = f"{d:>4} {str(causal):>6} {s:>7} {batch:>5} "
                line += " ".join(f"{c:>16}" for c in cells)
                if args.check and args.window is None and not args.softcap:
                    with torch.no_grad():
                        try:
                            ours = _make_fn("ours", q, k, v, causal)()
                            ref = _make_fn("sdpa_flash" if kv_heads == heads else "sdpa_cudnn",
                                           q, k, v, causal)().transpose(1, 2)
                            line += f" {(ours.float() - ref.float()).abs().max().item():>10.2e}"
                        except RuntimeError:
                            line += f" {'n/a':>10}"
                print(line, flush=True)
                del q, k, v
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
