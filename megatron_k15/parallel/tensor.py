"""Device-neutral tensor/sequence-parallel communication (autograd-aware).

megatron-core's sequence-parallel mappings allocate their buffers with ``torch.cuda``; these do
the same collectives on whatever device the tensor lives on, so the model runs under gloo on
CPU and nccl on GPU alike. Sequence parallelism shards activations along dim 0 ([s, b, h]).

    gather_from_sequence_parallel_region:     fwd all-gather(dim 0)   bwd reduce-scatter(dim 0)
    reduce_scatter_to_sequence_parallel_region: fwd reduce-scatter    bwd all-gather
    scatter_to_sequence_parallel_region:      fwd split(dim 0)        bwd all-gather
    gather_from_tensor_parallel_last_dim:     fwd all-gather(dim -1)  bwd split(dim -1)
    linear_with_sequence_parallel_gather:     fwd all-gather(dim 0) + X @ W^T, saving only
                                              the local shard of X; bwd re-gathers X for dW,
                                              reduce-scatters dX (Megatron's column layer)
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# torch >= 2.13 renames the tensor-to-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@torch.no_grad()
def all_gather_dim0(x: torch.Tensor, group) -> torch.Tensor:
    world = _size(group)
    if world == 1:
        return x
    x = x.contiguous()
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)
    return out


@torch.no_grad()
def reduce_scatter_dim0(x: torch.Tensor, group) -> torch.Tensor:
    world = _size(group)
    if world == 1:
        return x
    if x.shape[0] % world:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by the tp size {world}")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x, group=group)
    return out


def split_dim0(x: torch.Tensor, group) -> torch.Tensor:
    world = _size(group)
    if world == 1:
        return x
    if x.shape[0] % world:
        raise ValueError(f"sequence length {x.shape[0]} is not divisible by the tp size {world}")
    # a copy, not a view: a view would keep the whole unsplit tensor alive for as long as the
    # shard is referenced (e.g. saved for backward by the first layer)
    return x.chunk(world, dim=0)[_rank(group)].clone(memory_format=torch.contiguous_format)


def all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    world = _size(group)
    if world == 1:
        return x
    gathered = all_gather_dim0(x.movedim(-1, 0), group)
    return gathered.movedim(0, -1).contiguous()


class _GatherFromSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_dim0(grad, ctx.group), None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return reduce_scatter_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim0(grad, ctx.group), None


class _ScatterToSequenceParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return split_dim0(x, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_dim0(grad, ctx.group), None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather_last_dim(x, group)

    @staticmethod
    def backward(ctx, grad):
        world = _size(ctx.group)
        if world == 1:
            return grad, None
        return grad.chunk(world, dim=-1)[_rank(ctx.group)].contiguous(), None


class _AllReduceSum(torch.autograd.Function):
    """y = sum over the group of x, where every rank goes on to use y: the gradient of each
    rank's x is the sum of all ranks' gradients of y (an all-reduce both ways, unlike
    megatron-core's reduce-from-region whose backward is the identity)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x, group):
    """Differentiable sum over ``group`` of a value each rank uses afterwards."""
    return x if _size(group) == 1 else _AllReduceSum.apply(x, group)


class _LinearWithSequenceParallelGather(torch.autograd.Function):
    """out = all_gather(x, dim 0) @ W^T (+ b), saving x's local shard instead of the gathered
    input: e * (N - N / tp) * h bytes less per column layer, paid with a second all-gather in
    backward (Megatron's ``LinearWithGradAccumulationAndAsyncCommunication`` with SP)."""

    @staticmethod
    def forward(ctx, x, weight, bias, group):
        ctx.group = group
        ctx.use_bias = bias is not None
        ctx.save_for_backward(x, weight)
        total = all_gather_dim0(x, group)
        out = torch.matmul(total, weight.t())
        if bias is not None:
            out = out + bias
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        group, world = ctx.group, _size(ctx.group)
        # re-gather the input (overlapped with the input-gradient GEMM), then reduce-scatter the
        # input gradient (overlapped with the weight-gradient GEMM), in Megatron's order
        x = x.contiguous()
        total = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        handle = _all_gather_single(total, x, group=group, async_op=True)
        grad_total = grad_out.matmul(weight).contiguous()
        handle.wait()
        grad_x = torch.empty(x.shape, dtype=grad_total.dtype, device=x.device)
        handle = _reduce_scatter_single(grad_x, grad_total, group=group, async_op=True)
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g2d = grad_out.contiguous().view(-1, grad_out.shape[-1])
            if ctx.needs_input_grad[1]:
                grad_weight = g2d.t().matmul(total.view(-1, total.shape[-1]))
            if ctx.use_bias and ctx.needs_input_grad[2]:
                grad_bias = g2d.sum(dim=0)
        handle.wait()
        return grad_x, grad_weight, grad_bias, None


def linear_with_sequence_parallel_gather(x, weight, bias, group):
    """Column-parallel linear on a sequence-parallel input [s / tp, b, h] -> [s, b, out / tp]."""
    if _size(group) == 1:
        out = torch.matmul(x, weight.t())
        return out if bias is None else out + bias
    return _LinearWithSequenceParallelGather.apply(x, weight, bias, group)


def gather_from_sequence_parallel_region(x, group):
    return x if _size(group) == 1 else _GatherFromSequenceParallel.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x, group):
    return x if _size(group) == 1 else _ReduceScatterToSequenceParallel.apply(x, group)


def scatter_to_sequence_parallel_region(x, group):
    return x if _size(group) == 1 else _ScatterToSequenceParallel.apply(x, group)


def gather_from_tensor_parallel_last_dim(x, group):
    return x if _size(group) == 1 else _GatherLastDim.apply(x, group)


def grad_is_partial_over_tp(p: torch.Tensor) -> bool:
    """A parameter replicated across tp whose gradient on each rank is a partial sum, to be
    all-reduced over tp: under sequence parallelism the RMSNorm weights, which see only the
    rank's slice of the sequence (Megatron marks them ``sequence_parallel``); with QK-norm the
    per-head q/k norm weights, which see only the rank's heads (``tp_partial_grad``)."""
    return getattr(p, "sequence_parallel", False) or getattr(p, "tp_partial_grad", False)


def allreduce_sequence_parallel_grads(model: torch.nn.Module, group) -> None:
    """Sum, over tp, the grads that are partial sums (``grad_is_partial_over_tp``)."""
    if _size(group) == 1:
        return
    grads = [p.grad for p in model.parameters() if grad_is_partial_over_tp(p) and p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
