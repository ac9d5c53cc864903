"""Direct preference optimisation (DPO), the long2short loss of Kimi k1.5 (DESIGN.md section 3).

For a pair (prompt x, chosen y_c, rejected y_r) with sequence log-probs
S = sum over response tokens of log pi(y_t | x, y_<t) under the policy and S_ref under the
frozen reference (the model as it was when training started):

    r_c = beta * (S_c - S_c_ref),   r_r = beta * (S_r - S_r_ref)          (implicit rewards)
    L   = -log sigmoid(r_c - r_r) = softplus(r_r - r_c)
    dL/dS_c = -beta * sigmoid(r_r - r_c),   dL/dS_r = +beta * sigmoid(r_r - r_c)

Only S_c and S_r carry gradients; the reference terms are constants (``train_sft --loss dpo``
computes them once, in a forward-only pass before the first step, so no second copy of the
weights is held).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["dpo_loss", "dpo_rewards", "sequence_logps", "all_reduce_sum_cp"]


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, seq_ids: torch.Tensor,
                   num_seqs: int) -> torch.Tensor:
    """Per-sequence sums ``S_k = sum_{t: seq_ids_t = k} mask_t * logp_t`` of a packed batch,
    shape (num_seqs,), differentiable in ``token_logps``. Positions with ``seq_ids < 0``
    (padding) must have mask 0."""
    src = (token_logps * mask.to(token_logps.dtype)).reshape(-1)
    idx = seq_ids.reshape(-1).clamp(min=0).to(src.device)
    return src.new_zeros(num_seqs).index_add(0, idx, src)


def dpo_rewards(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
                ref_rejected_logps: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards (beta * (S_c - S_c_ref), beta * (S_r - S_r_ref)), detached."""
    with torch.no_grad():
        return (beta * (chosen_logps - ref_chosen_logps), beta * (rejected_logps - ref_rejected_logps))


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, beta: float = 0.1, reduction: str = "mean") -> torch.Tensor:
    """``-log sigmoid(beta * ((S_c - S_c_ref) - (S_r - S_r_ref)))`` per pair, then ``reduction``
    ("mean" | "sum" | "none"). All inputs (P,) sequence log-prob sums; the reference ones are
    treated as constants."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    z = beta * ((chosen_logps - ref_chosen_logps.detach()) - (rejected_logps - ref_rejected_logps.detach()))
    loss = -F.logsigmoid(z)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


class _AllReduceSumCP(torch.autograd.Function):
    """y = sum over the cp group of x (every rank gets y); backward passes dL/dy through
    unchanged: each cp rank computes the same loss from y, and the optimizer sums the
    parameter gradients over cp, so sum_r dL/dy * dx_r/dtheta = dL/dtheta."""

    @staticmethod
    def forward(ctx, x, group):
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def all_reduce_sum_cp(x: torch.Tensor, group) -> torch.Tensor:
    """Sequence sums of a context-parallel shard -> whole-sequence sums (see _AllReduceSumCP)."""
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _AllReduceSumCP.apply(x, group)
