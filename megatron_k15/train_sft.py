"""Supervised fine-tuning (Kimi k1.5's long-CoT warm-up) in any tp x pp x dp layout.

    torchrun --nproc-per-node 4 -m megatron_k15.train_sft --train-data data/sft \
        --load ckpt/base --finetune --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
        --seq-length 4096 --micro-batch-size 1 --global-batch-size 32 --train-iters 1000 \
        --lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 50 --save ckpt/sft --save-interval 100 \
        --tensorboard-dir runs/sft

Samples (from ``tools/preprocess_data.py --mode sft``) are packed into rows of --seq-length
with per-sample attention boundaries; the loss is the mean over response tokens of the global
batch, so every layout takes the same step. With --context-parallel-size cp > 1 each packed
microbatch is zigzag-split over the cp group (``split_microbatch_for_cp``: every packed sample
padded to a multiple of 2*cp, padding masked out of the loss), attention runs as ring attention
(--cp-comm-type ring|allgather), and the loss sums over cp ranks. ``--load`` resumes exactly (weights, optimizer,
RNG, data position); with ``--finetune`` it loads weights only. Without ``--load`` the model
starts from a layout-independent random init (--seed).
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.distributed as dist

from megatron_k15.arguments import ArgumentError, parse_args


def add_sft_args(p) -> None:
    g = p.add_argument_group("sft data")
    g.add_argument("--train-data", required=True, help="prefix written by preprocess_data.py --mode sft")


def _validate(args) -> None:
    for flag, value in (("--train-iters", args.train_iters), ("--lr", args.lr), ("--seq-length", args.seq_length)):
        if value is None:
            raise ArgumentError(f"{flag} is required for training")
    if args.train_iters < 1:
        raise ArgumentError(f"--train-iters must be >= 1, got {args.train_iters}")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    from megatron_k15.data.indexed import dataset_files

    import os

    missing = [f for f in dataset_files(args.train_data, "sft") if not os.path.exists(f)]
    if missing:
        raise ArgumentError(f"--train-data {args.train_data}: missing {missing[0]} (run tools/preprocess_data.py --mode sft)")


def cp_microbatch_length(cu_seqlens, seq_len: int, cp_size: int, tp_size: int = 1) -> int:
    """Packed length of a microbatch after context-parallel padding: every sample padded to a
    multiple of 2*cp, the total rounded up to a multiple of cp * lcm(2, tp) (the local length is
    then even and divisible by tp for sequence parallelism). It is ``seq_len`` rounded up to that
    multiple unless the per-sample padding needs more, so it is fixed for a given run in the
    common case and always the same on every rank that shares the microbatch (tp, cp, pp)."""
    from megatron_k15.parallel.context import pad_to_multiple

    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    padded = sum(pad_to_multiple(lengths, 2 * cp_size))
    multiple = cp_size * math.lcm(2, tp_size)
    return -(-max(padded, seq_len) // multiple) * multiple


def split_microbatch_for_cp(mb: dict, cp_size: int, cp_rank: int, tp_size: int = 1) -> dict:
    """This cp rank's zigzag shard of a packed microbatch (``PackedSFTStream.microbatch``, b=1).

    Every packed sequence is padded to a multiple of 2*cp (pad tokens: id 0, label 0, loss mask
    0; they sit at the end of their sequence, so causal attention never shows them to a real
    token) and the last one is extended so the row has ``cp_microbatch_length`` tokens. Returns
    input_ids / labels / loss_mask / position_ids (original positions, for RoPE) of shape
    (1, length / cp), the local ``cu_seqlens`` (the same on every cp rank) and ``max_seqlen``."""
    if cp_size == 1:
        return mb
    from megatron_k15.parallel.context import pad_to_multiple, zigzag_varlen_layout

    cu = mb["cu_seqlens"].to(torch.int64).cpu()
    n = int(cu[-1])
    if mb["input_ids"].shape != (1, n):
        raise ValueError(f"expected one packed row of {n} tokens, got input_ids "
                         f"{tuple(mb['input_ids'].shape)}")
    target = cp_microbatch_length(cu, n, cp_size, tp_size)
    lengths = (cu[1:] - cu[:-1]).tolist()
    padded = pad_to_multiple(lengths, 2 * cp_size)
    # the last sequence absorbs the rest of the row: its length becomes a multiple of 2*cp
    grow = target - sum(padded) + padded[-1] - lengths[-1]
    cu_ext = cu.clone()
    cu_ext[-1] += grow
    lay = zigzag_varlen_layout(cu_ext, cp_size, cp_rank)
    index, valid = lay.index.clamp(min=0), lay.valid
    out = {}
    for key in ("input_ids", "labels", "loss_mask"):
        x = mb[key]
        if grow:
            x = torch.cat([x, x.new_zeros((1, grow))], dim=1)
        idx = index.to(x.device)
        local = x.index_select(1, idx)
        out[key] = torch.where(valid.to(x.device)[None], local, torch.zeros_like(local))
    out["position_ids"] = lay.position_ids[None].to(mb["input_ids"].device)
    out["cu_seqlens"] = lay.cu_seqlens.to(mb["cu_seqlens"].device)
    out["max_seqlen"] = lay.max_seqlen
    for k, v in mb.items():  # anything else travels unchanged
        out.setdefault(k, v)
    return out


def sft_forward_step(model, total_loss_tokens: float):
    """Per microbatch: log-probs through the stage; on the last stage the loss
    -sum(mask * logp) / (response tokens in the global batch). Under context parallelism the
    microbatch is this cp rank's shard (``split_microbatch_for_cp``) and the loss a partial sum
    over its tokens (gradients and the logged sums add up over cp)."""
    def step(mb, hidden):
        out = model(input_ids=mb["input_ids"] if model.pre_process else None,
                    position_ids=mb.get("position_ids"),
                    labels=mb["labels"] if model.post_process else None,
                    cu_seqlens=mb["cu_seqlens"], max_seqlen=mb["max_seqlen"], hidden=hidden)
        if not model.post_process:
            return out
        loss_sum = -(out * mb["loss_mask"]).sum()
        return loss_sum / total_loss_tokens, (float(loss_sum.detach()), float(mb["loss_mask"].sum()))
    return step


def main(argv=None) -> int:
    args = parse_args(argv, "Supervised fine-tuning with megatron_k15", add_sft_args, _validate)
    from megatron_k15 import platform
    from megatron_k15.checkpointing import load_checkpoint, save_checkpoint
    from megatron_k15.data.indexed import load_sft_dataset
    from megatron_k15.data.sft import PackedSFTStream
    from megatron_k15.initialize import destroy, initialize_megatron
    from megatron_k15.parallel.data import lr_at
    from megatron_k15.training import MetricsLogger, build_train_context, reduce_sums, train_step

    initialize_megatron(args)
    cfg = args.model_config
    ctx = build_train_context(args, cfg, seed=args.seed)
    iteration, extra = 0, {}
    if args.load:
        iteration, extra = load_checkpoint(args.load, ctx, finetune=args.finetune)
    consumed = int(extra.get("consumed_rows", 0))
    rank = dist.get_rank()

    dataset = load_sft_dataset(args.train_data)
    stream = PackedSFTStream(dataset, args.seq_length, seed=args.seed)
    gbs, mbs, dp = args.global_batch_size, args.micro_batch_size, ctx.pc.dp_size
    per_rank = gbs // dp
    device = platform.current_device()
    logger = MetricsLogger(args.tensorboard_dir, rank == 0)
    logger.truncate_after(iteration)
    if rank == 0:
        print(f"[train_sft] {cfg.num_parameters() / 1e6:.2f}M parameters, {len(dataset)} samples, "
              f"tp={ctx.pc.tp_size} pp={ctx.pc.pp_size} cp={ctx.pc.cp_size} dp={dp}, start at iteration {iteration}", flush=True)

    saved_at = iteration
    while iteration < args.train_iters:
        t0 = time.time()
        rows = stream.rows(consumed, gbs)
        total_tokens = max(1, sum(stream.loss_tokens(r) for r in rows))
        mine = rows[ctx.pc.dp_rank * per_rank:(ctx.pc.dp_rank + 1) * per_rank]
        microbatches = []
        for k in range(0, per_rank, mbs):
            mb = split_microbatch_for_cp(stream.microbatch(mine[k:k + mbs]), ctx.pc.cp_size, ctx.pc.cp_rank,
                                         ctx.pc.tp_size if ctx.model.sequence_parallel else 1)
            microbatches.append({k2: (v.to(device) if torch.is_tensor(v) else v) for k2, v in mb.items()})
        lr = lr_at(iteration, args.lr, args.min_lr, args.lr_warmup_iters, args.train_iters, args.lr_decay_style)
        results, grad_norm = train_step(ctx, microbatches, sft_forward_step(ctx.model, total_tokens), lr)
        loss_sum, tokens = reduce_sums([sum(r[0] for r in results), sum(r[1] for r in results)], ctx)
        consumed += gbs
        iteration += 1
        elapsed = time.time() - t0
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            metrics = {"loss": loss_sum / max(tokens, 1.0), "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_s": gbs * args.seq_length / elapsed, "iteration_time_s": elapsed,
                       "loss_tokens": tokens, "epoch": stream.epoch_of(consumed - 1),
                       "peak_memory_bytes": platform.peak_memory_bytes()}
            logger.log(iteration, metrics)
            if rank == 0:
                print(f"[train_sft] iteration {iteration}/{args.train_iters} | loss {metrics['loss']:.6f} | "
                      f"lr {lr:.3g} | grad norm {grad_norm:.4f} | {metrics['tokens_per_s']:.0f} tokens/s",
                      flush=True)
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"iteration {iteration}: grad norm is {grad_norm}")
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save_checkpoint(args.save, iteration, ctx, {"consumed_rows": consumed})
            saved_at = iteration
    if args.save and saved_at != iteration:
        save_checkpoint(args.save, iteration, ctx, {"consumed_rows": consumed})
    logger.close()
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
