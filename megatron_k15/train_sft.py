"""Supervised fine-tuning (Kimi k1.5's long-CoT warm-up) in any tp x pp x dp layout.

    torchrun --nproc-per-node 4 -m megatron_k15.train_sft --train-data data/sft \
        --load ckpt/base --finetune --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
        --seq-length 4096 --micro-batch-size 1 --global-batch-size 32 --train-iters 1000 \
        --lr 1e-5 --min-lr 1e-6 --lr-warmup-iters 50 --save ckpt/sft --save-interval 100 \
        --tensorboard-dir runs/sft

Samples (from ``tools/preprocess_data.py --mode sft``) are packed into rows of --seq-length
with per-sample attention boundaries; the loss is the mean over response tokens of the global
batch, so every layout takes the same step. With --context-parallel-size cp > 1 each packed
microbatch is zigzag-split over the cp group (``parallel.context.split_packed_microbatch``: every packed sample
padded to a multiple of 2*cp, padding masked out of the loss), attention runs as ring attention
(--cp-comm-type ring|allgather), and the loss sums over cp ranks. ``--load`` resumes exactly (weights, optimizer,
RNG, data position); with ``--finetune`` it loads weights only. Without ``--load`` the model
starts from a layout-independent random init (--seed). ``--exit-signal-handler``,
``--exit-duration-in-mins`` and ``--exit-interval`` end the run early on a checkpoint
(``exit_conditions.py``).

``--loss dpo`` (long2short, DESIGN.md section 3) trains on preference pairs from
``tools/preprocess_data.py --mode dpo`` with ``-log sigmoid(beta * ((S_c - S_c_ref) - (S_r -
S_r_ref)))`` (``rl/dpo.py``; S = summed response-token log-probs). Whole pairs are packed into
rows (``data.sft.PackedPairStream``; --global-batch-size counts rows, the loss is the mean over
the pairs of the global batch). The reference is the model as loaded: before the first
step one forward-only pass computes S_ref of every pair (two floats per pair, kept on every rank
and saved with the checkpoint for resuming) instead of holding a frozen second copy of the
weights, which would double weight memory and add a reference forward to every step. Every
layout works (tp, sp, pp, dp, cp: under cp the per-sequence sums are all-reduced over the cp
group before the loss).
"""

from __future__ import annotations

import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from megatron_k15.arguments import ArgumentError, parse_args


def add_sft_args(p) -> None:
    g = p.add_argument_group("sft data")
    g.add_argument("--train-data", "--data-path", "--train-data-path", dest="train_data", required=True,
                   nargs="+", metavar="[WEIGHT] PREFIX",
                   help="prefix(es) written by preprocess_data.py --mode sft (--mode dpo for --loss dpo); "
                        "several are concatenated, WEIGHT PREFIX pairs blended as in Megatron-LM's "
                        "--data-path (megatron_k15/data/blend.py); Megatron-LM's --data-path and "
                        "--train-data-path are other names for it")
    g.add_argument("--loss", choices=("sft", "dpo"), default="sft",
                   help="sft: next-token loss on responses; dpo: preference pairs against the "
                        "starting model (long2short)")
    g.add_argument("--dpo-beta", type=float, default=0.1,
                   help="DPO inverse temperature beta in -log sigmoid(beta * (margin of log-ratios))")
    g.add_argument("--valid-data", "--valid-data-path", dest="valid_data", default=None, nargs="+", metavar="PREFIX",
                   help="held-out prefix(es) (preprocess_data.py --mode sft): their response-token loss is "
                        "logged as valid_loss before training, every --eval-interval iterations and at the end")
    g.add_argument("--split", default=None, metavar="TRAIN,VALID,TEST",
                   help="Megatron-LM's: shares of every --train-data dataset, in dataset order (e.g. 98,2,0); "
                        "training uses the first, the second is held out and logged as valid_loss like "
                        "--valid-data, the third is left out")
    g.add_argument("--skip-train", action="store_true",
                   help="Megatron-LM's: log the held-out loss (--valid-data or --split) of the --load weights "
                        "and stop without training")
    g.add_argument("--eval-interval", type=int, default=0, help="with --valid-data: also every N iterations")
    g.add_argument("--eval-iters", type=int, default=None,
                   help="with --valid-data: at most N global batches of it (default: all of it)")


def _validate(args) -> None:
    if args.skip_train:  # nothing trains: no schedule to give
        args.train_iters = args.train_iters or 1
        args.lr = 0.0 if args.lr is None else args.lr
    for flag, value in (("--train-iters", args.train_iters), ("--lr", args.lr), ("--seq-length", args.seq_length)):
        if value is None:
            raise ArgumentError(f"{flag} is required for training")
    if args.train_iters < 1:
        raise ArgumentError(f"--train-iters must be >= 1, got {args.train_iters}")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    from megatron_k15.data.blend import BlendError, check_compatible, parse_blend, parse_split
    from megatron_k15.data.indexed import dataset_files, load_summary
    from megatron_k15.data.preference import DPO_MODE, preference_dataset_files

    import os

    if args.loss == "dpo" and not args.dpo_beta > 0:
        raise ArgumentError(f"--dpo-beta must be > 0, got {args.dpo_beta}")
    try:
        args.train_blend = parse_blend(args.train_data, "--train-data")
        args.valid_blend = (parse_blend(args.valid_data, "--valid-data", allow_weights=False)
                            if args.valid_data is not None else None)
        args.split_shares = parse_split(args.split) if args.split is not None else None
    except BlendError as e:
        raise ArgumentError(str(e)) from None
    # held-out data to validate on: --valid-data, or --split's validation share
    args.held_out = args.valid_blend is not None or bool(args.split_shares and args.split_shares[1])
    if args.split_shares is not None:
        if args.valid_data is not None:
            raise ArgumentError("--split and --valid-data both give held-out data; give one")
        if args.loss != "sft":
            raise ArgumentError("--split is for --loss sft (a held-out DPO loss needs its own reference pass)")
    summaries = []
    for prefix in args.train_blend.prefixes:
        files = preference_dataset_files(prefix) if args.loss == "dpo" else dataset_files(prefix, "sft")
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise ArgumentError(f"--train-data {prefix}: missing {missing[0]} (run tools/preprocess_data.py "
                                f"--mode {args.loss})")
        summaries.append(load_summary(prefix))
        mode = summaries[-1].get("mode")
        if mode != args.loss and DPO_MODE in (mode, args.loss):
            raise ArgumentError(f"--train-data {prefix} holds --mode {mode} data but --loss is {args.loss}; "
                                f"pass --loss {mode if mode in ('sft', 'dpo') else 'sft'} or preprocess with "
                                f"--mode {args.loss}")
    if args.valid_blend is not None:
        if args.loss != "sft":
            raise ArgumentError("--valid-data is for --loss sft (a held-out DPO loss needs its own reference pass)")
        for prefix in args.valid_blend.prefixes:
            missing = [f for f in dataset_files(prefix, "sft") if not os.path.exists(f)]
            if missing:
                raise ArgumentError(f"--valid-data {prefix}: missing {missing[0]} (run tools/preprocess_data.py "
                                    f"--mode sft)")
    elif (args.eval_interval or args.eval_iters is not None) and not args.held_out:
        raise ArgumentError("--eval-interval / --eval-iters need held-out data: --valid-data PREFIX or a --split "
                            "with a validation share")
    if args.skip_train and not args.held_out:
        raise ArgumentError("--skip-train only evaluates: give held-out data (--valid-data PREFIX or a --split "
                            "with a validation share)")
    if args.eval_interval < 0 or (args.eval_iters is not None and args.eval_iters < 1):
        raise ArgumentError("--eval-interval must be >= 0 and --eval-iters >= 1")
    try:
        check_compatible(summaries, args.train_blend.prefixes, "--train-data")
    except BlendError as e:
        raise ArgumentError(str(e)) from None
    if args.split_shares is not None:  # each dataset keeps training samples; some held-out ones exist
        from megatron_k15.data.blend import split_range

        sizes = [int(s.get("num_samples", 0)) for s in summaries]
        parts = {part: [len(split_range(n, args.split_shares, part)) for n in sizes]
                 for part in ("train", "valid")}
        for prefix, n, kept in zip(args.train_blend.prefixes, sizes, parts["train"]):
            if kept == 0:
                raise ArgumentError(f"--split {args.split}: {prefix} keeps no training sample of its {n}; "
                                    "raise the train share")
        if args.split_shares[1] and not any(parts["valid"]):
            raise ArgumentError(f"--split {args.split}: no dataset of --train-data ({', '.join(map(str, sizes))} "
                                "samples) has a sample in the validation share; raise it")


def sft_forward_step(model, total_loss_tokens: float):
    """Per microbatch: log-probs through the stage; on the last stage the loss
    -sum(mask * logp) / (response tokens in the global batch). Under context parallelism the
    microbatch is this cp rank's shard (``split_packed_microbatch``) and the loss a partial sum
    over its tokens (gradients and the logged sums add up over cp)."""
    from megatron_k15.training import stage_forward

    def step(mb, hidden):
        out = stage_forward(model, mb, hidden)
        if not model.post_process:
            return out
        loss_sum = -(out * mb["loss_mask"]).sum()
        # tensors: train_step / forward_only bring them to the host once per step
        return loss_sum / total_loss_tokens, (loss_sum.detach(), mb["loss_mask"].sum())
    return step


def dpo_forward_step(model, beta: float, total_pairs: float, cp_group=None):
    """Per microbatch of whole pairs (``PackedPairStream.microbatch`` plus ``ref_logps`` (P, 2)):
    sequence sums S (all-reduced over cp, whose ranks hold shards of every sequence), then on the
    last stage the DPO loss summed over the microbatch's pairs / pairs in the global batch.
    Returns (loss sum, margin sum, pairs with margin > 0, chosen reward sum, rejected reward sum,
    pairs) for logging; under cp every cp rank holds the same values."""
    from megatron_k15.rl.dpo import all_reduce_sum_cp, dpo_loss, dpo_rewards, sequence_logps
    from megatron_k15.training import stage_forward

    def step(mb, hidden):
        out = stage_forward(model, mb, hidden)
        if not model.post_process:
            return out
        ref = mb["ref_logps"].double()
        n = ref.shape[0]
        s = sequence_logps(out.double(), mb["loss_mask"], mb["seq_ids"], 2 * n)
        s = all_reduce_sum_cp(s, cp_group).view(n, 2)
        loss = dpo_loss(s[:, 0], s[:, 1], ref[:, 0], ref[:, 1], beta, reduction="sum")
        rc, rr = dpo_rewards(s[:, 0], s[:, 1], ref[:, 0], ref[:, 1], beta)
        margin = rc - rr
        return loss / total_pairs, (loss.detach(), margin.sum(), (margin > 0).sum(), rc.sum(), rr.sum(), float(n))
    return step


def _to_device(mb: dict, device) -> dict:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in mb.items()}


def _local_microbatch(ctx, stream, rows, device, reference=None) -> dict:
    from megatron_k15.parallel.context import split_packed_microbatch

    mb = stream.microbatch(rows)
    if reference is not None:
        mb["ref_logps"] = reference[mb["pair_index"]].to(torch.float64)
    mb = split_packed_microbatch(mb, ctx.pc.cp_size, ctx.pc.cp_rank,
                                 ctx.pc.tp_size if ctx.model.sequence_parallel else 1)
    return _to_device(mb, device)


@torch.no_grad()
def validation_loss(ctx, stream, mbs: int, device, max_rows: Optional[int] = None) -> dict:
    """{"valid_loss", "valid_tokens"} on every rank: the mean response-token loss over the
    held-out rows (their first epoch, at most ``max_rows``), forward only, in eval mode; rows
    split round-robin over dp."""
    from megatron_k15.training import forward_only, reduce_sums, stage_forward

    model, pc = ctx.model, ctx.pc
    n_rows = stream.rows_in_epoch(0)
    rows = stream.rows(0, n_rows if max_rows is None else min(max_rows, n_rows))[pc.dp_rank::pc.dp_size]

    def step(mb, hidden):
        out = stage_forward(model, mb, hidden)
        if not model.post_process:
            return out
        return None, (float(-(out * mb["loss_mask"]).sum()), float(mb["loss_mask"].sum()))

    was_training = model.training
    model.eval()
    # called with no rows too: under expert parallelism the rank serves the others' experts
    results = forward_only(ctx, [_local_microbatch(ctx, stream, rows[k:k + mbs], device)
                                 for k in range(0, len(rows), mbs)], step)
    model.train(was_training)
    loss_sum, tokens = reduce_sums([sum(r[0] for r in results), sum(r[1] for r in results)], ctx)
    return {"valid_loss": loss_sum / max(tokens, 1.0), "valid_tokens": tokens}


@torch.no_grad()
def dpo_reference_logps(ctx, stream, mbs: int, device, chunk_microbatches: int = 64) -> torch.Tensor:
    """(num_pairs, 2) float64 on every rank: S_ref of (chosen, rejected) for every pair under the
    current weights (zero for pairs the stream leaves out). One forward-only pass: the pairs in
    dataset order, rows split round-robin over dp, ``chunk_microbatches`` at a time."""
    from megatron_k15.rl.dpo import sequence_logps
    from megatron_k15.training import forward_only, stage_forward

    model, pc = ctx.model, ctx.pc
    rows = stream.reference_rows()[pc.dp_rank::pc.dp_size]
    table = torch.zeros(stream.num_pairs, 2, dtype=torch.float64)

    def step(mb, hidden):
        out = stage_forward(model, mb, hidden)
        if not model.post_process:
            return out
        n = mb["pair_index"].numel()
        s = sequence_logps(out.double(), mb["loss_mask"], mb["seq_ids"], 2 * n)
        return None, (mb["pair_index"].cpu(), s.view(n, 2).cpu())

    was_training = model.training
    model.eval()
    step_rows = chunk_microbatches * mbs
    # as many chunks on every dp rank (expert parallelism runs the ranks in step); the last may be empty
    most_rows = -(-len(stream.reference_rows()) // pc.dp_size)
    for start in range(0, most_rows, step_rows):
        part = rows[start:start + step_rows]
        mbs_list = [_local_microbatch(ctx, stream, part[k:k + mbs], device) for k in range(0, len(part), mbs)]
        for index, sums in forward_only(ctx, mbs_list, step):
            table[index] += sums  # a cp rank's partial sums; the all-reduce adds the others
    if was_training:
        model.train()
    # last-stage results; tp ranks hold copies (tp rank 0 counts), cp ranks hold partial sums
    if not (pc.is_last_stage and pc.tp_rank == 0):
        table.zero_()
    t = table.cuda() if dist.get_backend() == "nccl" else table
    dist.all_reduce(t)
    return t.cpu()


def dpo_train_step(ctx, stream, reference: torch.Tensor, consumed: int, gbs: int, mbs: int, beta: float,
                   lr: float, device) -> tuple[dict, float]:
    """One optimizer step on global-batch rows ``consumed .. consumed + gbs`` of a
    ``PackedPairStream``. Returns (metrics identical on every rank, grad norm)."""
    from megatron_k15.training import reduce_sums, train_step

    rows = stream.rows(consumed, gbs)
    total_pairs = float(sum(stream.pairs_in(r) for r in rows))
    per_rank = gbs // ctx.pc.dp_size
    mine = rows[ctx.pc.dp_rank * per_rank:(ctx.pc.dp_rank + 1) * per_rank]
    microbatches = [_local_microbatch(ctx, stream, mine[k:k + mbs], device, reference)
                    for k in range(0, per_rank, mbs)]
    cp_group = ctx.pc.cp_group if ctx.pc.cp_size > 1 else None
    results, grad_norm = train_step(ctx, microbatches, dpo_forward_step(ctx.model, beta, total_pairs, cp_group), lr)
    sums = reduce_sums([sum(r[k] for r in results) for k in range(6)], ctx, split_over_cp=False)
    loss_sum, margin_sum, wins, chosen_sum, rejected_sum, pairs = sums
    n = max(pairs, 1.0)
    metrics = {"loss": loss_sum / n, "dpo_reward_margin": margin_sum / n, "dpo_accuracy": wins / n,
               "dpo_chosen_reward": chosen_sum / n, "dpo_rejected_reward": rejected_sum / n, "dpo_pairs": pairs}
    return metrics, grad_norm


def main(argv=None) -> int:
    start_time = time.time()
    args = parse_args(argv, "Supervised fine-tuning with megatron_k15", add_sft_args, _validate)
    from megatron_k15 import platform
    from megatron_k15.async_save import AsyncCheckpointSaver
    from megatron_k15.checkpointing import load_checkpoint, load_options, save_checkpoint, save_options
    from megatron_k15.data.blend import Blend, open_packed_stream
    from megatron_k15.exit_conditions import ExitConditions
    from megatron_k15.flops import device_peak_tflops, format_throughput, throughput_metrics, training_flops
    from megatron_k15.initialize import destroy, initialize_megatron
    from megatron_k15.manual_gc import ManualGC
    from megatron_k15.parallel.data import lr_schedule
    from megatron_k15.profiling import StepProfiler
    from megatron_k15.training import MetricsLogger, build_train_context, merge_interval, reduce_sums, train_step

    initialize_megatron(args)
    exits = ExitConditions(args, start_time)  # from here on a signal waits for an iteration's end
    cfg = args.model_config
    ctx = build_train_context(args, cfg, seed=args.seed)
    iteration, extra = 0, {}
    if args.load:
        iteration, extra = load_checkpoint(args.load, ctx, **load_options(args))
    consumed = int(extra.get("consumed_rows", 0))
    rank = dist.get_rank()
    dpo = args.loss == "dpo"

    gbs, mbs, dp = args.global_batch_size, args.micro_batch_size, ctx.pc.dp_size
    per_rank = gbs // dp
    device = platform.current_device()
    stream, sizes = open_packed_stream(args.train_blend, args.seq_length, args.seed, pairs=dpo,
                                       split=args.split_shares)
    what = args.train_blend.describe(sizes, "preference pairs" if dpo else "samples")
    if dpo:
        what += f" ({stream.dropped} longer than --seq-length left out)"
    blend_state = {"prefixes": args.train_blend.prefixes, "weights": args.train_blend.weights}
    if args.split_shares is not None:  # the training part is another set of samples
        blend_state["split"] = list(args.split_shares)
    if iteration and extra.get("data_blend") not in (None, blend_state) and rank == 0:
        print(f"[train_sft] warning: --train-data differs from the checkpoint's ({extra['data_blend']}); its "
              f"{consumed} consumed rows now index the new data", flush=True)
    logger = MetricsLogger.for_run(args, rank == 0, iteration)
    if rank == 0:
        if args.load_missing:
            print(f"[train_sft] --load {args.load_missing}: no checkpoint yet, starting from scratch (the "
                  "directory is also --save: the next launch resumes from it)", flush=True)
        print(f"[train_sft] {cfg.num_parameters() / 1e6:.2f}M parameters, {what}, loss {args.loss}, "
              f"tp={ctx.pc.tp_size} pp={ctx.pc.pp_size} cp={ctx.pc.cp_size} dp={dp}, start at iteration {iteration}"
              + (f", LongRoPE {ctx.model.longrope_factors} factors" if ctx.model.longrope_factors else ""), flush=True)
    reference = None
    if dpo:
        reference = extra.get("dpo_reference")
        if reference is not None and tuple(reference.shape) != (stream.num_pairs, 2):
            raise ValueError(f"--load {args.load}: its DPO reference log-probs cover {reference.shape[0]} pairs, "
                             f"--train-data {' '.join(args.train_data)} has {stream.num_pairs}; resume with the same data "
                             f"or start a new run with --finetune")
        if reference is None:
            t0 = time.time()
            reference = dpo_reference_logps(ctx, stream, mbs, device)
            if rank == 0:
                print(f"[train_sft] DPO reference log-probs of {stream.num_pairs} pairs (forward only, the "
                      f"{'loaded' if args.load else 'initial'} weights) in {time.time() - t0:.1f}s", flush=True)

    saved_at = iteration
    schedule = lr_schedule(args)
    valid_stream = None
    if args.valid_data:
        valid_stream, _ = open_packed_stream(args.valid_blend, args.seq_length, args.seed, flag="--valid-data")
    elif args.held_out:  # --split's held-out share, each sample once
        valid_stream, held_out = open_packed_stream(Blend(args.train_blend.prefixes, None), args.seq_length,
                                                    args.seed, split=args.split_shares, part="valid")
        if rank == 0:
            print(f"[train_sft] --split {args.split}: {sum(held_out)} samples held out for validation", flush=True)
    valid_rows = None if args.eval_iters is None else args.eval_iters * gbs

    collector = ManualGC(args)

    def validate(it: int) -> dict:
        with collector.around_eval():
            m = validation_loss(ctx, valid_stream, mbs, device, valid_rows)
        if rank == 0:
            print(f"[train_sft] validation at iteration {it}: loss {m['valid_loss']:.6f} over "
                  f"{m['valid_tokens']:.0f} response tokens", flush=True)
        return m

    if args.skip_train:  # Megatron-LM's: the held-out loss of the loaded weights, then stop
        logger.log(iteration, validate(iteration))
        logger.close()
        destroy()
        return 0
    if valid_stream is not None and iteration == 0:
        logger.log(0, validate(0))

    def save() -> None:
        state = {"consumed_rows": consumed, "data_blend": blend_state}
        if dpo:
            state["dpo_reference"] = reference
        save_checkpoint(args.save, iteration, ctx, state, async_saver=saver, **save_options(args))

    saver = AsyncCheckpointSaver() if args.async_save else None

    profiler = StepProfiler(args, rank)
    collector.start()
    world_size, peak = dist.get_world_size(), device_peak_tflops(args.params_dtype)
    # each iteration's (metrics, seconds, update skipped) since the last record (metrics.jsonl,
    # TensorBoard, W&B: every --tensorboard-log-interval) and since the last console line
    # (every --log-interval); the same list when the two intervals are equal
    record_interval = args.tensorboard_log_interval or args.log_interval
    since_record: list = []
    since_line: list = since_record if record_interval == args.log_interval else []
    shown_norm = float("nan")  # the grad norm of the last update made

    def merged(window: list, lr: float, grad_norm: float) -> dict:
        """The iterations of ``window`` as one (Megatron-LM's --log-interval): losses over all
        their tokens (pairs for DPO), throughput over all their time; lr and grad norm of the last."""
        n, seconds = len(window), sum(w[1] for w in window)
        metrics = merge_interval([w[0] for w in window], "dpo_pairs" if dpo else "loss_tokens")
        if ctx.optimizer.loss_scaler is not None:  # --fp16: the scale now, and the overflowing steps skipped
            metrics.update(loss_scale=ctx.optimizer.loss_scale, skipped_iterations=sum(w[2] for w in window))
        metrics.update({"lr": lr, "grad_norm": grad_norm, "tokens_per_s": n * gbs * args.seq_length / seconds,
                        "iteration_time_s": seconds / n, "epoch": stream.epoch_of(consumed - 1),
                        "peak_memory_bytes": platform.peak_memory_bytes()})
        # model FLOPs of the batches' real sequences (padding and recompute not counted)
        lengths = (stream.positions[i] for row in stream.rows(consumed - n * gbs, n * gbs) for i in row)
        metrics.update(throughput_metrics(training_flops(cfg, lengths), seconds, world_size, peak))
        if ctx.moe_aux_loss is not None:
            metrics["moe_aux_loss"] = ctx.moe_aux_loss
        if ctx.moe_max_load_ratio is not None:
            metrics["moe_max_load_ratio"] = ctx.moe_max_load_ratio
        if ctx.num_zeros_in_grad is not None:
            metrics["num_zeros_in_grad"] = ctx.num_zeros_in_grad
        return metrics

    def log_windows(lr: float, grad_norm: float, record: bool, line: bool, valid: Optional[dict] = None) -> None:
        """Write the record and/or print the console line that are due; a held-out loss goes
        with a record, or alone."""
        recorded = merged(since_record, lr, grad_norm) if record and since_record else None
        if recorded is not None:
            extra = {"params_norm": ctx.optimizer.params_norm()} if args.log_params_norm else {}
            logger.log(iteration, {**recorded, **(valid or {}), **extra})
        elif valid is not None:
            logger.log(iteration, valid)
        if line and since_line and rank == 0:  # (one window for both: its record's numbers)
            metrics = recorded if since_line is since_record and recorded is not None else \
                merged(since_line, lr, grad_norm)
            extra_text = (f" | reward margin {metrics['dpo_reward_margin']:.4f} | accuracy "
                          f"{metrics['dpo_accuracy']:.3f}" if dpo else "")
            if "loss_scale" in metrics:
                extra_text += f" | loss scale {metrics['loss_scale']:.6g} | skipped {metrics['skipped_iterations']}"
            print(f"[train_sft] iteration {iteration}/{args.train_iters} | loss {metrics['loss']:.6f}"
                  f"{extra_text} | lr {lr:.3g} | grad norm {grad_norm:.4f} | {metrics['tokens_per_s']:.0f} tokens/s"
                  f" | {format_throughput(metrics)}", flush=True)
        if record:
            since_record.clear()
        if line:
            since_line.clear()

    while iteration < args.train_iters:
        with profiler.iteration(iteration):
            t0 = time.time()
            lr = schedule(iteration)
            if dpo:
                metrics, grad_norm = dpo_train_step(ctx, stream, reference, consumed, gbs, mbs, args.dpo_beta, lr,
                                                    device)
            else:
                rows = stream.rows(consumed, gbs)
                total_tokens = max(1, sum(stream.loss_tokens(r) for r in rows))
                mine = rows[ctx.pc.dp_rank * per_rank:(ctx.pc.dp_rank + 1) * per_rank]
                microbatches = [_local_microbatch(ctx, stream, mine[k:k + mbs], device)
                                for k in range(0, per_rank, mbs)]
                results, grad_norm = train_step(ctx, microbatches, sft_forward_step(ctx.model, total_tokens), lr)
                loss_sum, tokens = reduce_sums([sum(r[0] for r in results), sum(r[1] for r in results)], ctx)
                metrics = {"loss": loss_sum / max(tokens, 1.0), "loss_tokens": tokens}
            elapsed = time.time() - t0  # before the profiler writes a finished window
        consumed += gbs
        iteration += 1
        collector.after_iteration(iteration)
        valid = None
        if valid_stream is not None and (iteration == args.train_iters
                                         or (args.eval_interval and iteration % args.eval_interval == 0)):
            valid = validate(iteration)
        fatal = ctx.optimizer.unrecoverable_overflow  # skipped, and skipping again would not help
        since_record.append((metrics, elapsed, ctx.optimizer.last_step_skipped))
        if since_line is not since_record:
            since_line.append(since_record[-1])
        if fatal or not ctx.optimizer.last_step_skipped:  # logged: the last update's norm
            shown_norm = grad_norm
        last = iteration == args.train_iters or fatal
        log_windows(lr, shown_norm, record=last or iteration % record_interval == 0,
                    line=last or iteration % args.log_interval == 0, valid=valid)
        if fatal:  # the optimizer skipped the update: the weights are intact
            hint = "lower --lr or check the data"
            if args.fp16 and args.loss_scale is not None:
                hint = "the constant --loss-scale overflows; lower it, or drop it for the dynamic scale"
            elif args.fp16:
                hint = f"it overflowed at --min-loss-scale {args.min_loss_scale}; {hint}"
            if saver is not None:  # a save in flight is clean too: make it current first
                saver.maybe_finalize(blocking=True)
            raise FloatingPointError(f"iteration {iteration}: grad norm is {grad_norm} (update skipped; the last "
                                     f"checkpoint is clean; {hint})")
        if saver is not None:
            saver.maybe_finalize()  # a background save becomes current once every rank has written it
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            save()
            saved_at = iteration
        if exits.stop_after(iteration, args.train_iters, args.save, "train_sft"):
            break
    profiler.close()
    collector.close()
    if since_record or since_line:  # stopped early between two logs
        log_windows(lr, shown_norm, record=True, line=True)
    if args.save and saved_at != iteration:
        save()
    if saver is not None:
        saver.maybe_finalize(blocking=True)
    exits.restore()  # only now: a second signal must not interrupt the final save
    logger.close()
    destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
