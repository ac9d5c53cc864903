"""What a checkpoint save costs training: synchronous save vs ``--async-save``.

One rank, one model (a preset, optionally with fewer layers), its ZeRO-1 Adam state filled by
``--warmup`` SFT steps on random tokens. Then:

    baseline   median time of ``--steps`` training steps, no save in flight
    sync       ``save_checkpoint``: training waits for the whole write
    async      ``save_checkpoint(..., async_saver=...)``: training waits for the copy to host
               memory; steps then run while a thread writes (``maybe_finalize`` after each, as
               the trainers call it) until the checkpoint is current

The table gives the seconds training stood still for the save, the background write time, and
the median step time while the write ran (the writer competes for CPU and memory bandwidth).

Examples:
    python bench/checkpoint_save.py --num-layers 0 --dtype bf16 --seq-length 4096   # the whole 0.5B (GPU)
    python bench/checkpoint_save.py --allow-cpu                      # qwen2.5-0.5b with 2 layers, CPU
    python bench/checkpoint_save.py --smoke                          # tiny model, seconds, CPU ok

Without a GPU (and without --allow-cpu or --smoke) it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

GIB = 2 ** 30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-preset", default="qwen2.5-0.5b", help="megatron_k15.models.config preset")
    p.add_argument("--num-layers", type=int, default=2, help="override the preset's layers (0: keep them)")
    p.add_argument("--seq-length", type=int, default=256, help="tokens of the one training sequence")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="fp32")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (Adam's state)")
    p.add_argument("--steps", type=int, default=5, help="timed baseline steps")
    p.add_argument("--save-dir", default=None, help="where to write (default: a temporary directory, removed)")
    p.add_argument("--allow-cpu", action="store_true", help="measure on CPU when there is no GPU")
    p.add_argument("--smoke", action="store_true", help="check the script: tiny model, one step, CPU ok")
    args = p.parse_args(argv)
    if args.smoke:
        args.model_preset, args.num_layers, args.warmup, args.steps, args.allow_cpu = "tiny", 2, 1, 1, True
    return args


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from bench._cli import cuda_or_explain

    if not cuda_or_explain("bench/checkpoint_save.py", args.allow_cpu):
        return 0

    from megatron_k15.async_save import AsyncCheckpointSaver
    from megatron_k15.checkpointing import save_checkpoint
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.config import preset
    from megatron_k15.train_sft import sft_forward_step
    from megatron_k15.training import build_train_context, train_step

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    initialize_model_parallel(1)
    cfg = preset(args.model_preset, **({"num_layers": args.num_layers} if args.num_layers else {}))
    cfg.max_position_embeddings = max(cfg.max_position_embeddings, args.seq_length)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    ns = argparse.Namespace(lr=1e-5, attention_backend="sdpa", params_dtype=dtype, recompute_granularity=None)
    ctx = build_train_context(ns, cfg, seed=1)
    s = args.seq_length
    ids = torch.randint(0, cfg.vocab_size, (1, s + 1), generator=torch.Generator().manual_seed(0))
    mb = {"input_ids": ids[:, :-1].to(device), "labels": ids[:, 1:].to(device),
          "loss_mask": torch.ones(1, s, device=device),
          "cu_seqlens": torch.tensor([0, s], dtype=torch.int32, device=device), "max_seqlen": s}
    forward_step = sft_forward_step(ctx.model, float(s))

    def step() -> float:
        t = time.perf_counter()
        train_step(ctx, [mb], forward_step, 1e-5)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    where = (f"{torch.cuda.get_device_name(device)}" if cuda else f"CPU ({torch.get_num_threads()} threads)")
    print(f"# {args.model_preset} x {cfg.num_layers} layers ({cfg.num_parameters() / 1e6:.0f}M parameters), "
          f"{args.dtype}, sequence {s}, {where}, torch {torch.__version__}", flush=True)
    for _ in range(args.warmup):
        step()
    baseline = statistics.median(step() for _ in range(args.steps))
    root = args.save_dir or tempfile.mkdtemp(prefix="bench_ckpt_")
    try:
        t = time.perf_counter()
        path = save_checkpoint(os.path.join(root, "sync"), 1, ctx, {})
        sync_s = time.perf_counter() - t
        size = _dir_bytes(path)

        saver = AsyncCheckpointSaver()
        t = time.perf_counter()
        save_checkpoint(os.path.join(root, "async"), 1, ctx, {}, async_saver=saver)
        stall_s = time.perf_counter() - t
        during = []
        while saver.pending:
            during.append(step())
            saver.maybe_finalize()
        write_s = saver.write_seconds
    finally:
        if args.save_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"checkpoint {size / GIB:.2f} GiB (weights, fp32 master weights and Adam's moments); "
          f"baseline step {baseline:.3f} s", flush=True)
    print("| save | training stalled s | written in s | steps during the write | median step s then |")
    print("|---|---|---|---|---|")
    print(f"| sync | {sync_s:.2f} | {sync_s:.2f} | 0 | - |")
    print(f"| async | {stall_s:.2f} | {write_s:.2f} | {len(during)} | "
          f"{statistics.median(during):.3f} |" if during else f"| async | {stall_s:.2f} | {write_s:.2f} | 0 | - |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
