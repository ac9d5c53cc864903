"""What every trainer shares: the parallel context, building a model stage and its optimizer,
one optimizer step through the pipeline schedule, and metrics reduced to rank 0.

``train_sft`` and ``train_rl`` differ only in their data and their loss; both call
``train_step(ctx, microbatches, forward_step, shape_fn, lr)``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_k15 import platform
from megatron_k15.models.config import GPTConfig
from megatron_k15.models.gpt import GPTModel
from megatron_k15.models.sharding import pipeline_layer_ranges
from megatron_k15.parallel.data import DistributedOptimizer
from megatron_k15.parallel.loss_scaler import loss_scaler_from_args
from megatron_k15.parallel.pipeline import StageComm, forward_backward
from megatron_k15.profiling import phase


@dataclass
class ParallelContext:
    """This rank's coordinates and process groups (from megatron-core's parallel_state)."""

    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    cp_size: int
    cp_rank: int
    dp_size: int  # data parallel only
    dp_rank: int
    tp_group: Any
    pp_group: Any
    cp_group: Any
    dp_group: Any
    dp_cp_group: Any  # gradients are reduced over data x context parallel ranks
    embedding_group: Any
    # expert parallelism (parallel/expert.py): experts split over ep ranks of the dp x cp ones;
    # their gradients are reduced over the expert-data-parallel group (dp x cp / ep ranks)
    ep_size: int = 1
    ep_rank: int = 0
    ep_group: Any = None
    expert_dp_group: Any = None

    @classmethod
    def from_parallel_state(cls) -> "ParallelContext":
        ps = parallel_state
        pp = ps.get_pipeline_model_parallel_world_size()
        return cls(
            tp_size=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_size=pp, pp_rank=ps.get_pipeline_model_parallel_rank(),
            cp_size=ps.get_context_parallel_world_size(), cp_rank=ps.get_context_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
            tp_group=ps.get_tensor_model_parallel_group(), pp_group=ps.get_pipeline_model_parallel_group(),
            cp_group=ps.get_context_parallel_group(), dp_group=ps.get_data_parallel_group(),
            dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
            # only the first and last stage hold the (tied) embedding and its group
            embedding_group=ps.get_embedding_group()
            if pp > 1 and ps.get_pipeline_model_parallel_rank() in (0, pp - 1) else None,
            ep_size=ps.get_expert_model_parallel_world_size(), ep_rank=ps.get_expert_model_parallel_rank(),
            ep_group=ps.get_expert_model_parallel_group(), expert_dp_group=ps.get_expert_data_parallel_group(),
        )

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def writes_model_shard(self) -> bool:
        """One writer per (tp, pp) shard."""
        return self.dp_rank == 0 and self.cp_rank == 0


@dataclass
class TrainContext:
    model: GPTModel
    optimizer: DistributedOptimizer
    comm: StageComm
    pc: ParallelContext
    layer_ranges: list
    moe_aux_loss_coeff: float = 0.0
    # the last step's load-balancing loss, mean per MoE layer and microbatch (None without one)
    moe_aux_loss: Optional[float] = None
    # --log-num-zeros-in-grad: the last step's count of gradient elements equal to 0
    log_num_zeros_in_grad: bool = False
    num_zeros_in_grad: Optional[int] = None
    # --moe-router-bias-update-rate: the expert biases move towards balance after every step;
    # the last step's most loaded expert's tokens over the mean (max over layers and stages)
    moe_bias_update_rate: float = 0.0
    moe_max_load_ratio: Optional[float] = None


def stage_layer_ranges(cfg: GPTConfig, pp: int, first: Optional[int] = None, last: Optional[int] = None):
    return pipeline_layer_ranges(cfg.num_layers, pp, first, last)


def sync_tied_embedding(model: GPTModel, pc: ParallelContext) -> None:
    """Give the last stage's copy of a tied embedding the first stage's values."""
    if model.tied_embedding_name is None:
        return
    with torch.no_grad():
        w = model.embedding.weight
        if not pc.is_first_stage:
            w.zero_()
        dist.all_reduce(w.data, group=pc.embedding_group)


def build_stage_model(args, cfg: GPTConfig, pc: ParallelContext, ranges) -> GPTModel:
    """This rank's model stage (tp shard of the layers in ``ranges[pp_rank]``) as the flags ask:
    attention backend, dtype, recompute, log-prob implementation, cp, LongRoPE's factors (by the
    run's longest sequence: ``args.longest_sequence``, RL's, or --seq-length). Weights
    uninitialised until ``reset_parameters`` or a checkpoint load."""
    return GPTModel(
        cfg, tp_group=pc.tp_group, sequence_parallel=getattr(args, "sequence_parallel", True),
        pp_rank=pc.pp_rank, pp_size=pc.pp_size, layer_ranges=ranges,
        attention_backend=getattr(args, "attention_backend", "auto"),
        params_dtype=getattr(args, "params_dtype", torch.float32),
        recompute_granularity=getattr(args, "recompute_granularity", None), device=platform.current_device(),
        recompute_num_layers=(getattr(args, "recompute_num_layers", None)
                              if getattr(args, "recompute_method", None) == "block" else None),
        logprob_impl=getattr(args, "logprob_impl", "auto"),
        cp_group=pc.cp_group if pc.cp_size > 1 else None,
        cp_comm_type=getattr(args, "cp_comm_type", "ring"),
        ep_group=pc.ep_group if pc.ep_size > 1 else None,
        moe_grouped_gemm=getattr(args, "moe_grouped_gemm", None),
        longrope_factors=getattr(args, "longrope_factors", "auto"),
        max_sequence_length=getattr(args, "longest_sequence", None) or getattr(args, "seq_length", None),
    )


def build_train_context(args, cfg: GPTConfig, seed: Optional[int] = None) -> TrainContext:
    """Model stage for this rank (layout-independent random init from ``seed``), its optimizer
    and its pipeline links. ``args`` carries the Megatron flags (lr, betas, clip, ...)."""
    pc = ParallelContext.from_parallel_state()
    ranges = stage_layer_ranges(cfg, pc.pp_size, getattr(args, "decoder_first_pipeline_num_layers", None),
                                getattr(args, "decoder_last_pipeline_num_layers", None))
    model = build_stage_model(args, cfg, pc, ranges)
    if seed is not None:
        model.reset_parameters(seed)
    sync_tied_embedding(model, pc)
    model.train()
    optimizer = DistributedOptimizer(
        model.named_parameters(), lr=args.lr or 0.0, weight_decay=getattr(args, "weight_decay", 0.0),
        betas=(getattr(args, "adam_beta1", 0.9), getattr(args, "adam_beta2", 0.95)),
        eps=getattr(args, "adam_eps", 1e-8), clip_grad=getattr(args, "clip_grad", 0.0),
        adam_impl=getattr(args, "adam_impl", "auto"),
        dp_group=pc.dp_cp_group, tp_group=pc.tp_group, grad_norm_group=dist.group.WORLD,
        expert_dp_group=pc.expert_dp_group if pc.ep_size > 1 else None,
        ep_group=pc.ep_group if pc.ep_size > 1 else None,
        embedding_group=pc.embedding_group, tied_embedding=model.tied_embedding_name,
        bucket_numel=getattr(args, "grad_bucket_numel", 40_000_000),
        fp32_grad_accumulation=getattr(args, "accumulate_allreduce_grads_in_fp32", True),
        loss_scaler=loss_scaler_from_args(args),
    )
    comm = StageComm(pc.pp_group if pc.pp_size > 1 else None, platform.current_device(),
                     getattr(args, "params_dtype", torch.float32))
    coeff = float(getattr(args, "moe_aux_loss_coeff", 0.0) or 0.0) if cfg.is_moe else 0.0
    return TrainContext(model, optimizer, comm, pc, ranges, moe_aux_loss_coeff=coeff,
                        log_num_zeros_in_grad=bool(getattr(args, "log_num_zeros_in_grad", False)),
                        moe_bias_update_rate=float(getattr(args, "moe_router_bias_update_rate", 0.0) or 0.0))


def hidden_shape_fn(model: GPTModel) -> Callable[[dict], tuple]:
    """Shape of the activation a stage receives for a microbatch with ``input_ids`` (b, s).

    Under context parallelism a microbatch holds this cp rank's zigzag shard (see
    ``parallel.context.split_packed_microbatch``), so ``s`` is the local length; sequence parallelism
    then splits it over tp."""
    def shape(mb):
        b, s = mb["input_ids"].shape
        local = s // model.tp_size if model.sequence_parallel else s
        return (local, b, model.config.hidden_size)
    return shape


def stage_forward(model: GPTModel, mb: dict, hidden):
    """This pipeline stage on a microbatch, packed (``cu_seqlens``, b = 1) or padded (b, s):
    token log-probs (b, s) on the last stage, hidden states for the next stage elsewhere.
    ``token_mask`` (b, s), 0 on padding, keeps padding out of the MoE load-balancing loss."""
    return model(input_ids=mb["input_ids"] if model.pre_process else None,
                 position_ids=mb.get("position_ids"),
                 labels=mb["labels"] if model.post_process else None,
                 cu_seqlens=mb.get("cu_seqlens"), max_seqlen=mb.get("max_seqlen"), hidden=hidden,
                 token_mask=mb.get("token_mask"))


def empty_microbatch(model: GPTModel) -> dict:
    """A microbatch without real tokens (token_mask 0): the shortest padded row every layout
    accepts (even under cp, a multiple of tp under sequence parallelism)."""
    width = 2 * model.tp_size
    device = next(model.parameters()).device
    zeros = torch.zeros(1, width, dtype=torch.long, device=device)
    return {"input_ids": zeros, "labels": zeros, "token_mask": zeros, "empty": True}


def pad_for_expert_parallel(ctx: TrainContext, microbatches: Sequence[dict], forward_step, model=None):
    """Under expert parallelism every MoE layer call is a collective over the ep group, so its
    ranks must run as many microbatches as each other: this rank's list grows to the most any
    dp x cp rank has, with empty microbatches whose loss is 0 x the output (their backward
    still serves the other ranks' tokens) and whose results are dropped. Returns (microbatches,
    forward_step, number of real microbatches). ``model``: the model stage ``forward_step``
    runs (default the context's; e.g. the frozen reference), whose experts the empty ones serve."""
    model = ctx.model if model is None else model
    n = len(microbatches)
    if ctx.pc.ep_size == 1:
        return microbatches, forward_step, n
    most = int(group_reduce(float(n), ctx.pc.dp_cp_group, dist.ReduceOp.MAX))
    padded = list(microbatches) + [empty_microbatch(model) for _ in range(most - n)]

    def step(mb, hidden):
        if not mb.get("empty"):
            return forward_step(mb, hidden)
        out = stage_forward(model, mb, hidden)
        return (out.sum() * 0.0, None) if model.post_process else out

    return padded, step, n


def train_step(ctx: TrainContext, microbatches: Sequence[dict], forward_step, lr: float) -> tuple[list, float]:
    """Zero grads, run 1F1B over the microbatches (grads reduced over dp during the last
    backward), step the optimizer. Returns (last-stage results, grad norm). Under fp16 the
    losses are multiplied by the optimizer's loss scale before backward (it divides it out)."""
    opt = ctx.optimizer
    opt.zero_grad()
    scale = opt.loss_scale
    if ctx.moe_aux_loss_coeff > 0:  # coeff x the mean over the step's microbatches (all dp ranks)
        total = group_reduce(float(len(microbatches)), ctx.pc.dp_group if ctx.pc.dp_size > 1 else None)
        # the load-balancing gradient enters backward on its own: it takes the loss scale too
        ctx.model.set_moe_aux_loss(ctx.moe_aux_loss_coeff, scale / max(total, 1.0))
    if ctx.moe_bias_update_rate > 0:
        ctx.model.count_expert_tokens(True)
    microbatches, forward_step, real = pad_for_expert_parallel(ctx, microbatches, forward_step)
    n = len(microbatches)
    results = forward_backward(
        forward_step, microbatches, ctx.comm, hidden_shape_fn(ctx.model),
        before_backward=lambda i: opt.prepare_for_backward(i == n - 1), loss_scale=scale,
    )[:real]
    with phase("grad sync"):
        opt.finish_grad_sync()
    with phase("optimizer"):
        grad_norm = opt.step(lr)
    if ctx.moe_bias_update_rate > 0:  # the step's loads over every dp x cp rank, then the biases move
        ratio = ctx.model.update_expert_bias(ctx.moe_bias_update_rate, ctx.pc.dp_cp_group)
        ctx.moe_max_load_ratio = group_reduce(ratio, ctx.pc.pp_group if ctx.pc.pp_size > 1 else None,
                                              dist.ReduceOp.MAX)
    if ctx.log_num_zeros_in_grad:
        ctx.num_zeros_in_grad = opt.grad_num_zeros()
    if ctx.moe_aux_loss_coeff > 0:
        ctx.moe_aux_loss = _mean_moe_aux_loss(ctx)
    return results_to_host(results), grad_norm


def results_to_host(results: list) -> list:
    """The last stage's per-microbatch results with every 0-d tensor in a result tuple turned
    into a float, all in one device-to-host copy: forward steps return their logged sums as
    tensors, so the host never waits for one microbatch's loss before queueing the next."""
    def scalar(v):
        return torch.is_tensor(v) and v.dim() == 0

    found = [v.detach().double() for r in results if isinstance(r, tuple) for v in r if scalar(v)]
    if not found:
        return list(results)
    values = iter(torch.stack(found).tolist())
    return [tuple(next(values) if scalar(v) else v for v in r) if isinstance(r, tuple) else r for r in results]


def merge_interval(window: Sequence[dict], count_key: str) -> dict:
    """Per-iteration metrics (each a mean over ``count_key`` units: tokens, pairs) as one over
    all the iterations: the means weighted by the units, the units summed."""
    out = {count_key: sum(m[count_key] for m in window)}
    for key in dict.fromkeys(k for m in window for k in m):  # each key over the iterations that have it
        if key != count_key:
            have = [m for m in window if key in m]
            total = sum(m[count_key] for m in have)
            out[key] = sum(m[key] * m[count_key] for m in have) / total if total else have[-1][key]
    return out


def group_reduce(value: float, group, op=dist.ReduceOp.SUM, dtype=torch.float64) -> float:
    """``value`` reduced over ``group`` (None or a group of one: this rank's own value)."""
    t = torch.tensor([value], dtype=dtype, device=platform.current_device())
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t.item()


def _mean_moe_aux_loss(ctx: TrainContext) -> float:
    """The recorded load-balancing losses of every stage and dp rank, averaged."""
    values = ctx.model.take_moe_aux_losses()
    total, count = reduce_sums([sum(values), len(values)], ctx, every_stage=True)
    # the cp ranks' terms add up to one sequence's aux (MoEMLP): count each layer forward once
    count /= ctx.pc.cp_size
    return total / count if count > 0 else 0.0


def forward_only(ctx: TrainContext, microbatches: Sequence[dict], forward_step, model=None) -> list:
    """Forward passes through the pipeline (no grad); ``model``: the stage ``forward_step`` runs
    if not the context's (``pad_for_expert_parallel``)."""
    microbatches, forward_step, real = pad_for_expert_parallel(ctx, microbatches, forward_step, model)
    return results_to_host(forward_backward(forward_step, microbatches, ctx.comm, hidden_shape_fn(ctx.model),
                                            forward_only=True)[:real])


def reduce_sums(values: Sequence[float], ctx: TrainContext, split_over_cp: bool = True,
                every_stage: bool = False) -> list[float]:
    """Sum per-rank partial sums computed on the last stage over pp (others add zero), dp and
    cp; every rank gets the totals. Each cp rank holds different tokens (its zigzag shard), so
    its sums are partial and all cp ranks count (``split_over_cp=False``: the values are the
    same on every cp rank and only cp rank 0 counts). tp ranks hold the same values; tp rank 0
    counts. ``every_stage``: each pipeline stage contributes its own part (per-layer values)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    counts = ((every_stage or ctx.pc.is_last_stage) and ctx.pc.tp_rank == 0
              and (split_over_cp or ctx.pc.cp_rank == 0))
    if not counts:
        t.zero_()
    dist.all_reduce(t)
    return t.cpu().tolist()


class MetricsLogger:
    """metrics.jsonl (one object per logged iteration) and TensorBoard scalars in ``log_dir``,
    and Weights & Biases (``wandb_logging``), on rank 0."""

    def __init__(self, log_dir: Optional[str], enabled: bool, wandb_run=None):
        self.enabled = enabled and log_dir is not None
        self.path = None
        self.tb = None
        self.wandb = wandb_run
        if not self.enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "metrics.jsonl")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir)
        except Exception:  # noqa: BLE001 - tensorboard is optional; metrics.jsonl always works
            self.tb = None

    @classmethod
    def for_run(cls, args, enabled: bool, start_iteration: int) -> "MetricsLogger":
        """The logger of a training command (--tensorboard-dir, --wandb-*) that starts at
        ``start_iteration`` (> 0 when resuming: later records of the log are dropped)."""
        wandb_run = None
        if enabled and getattr(args, "wandb_project", None):
            from megatron_k15.wandb_logging import WandbRun

            wandb_run = WandbRun(args, start_iteration)
        logger = cls(args.tensorboard_dir, enabled, wandb_run)
        logger.truncate_after(start_iteration)
        return logger

    def truncate_after(self, iteration: int) -> None:
        """On resume, drop records of iterations that the checkpoint does not include."""
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = [line for line in open(self.path) if line.strip() and json.loads(line)["iteration"] <= iteration]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def log(self, iteration: int, metrics: dict) -> None:
        """Every metric to metrics.jsonl; the numeric ones to TensorBoard and W&B."""
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self.wandb is not None:
            self.wandb.log(iteration, scalars)
        if not self.enabled:
            return
        record = {"iteration": iteration, "time": time.time(), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, iteration)
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
