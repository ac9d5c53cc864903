"""Device-neutral tensor/sequence-parallel communication (autograd-aware).

megatron-core's sequence-parallel mappings allocate their buffers with ``torch.cuda``; these do
the same collectives on whatever device the tensor lives on, so the model runs under gloo on
CPU and nccl on GPU alike. Sequence parallelism shards activations along dim 0 ([s, b, h]).

    gather_from_sequence_parallel_region:     fwd all-gather(dim 0)   bwd reduce-scatter(dim 0)
    reduce_scatter_to_sequence_parallel_region: fwd reduce-scatter    bwd all-gather
    scatter_to_sequence_parallel_region:      fwd split(dim 0)        bwd all-gather
    gather_from_tensor_parallel_last_dim:     fwd all-gather(dim -1)  bwd split(dim -1)
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
    return x.chunk(world, dim=0)[_rank(group)].contiguous()


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


def gather_from_sequence_parallel_region(x, group):
    return x if _size(group) == 1 else _GatherFromSequenceParallel.apply(x, group)


def reduce_scatter_to_sequence_parallel_region(x, group):
    return x if _size(group) == 1 else _ReduceScatterToSequenceParallel.apply(x, group)


def scatter_to_sequence_parallel_region(x, group):
    return x if _size(group) == 1 else _ScatterToSequenceParallel.apply(x, group)


def gather_from_tensor_parallel_last_dim(x, group):
    return x if _size(group) == 1 else _GatherLastDim.apply(x, group)


def allreduce_sequence_parallel_grads(model: torch.nn.Module, group) -> None:
    """Sum the grads of parameters replicated across tp but fed different sequence shards.

    Under sequence parallelism each tp rank's RMSNorm weights see only its slice of the
    sequence, so their gradients are partial sums (Megatron marks them ``sequence_parallel``).
    """
    if _size(group) == 1:
        return
    grads = [
        p.grad for p in model.parameters()
        if getattr(p, "sequence_parallel", False) and p.grad is not None
    ]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
