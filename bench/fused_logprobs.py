"""Benchmark: fused_logprobs vs the unfused path (logits -> log_softmax -> gather).

Measures forward+backward time and the peak extra memory of one call (above the inputs),
prints a table, and extrapolates both paths to 32K tokens x 152K vocab x 3584 hidden.

* GPU: torch.cuda.max_memory_allocated above the baseline, bf16 by default.
* CPU: every measurement runs in a fresh child process; peak RSS (VmHWM, reset through
  /proc/self/clear_refs) above the RSS after the inputs are built. fp32.

    python bench/fused_logprobs.py                       # default sizes for the device
    python bench/fused_logprobs.py --sizes 1024x32768x256 2048x32768x256 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from megatron_k15.kernels.fused_logprobs import (DEFAULT_CHUNK_TOKENS, DEFAULT_CHUNK_VOCAB,  # noqa: E402
                                                 fused_logprobs, reference_logprobs)

TARGET = (32768, 151936, 3584)  # tokens, vocab (Qwen2 152K), hidden (Qwen2-7B)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _run_once(path, hidden, weight, targets, chunk_tokens, chunk_vocab):
    h = hidden.detach().requires_grad_()
    w = weight.detach().requires_grad_()
    if path == "unfused":
        logp = reference_logprobs(h, w, targets)
    else:
        logp = fused_logprobs(h, w, targets, impl=path, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    logp.sum().backward()
    return h.grad, w.grad


def measure(path, N, V, H, device, dtype, repeat, chunk_tokens, chunk_vocab):
    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(device=device, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g).to(device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kb("VmRSS") * 1024
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            pass
    grads = _run_once(path, hidden, weight, targets, chunk_tokens, chunk_vocab)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kb("VmHWM") * 1024 - base
    del grads
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        _run_once(path, hidden, weight, targets, chunk_tokens, chunk_vocab)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"path": path, "N": N, "V": V, "H": H, "peak_bytes": peak,
            "ms": 1e3 * statistics.median(times) if times else float("nan")}


def fused_model_bytes(N, V, H, elt, chunk_tokens, chunk_vocab):
    """Memory model of the fused path (backward dominates): the two parameter-sized gradients
    (d_hidden in the input dtype plus its fp32 accumulator, d_weight) and O(chunk) temporaries
    (about four fp32 logit tiles and one fp32 d_weight chunk)."""
    cn, cv = min(N, chunk_tokens), min(V, chunk_vocab)
    grads = N * H * (elt + 4) + V * H * elt
    tiles = 4 * cn * cv * 4 + cv * H * 4
    return grads + tiles


def unfused_model_bytes(N, V, H, elt):
    """Megatron-style unfused: logits (input dtype) + their fp32 copy (none when the input is
    fp32) + the fp32 log_softmax grad + grad logits in the input dtype (aliasing the previous
    one for fp32) -- about 12 bytes per logit either way -- plus the two gradients."""
    per_logit = elt + 4 + 4 + elt if elt != 4 else 12
    return N * V * per_logit + N * H * elt + V * H * elt


def _fmt_mb(b):
    return f"{b / 2**20:10.1f}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="*", help="NxVxH triples")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    ap.add_argument("--chunk-vocab", type=int, default=DEFAULT_CHUNK_VOCAB)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    if args.child:  # one measurement in this (fresh) process
        path, n, v, h = args.child.split(",")
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
        print(json.dumps(measure(path, int(n), int(v), int(h), args.device, dtype, args.repeat,
                                 args.chunk_tokens, args.chunk_vocab)))
        return
    sizes = args.sizes or (["4096x32768x1024", "8192x65536x1024", "16384x151936x3584"] if cuda
                           else ["1024x32768x256", "2048x32768x256"])
    paths = ["unfused", "triton" if cuda else "torch"]
    elt = torch.empty(0, dtype=dtype).element_size()
    rows = []
    for size in sizes:
        N, V, H = (int(x) for x in size.lower().split("x"))
        for path in paths:
            if cuda:
                rows.append(measure(path, N, V, H, args.device, dtype, args.repeat,
                                    args.chunk_tokens, args.chunk_vocab))
                torch.cuda.empty_cache()
            else:
                cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{path},{N},{V},{H}",
                       "--device", args.device, "--dtype", str(dtype).split(".")[-1],
                       "--repeat", str(args.repeat), "--chunk-tokens", str(args.chunk_tokens),
                       "--chunk-vocab", str(args.chunk_vocab)]
                env = dict(os.environ, TRITON_INTERPRET="0")
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    dev = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(f"fused_logprobs benchmark on {dev}, dtype {dtype}, fwd+bwd, "
          f"chunks {args.chunk_tokens} tokens x {args.chunk_vocab} vocab")
    print(f"{'path':>8} {'N':>6} {'V':>7} {'H':>5} {'ms':>10} {'peak MB':>10} {'model MB':>10} {'B/logit':>8}")
    for r in rows:
        N, V, H = r["N"], r["V"], r["H"]
        model = (unfused_model_bytes(N, V, H, elt) if r["path"] == "unfused"
                 else fused_model_bytes(N, V, H, elt, args.chunk_tokens, args.chunk_vocab))
        print(f"{r['path']:>8} {N:>6} {V:>7} {H:>5} {r['ms']:>10.1f} {_fmt_mb(r['peak_bytes'])} "
              f"{_fmt_mb(model)} {r['peak_bytes'] / (N * V):>8.2f}")
    N, V, H = TARGET
    bf16 = 2
    print(f"\nextrapolation to {N} tokens x {V} vocab x {H} hidden, bf16 inputs (memory models above):")
    print(f"  unfused: {unfused_model_bytes(N, V, H, bf16) / 2**30:8.1f} GiB "
          f"(the (N, V) logits alone: {N * V * bf16 / 2**30:.1f} GiB bf16, {N * V * 4 / 2**30:.1f} GiB fp32)")
    print(f"  fused:   {fused_model_bytes(N, V, H, bf16, args.chunk_tokens, args.chunk_vocab) / 2**30:8.1f} GiB "
          f"(of which gradients d_hidden+d_weight {(N * H * (bf16 + 4) + V * H * bf16) / 2**30:.2f} GiB, "
          f"which any path needs)")


if __name__ == "__main__":
    main()
