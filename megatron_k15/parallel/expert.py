"""Expert parallelism: the experts of every MoE layer split over the ranks of the expert-parallel
(ep) group, tokens travelling to their experts and back by all-to-all (Megatron's
``--expert-model-parallel-size``, GShard's layout).

Groups (megatron-core's ``parallel_state``): the ep group is carved out of the data x context
parallel ranks of one tp rank and pipeline stage, so ep divides dp x cp; ep rank r holds
experts [r E/ep, (r+1) E/ep) (each split over tp as without ep). The expert-data-parallel
group (dp x cp / ep ranks) holds the same experts: expert gradients are reduced, and their
optimizer state sharded, over it instead of dp x cp.

One MoE layer's forward with ep > 1, on every rank of the ep group at once::

    route locally; copies of the tokens grouped by global expert     (T k rows, counts per expert)
    all-to-all of the counts   -> how many rows each source sends to each local expert
    all-to-all of the rows     -> rows from every source, grouped by source then local expert
    regroup by local expert, one GEMM pair per expert, undo the regrouping
    all-to-all back            -> every row where it came from, in its original order

The backward is the same exchanges in reverse (``all_to_all``'s autograd). Because every layer
call is a collective, the ranks of an ep group run the same number of forwards and backwards:
trainers pad with empty microbatches (``training.pad_for_expert_parallel``), the generation
engine runs ``MoEMLP.serve_experts`` while another rank still decodes.

Checkpoints stay ep-independent: a saved shard holds all E experts (``gather_experts`` before
writing) and a model keeps its slice on load (``own_experts``), so any ep loads any other.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def is_expert_param(name: str) -> bool:
    """Parameters stacked over the experts of a layer, (E, out, in): what ep splits (dim 0)."""
    return ".mlp.experts." in name


class _AllToAll(torch.autograd.Function):
    """Rows of ``x`` split by ``send_splits`` to the ranks of ``group``; ``recv_splits`` rows
    arrive from each. Backward sends the gradient rows back the same way reversed."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), recv_splits, send_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, send_splits, recv_splits, group)


def exchange_counts(per_expert: torch.Tensor, group) -> torch.Tensor:
    """(E,) rows this rank sends to each global expert -> (ep, E / ep): rows each source rank
    sends to each of this rank's experts."""
    ep = dist.get_world_size(group)
    received = torch.empty_like(per_expert)
    dist.all_to_all_single(received, per_expert.contiguous(), group=group)
    return received.view(ep, -1)


def run_experts_parallel(grouped: torch.Tensor, per_expert: torch.Tensor, group, run_local) -> torch.Tensor:
    """The expert outputs of ``grouped`` (rows sorted by global expert, ``per_expert`` (E,)
    rows each), computed by the ranks that own the experts. ``run_local(rows, counts)`` runs
    this rank's experts on rows grouped by local expert (``counts`` (E / ep,) on the device,
    ``host_counts`` the same as a list)."""
    ep = dist.get_world_size(group)
    recv = exchange_counts(per_expert, group)  # [source, local expert]
    both = torch.cat([per_expert, recv.reshape(-1)]).tolist()  # one host sync
    num_experts = per_expert.numel()
    counts, local = both[:num_experts], num_experts // ep
    recv_list = [both[num_experts + s * local:num_experts + (s + 1) * local] for s in range(ep)]
    send_splits = [sum(counts[r * local:(r + 1) * local]) for r in range(ep)]
    recv_splits = [sum(row) for row in recv_list]
    received = all_to_all(grouped, send_splits, recv_splits, group)
    # rows arrive grouped by (source, local expert); order them by (local expert, source)
    segment = torch.repeat_interleave(torch.arange(ep * local, device=grouped.device),
                                      recv.reshape(-1).to(grouped.device), output_size=sum(recv_splits))
    order = torch.argsort((segment % local) * ep + segment // local, stable=True)
    # rows per local expert, on the device (the grouped GEMM then waits for nothing on the
    # host) and, since they were read here anyway, on the host (for the per-expert loop)
    out = run_local(received.index_select(0, order), recv.sum(0),
                    [sum(recv_list[s][e] for s in range(ep)) for e in range(local)])
    out = out.index_select(0, torch.argsort(order))  # back to (source, local expert) order
    return all_to_all(out, recv_splits, send_splits, group)


def own_experts(name: str, tensor: torch.Tensor, local_experts: int, ep_size: int, ep_rank: int) -> torch.Tensor:
    """``tensor`` for the parameter ``name`` of a rank holding ``local_experts`` experts: this
    ep rank's slice when it is an expert tensor stacked over all of them (a checkpoint's, or
    gathered optimizer state), otherwise as it is (this rank's already, or no expert)."""
    if ep_size == 1 or not is_expert_param(name) or tensor.shape[0] != local_experts * ep_size:
        return tensor
    return tensor[ep_rank * local_experts:(ep_rank + 1) * local_experts]


@torch.no_grad()
def gather_experts(state: dict[str, torch.Tensor], group, device: Optional[torch.device] = None,
                   to_cpu: bool = False) -> dict:
    """Collective over the ep group: ``state`` with every expert tensor (``is_expert_param``)
    gathered to all E experts, in place of this rank's E / ep. Tensors travel on ``device``
    (the communication device: a GPU under nccl) and come back where they were, or to the CPU
    (``to_cpu``: one tensor of all experts at a time on the device, as for a checkpoint)."""
    if group is None or dist.get_world_size(group) == 1:
        return state
    out = dict(state)
    for name in sorted(n for n in state if is_expert_param(n)):
        t = state[name]
        src = t.to(device) if device is not None else t
        parts = [torch.empty_like(src) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, src.contiguous(), group=group)
        out[name] = torch.cat(parts).to("cpu" if to_cpu else t.device)
        del parts
    return out
