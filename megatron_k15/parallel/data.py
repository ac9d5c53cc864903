"""Data parallelism: bucketed gradient reduction overlapped with backward, and a ZeRO-1
distributed Adam with fp32 master weights, global-norm clipping and the LR schedule.

Gradient flow for one optimizer step (dp here is the data x context parallel group):

    backward of the last microbatch: as soon as every grad in a bucket is final, the bucket is
        reduce-scattered (SUM) over dp asynchronously -> each rank holds its shard of the bucket
    finish(): tp all-reduce of sequence-parallel (replicated) grads, pp all-reduce of the tied
        embedding between first and last stage, then their "late" bucket is reduce-scattered
    step(): global grad norm (each element counted once over tp x pp x dp), clip, AdamW on the
        local fp32 master shard (``parallel.adam``: apex, PyTorch fused or unfused), all-gather
        of the updated shards back into the parameters

Losses are normalised by the global token count before backward, so gradients are *summed*
over dp and every layout computes the same update as one rank.

Gradients accumulate over a step's microbatches in fp32 (Megatron-LM's
``--accumulate-allreduce-grads-in-fp32``, which it forces for bf16): a 16-bit parameter's
``.grad`` is added into its fp32 ``main_grad`` view of the bucket as soon as autograd has it
and then dropped, so n microbatches do not round n times to 8 (bf16) mantissa bits; the bucket
is reduced in fp32 as it is. ``fp32_grad_accumulation=False`` keeps 16-bit buckets (half the
gradient memory): each is then copied to fp32 for its reduce-scatter (``staging``).

Under expert parallelism the expert parameters (``parallel.expert``) have buckets of their own,
reduced and sharded over the expert-data-parallel group: each rank's expert gradient already
holds the contributions of the tokens the ep group sent it, so the sum over that group is the
sum over all dp x cp ranks. Their elements are distinct across ep ranks and all count in the norm.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_k15.parallel.adam import adamw_step, resolve_adam_impl
from megatron_k15.parallel.expert import gather_experts, is_expert_param, own_experts
from megatron_k15.parallel.tensor import _all_gather_single, _reduce_scatter_single, grad_is_partial_over_tp


# A 16-bit bucket is copied to fp32 for its reduce-scatter; this many copies may be alive at
# once (the reduction of one bucket overlaps the backward that completes the next).
MAX_STAGED_BUCKETS = 2


def _group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


@dataclass
class _Bucket:
    params: list  # [(name, param, offset within the bucket)]
    numel: int  # padded to a multiple of dp
    late: bool
    group: Optional[object] = None  # the reduction / sharding group (dp x cp, or expert-dp)
    size: int = 1
    rank: int = 0
    grad_data: torch.Tensor = None  # buffer the .grad (or fp32 .main_grad) views live in
    pending: int = 0
    handle: Optional[object] = None
    shard_grad: torch.Tensor = None  # fp32 (numel / dp,) reduced grad of this rank's shard
    # dp > 1 and a 16-bit model: the fp32 copy of grad_data the reduce-scatter reads, alive from
    # the launch to the wait (4 bytes/element; at most MAX_STAGED_BUCKETS of them at a time)
    staging: torch.Tensor = None
    # (start, end) within this rank's shard of the parameters decayed by AdamW and of those
    # counted in the grad norm (adjacent ones merged): no per-element masks
    decay_ranges: list = None
    norm_ranges: list = None

    def shard_range(self) -> tuple[int, int]:
        n = self.numel // self.size
        return self.rank * n, (self.rank + 1) * n


def lr_at(iteration: int, lr: float, min_lr: float, warmup_iters: int, decay_iters: int,
          style: str = "cosine", wsd_decay_iters: int = 0, wsd_decay_style: str = "exponential",
          warmup_init: float = 0.0) -> float:
    """Linear warm-up from ``warmup_init`` to ``lr`` over ``warmup_iters`` (iteration i gets
    ``warmup_init + (lr - warmup_init) * (i + 1) / warmup_iters``), then (Megatron-LM's styles)
    to ``min_lr`` at ``decay_iters`` and ``min_lr`` after:

        constant               lr
        linear / cosine        over decay_iters - warmup_iters, progress p in [0, 1]
        inverse-square-root    max(min_lr, lr * sqrt(max(warmup_iters, 1) / max(iteration, 1)))
        WSD                    lr until decay_iters - wsd_decay_iters, then min_lr + c * (lr - min_lr)
                               with r the fraction of the wsd_decay_iters gone and c = 2 * 0.5^r - 1
                               (exponential), 1 - r (linear), (1 + cos(pi r)) / 2 (cosine) or
                               1 - sqrt(r) (minus_sqrt)"""
    if warmup_iters > 0 and iteration + 1 <= warmup_iters:  # (lengths from samples may be fractional)
        return warmup_init + (lr - warmup_init) * (iteration + 1) / warmup_iters
    if style == "constant":
        return lr
    if style == "inverse-square-root":
        return max(min_lr, lr * math.sqrt(max(warmup_iters, 1) / max(iteration, 1)))
    if iteration >= decay_iters:
        return min_lr if decay_iters > warmup_iters else lr
    if style == "WSD":
        anneal_start = decay_iters - wsd_decay_iters
        if iteration <= anneal_start:
            return lr
        r = (iteration - anneal_start) / wsd_decay_iters
        c = {"exponential": 2.0 * 0.5 ** r - 1.0, "linear": 1.0 - r, "cosine": 0.5 * (1.0 + math.cos(math.pi * r)),
             "minus_sqrt": 1.0 - math.sqrt(r)}[wsd_decay_style]
        return min_lr + (lr - min_lr) * c
    progress = max(0.0, (iteration - warmup_iters) / max(1, decay_iters - warmup_iters))
    if style == "linear":
        return min_lr + (lr - min_lr) * (1.0 - progress)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(args):
    """``iteration -> lr`` from Megatron-LM's flags: --lr, --min-lr, --lr-decay-style, decay over
    --lr-decay-iters (default --train-iters), warm-up over --lr-warmup-iters or
    --lr-warmup-fraction of the decay iterations; WSD's last --lr-wsd-decay-iters in
    --lr-wsd-decay-style. Lengths given in samples (--train-samples) arrive as fractional
    iterations (``arguments``)."""
    decay = args.lr_decay_iters if getattr(args, "lr_decay_iters", None) is not None else args.train_iters
    fraction = getattr(args, "lr_warmup_fraction", None)
    warmup = int(round(fraction * decay)) if fraction is not None else args.lr_warmup_iters
    wsd_iters = getattr(args, "lr_wsd_decay_iters", None) or 0
    wsd_style = getattr(args, "lr_wsd_decay_style", None) or "exponential"
    init = getattr(args, "lr_warmup_init", None) or 0.0
    return lambda iteration: lr_at(iteration, args.lr, args.min_lr, warmup, decay, args.lr_decay_style,
                                   wsd_iters, wsd_style, init)


class DistributedOptimizer:
    """ZeRO-1 AdamW over the data-parallel group with overlapped, bucketed grad reduction.

    ``named_params``: the model stage's trainable parameters. Grads that are partial sums over
    tp (``grad_is_partial_over_tp``: norms under sequence parallelism, QK-norm weights) are
    all-reduced over tp before the dp reduction; tp-replicated parameters (``tp_replicated``)
    count once in the norm; ``tied_embedding`` names the parameter shared by the first and
    last pipeline stage (all-reduced over ``embedding_group``). ``expert_dp_group`` and
    ``ep_group``: expert parallelism (module docstring); expert state in ``state_dict`` is
    gathered over ep to all E experts and ``load_state_dict`` takes either form.
    """

    def __init__(self, named_params, *, lr: float, weight_decay: float = 0.0,
                 betas=(0.9, 0.95), eps: float = 1e-8, clip_grad: float = 0.0,
                 dp_group=None, tp_group=None, grad_norm_group=None, embedding_group=None,
                 tied_embedding: Optional[str] = None, count_tied_in_norm: bool = True,
                 bucket_numel: int = 40_000_000, overlap: bool = True,
                 adam_impl: str = "auto", expert_dp_group=None, ep_group=None,
                 fp32_grad_accumulation: bool = True, loss_scaler=None):
        self.named_params = [(n, p) for n, p in named_params if p.requires_grad]
        device = self.named_params[0][1].device if self.named_params else torch.device("cpu")
        self.adam_impl = resolve_adam_impl(adam_impl, device)
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.clip_grad = clip_grad
        self.dp_group, self.tp_group = dp_group, tp_group
        self.grad_norm_group, self.embedding_group = grad_norm_group, embedding_group
        self.dp_size, self.dp_rank = _group_size(dp_group), _group_rank(dp_group)
        self.ep_group = ep_group if _group_size(ep_group) > 1 else None
        self.expert_dp_group = expert_dp_group if self.ep_group is not None else dp_group
        self.tp_rank = _group_rank(tp_group)
        self.tied_embedding = tied_embedding
        # ``overlap`` may be switched off for a step (e.g. when some dp rank has no microbatch:
        # every rank must then launch the bucket reductions in the same, list order)
        self.overlap = overlap
        self.step_count = 0
        self._sync_enabled = True
        self._staged: deque = deque()  # buckets whose fp32 staging copy is alive, oldest first
        self.fp32_grad_accumulation = fp32_grad_accumulation
        # fp16: the loss was multiplied by ``loss_scaler.scale`` before backward (parallel.loss_scaler)
        self.loss_scaler = loss_scaler
        self.last_step_skipped = False
        self.unrecoverable_overflow = False  # the last step overflowed and the scale cannot back off

        late = [(n, p) for n, p in self.named_params if self._is_late(n, p)]
        early = [(n, p) for n, p in reversed(self.named_params) if not self._is_late(n, p)]
        self.buckets: list[_Bucket] = []
        for expert in (False, True):
            group = self.expert_dp_group if expert else dp_group
            current, size = [], 0
            # reverse registration order ~ the order backward produces grads
            for n, p in (x for x in early if self._is_expert(x[0]) == expert):
                current.append((n, p))
                size += p.numel()
                if size >= bucket_numel:
                    self._add_bucket(current, late=False, group=group)
                    current, size = [], 0
            if current:
                self._add_bucket(current, late=False, group=group)
        if late:
            self._add_bucket(late, late=True, group=dp_group)

        # fp32 master shard and Adam moments; decay and norm counting by parameter ranges
        self.master = [self._shard_of(b, lambda n, p: p.detach()) for b in self.buckets]
        self.exp_avg = [torch.zeros_like(m) for m in self.master]
        self.exp_avg_sq = [torch.zeros_like(m) for m in self.master]
        for b in self.buckets:
            b.decay_ranges = self._shard_ranges(b, lambda n, p: p.dim() > 1)
            b.norm_ranges = self._shard_ranges(b, self._counted_in_norm)
        if overlap:  # hooks are installed once; they act only while ``self.overlap`` is on
            for b in self.buckets:
                if not b.late:
                    for _, p, _ in b.params:
                        p.register_post_accumulate_grad_hook(self._make_hook(b))

    # -- layout -----------------------------------------------------------------------------
    def _is_expert(self, name) -> bool:
        return self.ep_group is not None and is_expert_param(name)

    def _is_late(self, name, p) -> bool:
        return self._partial_over_tp(p) or name == self.tied_embedding

    def _partial_over_tp(self, p) -> bool:
        return _group_size(self.tp_group) > 1 and grad_is_partial_over_tp(p)

    def _counted_in_norm(self, name, p) -> bool:
        """Each gradient element enters the global norm once: tp-replicated parameters only on
        tp rank 0, the tied embedding only on the first stage."""
        if getattr(p, "tp_replicated", False) and self.tp_rank != 0:
            return False
        return not getattr(p, "tied_copy", False)

    def _add_bucket(self, named, late: bool, group) -> None:
        offset, entries = 0, []
        for n, p in named:
            entries.append((n, p, offset))
            offset += p.numel()
        size = _group_size(group)
        numel = int(math.ceil(offset / size) * size)
        device = named[0][1].device
        dtype = torch.float32 if self.fp32_grad_accumulation else named[0][1].dtype
        b = _Bucket(entries, numel, late, group=group, size=size, rank=_group_rank(group))
        b.grad_data = torch.zeros(numel, dtype=dtype, device=device)
        for n, p, off in entries:
            view = b.grad_data[off:off + p.numel()].view_as(p)
            if p.dtype == dtype:
                p.grad = view  # autograd accumulates straight into the bucket
            else:  # 16-bit parameter: into the fp32 main_grad (registered before the overlap hook)
                p.main_grad = view
                p.grad = None
                p.register_post_accumulate_grad_hook(self._accumulate_main_grad)
        if size == 1 and dtype == torch.float32:  # the bucket is its own (whole) fp32 shard: no copy
            b.shard_grad = b.grad_data
        else:
            b.shard_grad = torch.zeros(numel // size, dtype=torch.float32, device=device)
        self.buckets.append(b)

    def _shard_of(self, b: _Bucket, value_fn) -> torch.Tensor:
        """This rank's fp32 shard of the bucket-wide flat tensor built from ``value_fn(name, p)``."""
        flat = torch.zeros(b.numel, dtype=torch.float32, device=b.grad_data.device)
        for n, p, off in b.params:
            flat[off:off + p.numel()] = value_fn(n, p).reshape(-1).float().to(flat.device)
        s, e = b.shard_range()
        return flat[s:e].clone()

    def _shard_ranges(self, b: _Bucket, predicate) -> list[tuple[int, int]]:
        """(start, end) within this rank's shard of the bucket of the parameters for which
        ``predicate(name, p)`` holds, adjacent ones merged."""
        s, e = b.shard_range()
        out: list[tuple[int, int]] = []
        for n, p, off in b.params:
            lo, hi = max(off, s), min(off + p.numel(), e)
            if lo >= hi or not predicate(n, p):
                continue
            if out and out[-1][1] == lo - s:
                out[-1] = (out[-1][0], hi - s)
            else:
                out.append((lo - s, hi - s))
        return out

    # -- gradient reduction -------------------------------------------------------------------
    @staticmethod
    def _accumulate_main_grad(p) -> None:
        if p.grad is None:  # taken already (a hook of an earlier optimizer over the same parameters)
            return
        p.main_grad.add_(p.grad)
        p.grad = None

    def _make_hook(self, b: _Bucket):
        def hook(_p):
            if not self._sync_enabled:
                return
            b.pending -= 1
            if b.pending == 0:
                self._launch(b)
        return hook

    def _launch(self, b: _Bucket) -> None:
        if b.size == 1:
            if b.shard_grad is not b.grad_data:  # a 16-bit bucket: cast into its fp32 shard
                b.shard_grad.copy_(b.grad_data)
            b.handle = None
            return
        # the reduction is summed in fp32: a 16-bit bucket is copied, and the copy must live
        # until the asynchronous reduce-scatter is waited for; at most MAX_STAGED_BUCKETS copies
        # exist at once (the oldest reduction is waited for first), not one per bucket
        if b.grad_data.dtype != torch.float32:
            while len(self._staged) >= MAX_STAGED_BUCKETS:
                self._retire(self._staged.popleft())
            b.staging = b.grad_data.float()
            self._staged.append(b)
        else:
            b.staging = b.grad_data
        b.handle = _reduce_scatter_single(b.shard_grad, b.staging, group=b.group, async_op=True)

    @staticmethod
    def _retire(b: _Bucket) -> None:
        if b.handle is not None:
            b.handle.wait()
            b.handle = None
        b.staging = None

    def zero_grad(self) -> None:
        for b in self.buckets:
            b.grad_data.zero_()
            b.handle = None
            for _, p, _ in b.params:
                if p.grad is not None and p.grad.dtype != b.grad_data.dtype:
                    p.grad = None  # a 16-bit grad not yet added (a backward cut short)
        self._staged.clear()

    def prepare_for_backward(self, is_last_microbatch: bool) -> None:
        """Call before each microbatch's backward; grads are reduced only after the last one."""
        self._sync_enabled = is_last_microbatch and self.overlap
        for b in self.buckets:
            b.pending = len(b.params)

    def finish_grad_sync(self) -> None:
        """Wait for the overlapped buckets; reduce the late ones (SP-replicated, tied embedding)."""
        for b in self.buckets:
            if b.late:
                for n, p, off in b.params:
                    g = b.grad_data[off:off + p.numel()]
                    if self._partial_over_tp(p):
                        dist.all_reduce(g, group=self.tp_group)
                    if n == self.tied_embedding and self.embedding_group is not None:
                        dist.all_reduce(g, group=self.embedding_group)
                self._launch(b)
            elif not self.overlap or not self._sync_enabled or b.pending != 0:
                self._launch(b)
        for b in self.buckets:
            self._retire(b)  # a 16-bit model's fp32 copy of the bucket: free it right away
        self._staged.clear()
        self._sync_enabled = False

    # -- the update -------------------------------------------------------------------------------
    def _global_sum(self, shards: Sequence[torch.Tensor], term, dtype=torch.float32) -> float:
        """sum of ``term(elements)`` over every rank's shards, each parameter element counted once."""
        total = torch.zeros((), dtype=dtype, device=shards[0].device)
        for b, shard in zip(self.buckets, shards):
            for lo, hi in b.norm_ranges:
                total += term(shard[lo:hi])
        if self.grad_norm_group is not None and _group_size(self.grad_norm_group) > 1:
            dist.all_reduce(total, group=self.grad_norm_group)
        return float(total)

    def _global_norm(self, shards: Sequence[torch.Tensor]) -> float:
        """L2 norm over every rank's shards, each parameter element counted once."""
        return math.sqrt(self._global_sum(shards, lambda x: x.float().pow(2).sum()))

    def grad_norm(self) -> float:
        return self._global_norm([b.shard_grad for b in self.buckets])

    @torch.no_grad()
    def grad_num_zeros(self) -> int:
        """Gradient elements that are exactly 0 over the whole model (Megatron-LM's
        ``--log-num-zeros-in-grad``: parameters a step does not reach, e.g. unused embedding
        rows or experts no token chose). Collective over all ranks; call before ``zero_grad``."""
        return int(self._global_sum([b.shard_grad for b in self.buckets], lambda x: (x == 0).sum(),
                                    torch.float64))

    @torch.no_grad()
    def params_norm(self) -> float:
        """The L2 norm of the whole model's (fp32 master) weights: Megatron-LM's
        ``--log-params-norm``, a drift gauge for long runs. Collective over all ranks."""
        return self._global_norm(self.master)

    @property
    def loss_scale(self) -> float:
        """What the caller multiplies the loss by before backward (1 without a loss scaler)."""
        return 1.0 if self.loss_scaler is None else self.loss_scaler.scale

    @torch.no_grad()
    def step(self, lr: Optional[float] = None) -> float:
        """Unscale (fp16), clip by the global norm, AdamW on the local master shard, all-gather
        the parameters. Returns the (unscaled) grad norm before clipping. A non-finite norm (a
        NaN or inf gradient, the same on every rank) skips the update (``last_step_skipped``):
        it would poison the master weights and Adam's moments for good; the loss scaler backs
        off, and the caller sees the norm and decides what to do."""
        lr = self.lr if lr is None else lr
        if self.loss_scaler is not None and self.loss_scaler.scale != 1.0:
            inv = 1.0 / self.loss_scaler.scale  # unscaled before the norm: its squares stay in range
            for b in self.buckets:
                b.shard_grad.mul_(inv)
        norm = self.grad_norm()
        finite = math.isfinite(norm)
        self.last_step_skipped = not finite
        if self.loss_scaler is not None:
            self.unrecoverable_overflow = not finite and not self.loss_scaler.can_back_off
            self.loss_scaler.update(found_inf=not finite)
        else:
            self.unrecoverable_overflow = not finite
        if not finite:
            return norm
        coef = 1.0
        if self.clip_grad and self.clip_grad > 0 and norm > self.clip_grad:
            coef = self.clip_grad / (norm + 1e-6)
        self.step_count += 1
        for i, b in enumerate(self.buckets):
            g = b.shard_grad * coef if coef != 1.0 else b.shard_grad
            adamw_step(self.adam_impl, self.master[i], g, self.exp_avg[i], self.exp_avg_sq[i],
                       step=self.step_count, lr=lr, betas=self.betas, eps=self.eps,
                       weight_decay=self.weight_decay, decay_ranges=b.decay_ranges)
            self._publish(b, self.master[i])
        return norm

    @staticmethod
    def _gather_bucket(b: _Bucket, shard: torch.Tensor) -> torch.Tensor:
        """The whole bucket-wide flat tensor from every rank's shard (over the bucket's group)."""
        if b.size == 1:
            return shard
        full = torch.empty(b.numel, dtype=torch.float32, device=shard.device)
        _all_gather_single(full, shard.contiguous(), group=b.group)
        return full

    def _publish(self, b: _Bucket, shard: torch.Tensor) -> None:
        full = self._gather_bucket(b, shard)
        for _, p, off in b.params:
            p.data.copy_(full[off:off + p.numel()].view_as(p))

    # -- state for checkpoints: per-parameter full tensors (tp/pp-sharded like the model) ---------
    def _full_flat(self, shards: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for b, shard in zip(self.buckets, shards):
            full = self._gather_bucket(b, shard)
            for n, p, off in b.params:
                out[n] = full[off:off + p.numel()].view_as(p).detach().to("cpu", copy=True)  # one copy
        device = self.buckets[0].grad_data.device if self.buckets else None
        return gather_experts(out, self.ep_group, device)

    MOMENTS = ("exp_avg", "exp_avg_sq")

    def state_dict(self, moments: bool = True) -> dict:
        """Collective over dp: every dp rank gets the full per-parameter state (all E experts
        of an expert parameter under expert parallelism), as host copies that later steps do
        not change (``--async-save`` writes them while training goes on). ``moments=False``
        leaves out Adam's moments (two thirds of the bytes) for a run that resets them before
        its next step anyway (RL without --keep-optimizer-state)."""
        state = {"step": self.step_count, "master": self._full_flat(self.master)}
        if self.loss_scaler is not None:
            state["loss_scaler"] = self.loss_scaler.state_dict()
        if moments:
            state.update(exp_avg=self._full_flat(self.exp_avg), exp_avg_sq=self._full_flat(self.exp_avg_sq))
        return state

    def load_state_dict(self, state: dict) -> None:
        """A state without moments (``state_dict(moments=False)``) loads them as zeros."""
        if not all(k in state for k in self.MOMENTS):
            self.reset_state()
        self.step_count = int(state["step"])
        if self.loss_scaler is not None and "loss_scaler" in state:
            self.loss_scaler.load_state_dict(state["loss_scaler"])
        for key, target in (("exp_avg", self.exp_avg), ("exp_avg_sq", self.exp_avg_sq), ("master", self.master)):
            if key in self.MOMENTS and key not in state:
                continue
            tensors = state[key]
            missing = [n for n, _ in self.named_params if n not in tensors]
            if missing:
                raise KeyError(f"optimizer state '{key}' has no entry for parameters {missing[:3]}")
            for i, b in enumerate(self.buckets):
                target[i].copy_(self._shard_of(b, lambda n, p: own_experts(
                    n, tensors[n], p.shape[0], _group_size(self.ep_group), _group_rank(self.ep_group))))
        for i, b in enumerate(self.buckets):
            self._publish(b, self.master[i])

    def reset_state(self) -> None:
        """Fresh Adam moments (Kimi's RL resets the optimizer every iteration); the loss scale,
        a property of the gradients' range, carries on."""
        self.step_count = 0
        for m, v in zip(self.exp_avg, self.exp_avg_sq):
            m.zero_()
            v.zero_()
