"""Policy losses for RL: Kimi k1.5 online mirror descent (OMD); GRPO, PPO-clip, GSPO and CISPO
as baselines.

All losses take per-token log-probs of the sampled responses under the current policy
(``logp``, differentiable) and under the policy that generated them at the start of the
iteration (``old_logp``, treated as a constant), both (B, T), a (B, T) loss ``mask``
(1 for response tokens that are trained on), per-sample ``rewards`` (B,) and ``group_ids``
(B,), the prompt each sample answers (any integers; they need not be contiguous).

OMD (DESIGN.md section 3), with S_j = sum_t mask_jt * logp_jt (sequence log-prob):

    L = mean_j [ -(r_j - r_bar_j) * S_j + (tau / 2) * (S_j - S_old_j)^2 ]

where r_bar_j is the mean reward of j's group (``exact_logz=True``: the soft maximum
``tau * log(mean_group exp(r / tau))``, i.e. tau log Z). Its gradient is
``dL/dlogp_jt = mask_jt * (-(r_j - r_bar_j) + tau * (S_j - S_old_j)) / B``.

Distributed training
--------------------
Each loss sees only the local micro-batch. Two ways to stay exact under data parallelism
and gradient accumulation:

* keep all k samples of a prompt in the same micro-batch (never split a group across dp
  ranks or micro-batches), so the group statistics computed here are the full ones; or
* compute the group baseline / advantages once on the full batch (``group_baseline`` /
  ``group_normalized_advantages``), pass them in (``baseline=`` / ``advantages=``), and call
  the loss with ``reduction="sum"``; the trainer then divides by the global number of
  samples (OMD) or masked tokens (GRPO/PPO) after summing over micro-batches and ranks.
  ``reduction="mean"`` divides by the local count, which is only right when every
  micro-batch has the same count.

Under context parallelism each cp rank holds a zigzag shard of every sequence. The token-level
GRPO/PPO sums are then partial sums (the trainer adds the token counts over cp too), but OMD's
(S_j - S_old_j)^2 is nonlinear in the per-sample sums: ``omd_loss(..., cp_group=...)``
all-reduces S_j (forward: sum over cp; backward: identity, so each rank's tokens get the
gradient of the full S_j) and S_old_j before the loss, and every cp rank computes the same
whole-sequence loss (the optimizer sums the parameter gradients over cp). GSPO's per-sample
mean log-ratio is all-reduced the same way.

Rollout / training mismatch
---------------------------
The engine records each sampled token's log-prob under the model at generation time
(``rollout_logp``); the training forward recomputes it (``old_logp``). They differ only by
kernel numerics (decode vs training kernels, bf16 on GPU), but that is enough to bias the
gradient of a long trajectory. ``is_cap`` turns on truncated importance sampling (TIS): the
policy-gradient term of each token is weighted by ``w_t = min(exp(old_logp_t - rollout_logp_t),
is_cap)`` (a constant), OMD's as ``-(r_j - r_bar_j) * sum_t mask_jt w_jt logp_jt``; GSPO
weights each sample by ``min(exp(mean_t(old_logp - rollout_logp)), is_cap)``. KL terms are not
weighted. Two limits: the engine records the untempered, unfiltered model's log-probs, so with
a temperature != 1 or top-p / top-k the weights do not correct for the distribution actually
sampled from; and with ``--include-old-segments`` the tokens of earlier segments were sampled by
earlier policies, so their weights (and the trainer's mismatch metrics) include that lag.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

__all__ = [
    "group_index",
    "group_mean",
    "group_std",
    "group_logmeanexp",
    "group_baseline",
    "group_normalized_advantages",
    "group_advantages",
    "ADVANTAGE_ESTIMATORS",
    "sequence_logprob",
    "k3",
    "omd_loss",
    "grpo_loss",
    "ppo_loss",
    "gspo_loss",
    "cispo_loss",
    "rollout_is_weights",
    "clip_range",
    "get_loss_fn",
    "LOSSES",
    "SEQUENCE_LEVEL_LOSSES",
]


# ----------------------------------------------------------------------------- group helpers
def group_index(group_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary integer group ids to contiguous indices 0..G-1; returns (index (B,), G)."""
    group_ids = torch.as_tensor(group_ids)
    uniq, inv = torch.unique(group_ids, return_inverse=True)
    return inv, int(uniq.numel())


def _group_sum(values: torch.Tensor, idx: torch.Tensor, n_groups: int) -> torch.Tensor:
    out = torch.zeros(n_groups, dtype=values.dtype, device=values.device)
    return out.index_add(0, idx, values)


def group_mean(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample mean of ``values`` (B,) over the sample's group; returns (B,) in the values'
    dtype (at least fp32). Summed in float64, so the mean of equal values is exactly that
    value: a group whose samples all got the same reward has advantages of exactly 0 (in fp32,
    8 x 0.3 / 8 is not 0.3, and GRPO's division by a ~1e-8 std would blow the rounding up)."""
    values = torch.as_tensor(values)
    idx, g = group_index(torch.as_tensor(group_ids, device=values.device))
    vals = values.double()
    sums = _group_sum(vals, idx, g)
    counts = _group_sum(torch.ones_like(vals), idx, g)
    return (sums / counts)[idx].to(torch.promote_types(values.dtype, torch.float32))


def group_std(values: torch.Tensor, group_ids: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Per-sample standard deviation over the sample's group (population std by default,
    so singleton groups give 0 rather than NaN); returns (B,)."""
    values = torch.as_tensor(values)
    idx, g = group_index(torch.as_tensor(group_ids, device=values.device))
    vals = values.double()  # as in group_mean: equal values give exactly 0
    counts = _group_sum(torch.ones_like(vals), idx, g)
    mean = _group_sum(vals, idx, g) / counts
    sq = _group_sum((vals - mean[idx]) ** 2, idx, g)
    denom = (counts - 1).clamp(min=1) if unbiased else counts
    return (sq / denom).sqrt()[idx].to(torch.promote_types(values.dtype, torch.float32))


def group_logmeanexp(values: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Per-sample ``log(mean_group exp(values))``, computed stably (group max subtracted)."""
    values = torch.as_tensor(values)
    idx, g = group_index(torch.as_tensor(group_ids, device=values.device))
    vals = values.to(torch.promote_types(values.dtype, torch.float32))
    gmax = torch.full((g,), -math.inf, dtype=vals.dtype, device=vals.device)
    gmax = gmax.scatter_reduce(0, idx, vals, reduce="amax", include_self=True)
    sumexp = _group_sum(torch.exp(vals - gmax[idx]), idx, g)
    counts = _group_sum(torch.ones_like(vals), idx, g)
    return (gmax + torch.log(sumexp / counts))[idx]


def group_baseline(rewards: torch.Tensor, group_ids: torch.Tensor, tau: float = 1.0,
                   exact_logz: bool = False) -> torch.Tensor:
    """OMD baseline per sample: group mean reward, or ``tau * log mean exp(r / tau)``."""
    rewards = torch.as_tensor(rewards)
    if exact_logz:
        if tau <= 0:
            raise ValueError(f"exact_logz needs tau > 0, got {tau}")
        return tau * group_logmeanexp(rewards / tau, group_ids)
    return group_mean(rewards, group_ids)


def group_normalized_advantages(rewards: torch.Tensor, group_ids: torch.Tensor,
                                eps: float = 1e-6, unbiased_std: bool = False) -> torch.Tensor:
    """GRPO advantages ``(r - mean_group) / (std_group + eps)`` per sample (B,)."""
    rewards = torch.as_tensor(rewards)
    return (rewards - group_mean(rewards, group_ids)) / (group_std(rewards, group_ids, unbiased_std) + eps)


ADVANTAGE_ESTIMATORS = ("group-norm", "group-mean", "rloo")


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, estimator: str = "group-norm",
                     eps: float = 1e-6) -> torch.Tensor:
    """Value-free advantages from each sample's group of G samples of one prompt:

    - ``group-norm`` (GRPO): ``(r - mean) / (std + eps)``, population std;
    - ``group-mean`` (Dr. GRPO, and PPO here): ``r - mean``, no division by the std, which
      weighs prompts that are almost always (or never) solved up;
    - ``rloo`` (REINFORCE leave-one-out): ``r_i - mean_{j != i} r_j = G / (G - 1) (r_i - mean)``,
      an unbiased baseline; 0 in a group of one."""
    rewards = torch.as_tensor(rewards)
    if estimator == "group-norm":
        return group_normalized_advantages(rewards, group_ids, eps)
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator must be one of {ADVANTAGE_ESTIMATORS}, got {estimator!r}")
    centred = rewards - group_mean(rewards, group_ids)
    if estimator == "group-mean":
        return centred
    idx, n_groups = group_index(torch.as_tensor(group_ids))
    size = _group_sum(torch.ones_like(rewards, dtype=torch.float64), idx, n_groups)[idx]
    return torch.where(size > 1, centred * (size / (size - 1).clamp(min=1)).to(centred.dtype),
                       torch.zeros_like(centred))


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """Per token exp(x) - 1 - x, x = log(pi_other / pi_sampled) on tokens pi_sampled drew:
    Schulman's unbiased, non-negative estimator of KL(pi_sampled || pi_other)."""
    return torch.exp(log_ratio) - 1.0 - log_ratio


def sequence_logprob(logp: torch.Tensor, mask: torch.Tensor, normalize_by_tokens: bool = False,
                     cp_group=None) -> torch.Tensor:
    """S_j = sum_t mask * logp (or its mean over masked tokens); (B, T) -> (B,). With a
    ``cp_group`` the rows are zigzag shards: the sums (and token counts) are all-reduced over
    it, differentiably (forward sum, backward identity)."""
    mask = mask.to(logp.dtype)
    s = (logp * mask).sum(-1)
    if cp_group is not None:
        from megatron_k15.rl.dpo import all_reduce_sum_cp

        s = all_reduce_sum_cp(s, cp_group)
    if normalize_by_tokens:
        n = mask.sum(-1)
        if cp_group is not None:
            n = all_reduce_sum_cp(n, cp_group)
        s = s / n.clamp(min=1.0)
    return s


def _check(logp, old_logp, mask):
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp, mask must all be (B, T); got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )


def _reduce(x: torch.Tensor, reduction: str, count: torch.Tensor | float | None = None) -> torch.Tensor:
    if reduction == "sum":
        return x.sum()
    if reduction == "mean":
        if count is None:
            return x.mean()
        return x.sum() / count
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# the modes whose update normaliser counts samples (the others count response tokens)
PER_SAMPLE_AGG_MODES = frozenset({"seq-mean-token-mean", "seq-mean-token-sum-norm"})


def _aggregate_tokens(per_tok: torch.Tensor, maskf: torch.Tensor, reduction: str, mode: str,
                      seq_lengths: torch.Tensor | None, norm_tokens: float | None = None) -> torch.Tensor:
    """Sum or mean of the masked per-token terms of the token-level losses. ``token-mean``
    (DAPO's, the default): every token of the batch weighs the same, mean over all of them.
    ``seq-mean-token-mean`` (the GRPO paper's 1/G sum_i 1/|o_i| sum_t): each sample's tokens are
    averaged first, then the samples; ``seq_lengths`` (B,) are the samples' whole loss-token
    counts (default: the row's, which is wrong for a cp shard of a row), and "mean" divides by
    the samples. ``seq-mean-token-sum-norm`` (Dr. GRPO's 1/G sum_i 1/L sum_t): each sample's
    token sum over one constant ``norm_tokens`` L (the rollout budget), so a token weighs the
    same in a short and a long response; "mean" divides by the samples."""
    if mode == "token-mean":
        return _reduce(per_tok * maskf, reduction, maskf.sum().clamp(min=1.0))
    if mode == "seq-mean-token-sum-norm":
        if not norm_tokens or norm_tokens <= 0:
            raise ValueError(f"loss_agg_mode {mode!r} needs norm_tokens > 0 (the rollout budget), got {norm_tokens!r}")
        return _reduce((per_tok * maskf).sum(-1) / float(norm_tokens), reduction)
    if mode != "seq-mean-token-mean":
        raise ValueError(f"loss_agg_mode must be one of {LOSS_AGG_MODES}, got {mode!r}")
    lengths = maskf.sum(-1) if seq_lengths is None else torch.as_tensor(seq_lengths, device=maskf.device)
    per_seq = (per_tok * maskf).sum(-1) / lengths.to(per_tok.dtype).clamp(min=1.0)
    return _reduce(per_seq, reduction)


def rollout_is_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor | None,
                       cap: float | None) -> torch.Tensor | None:
    """Truncated importance-sampling weights ``min(exp(old_logp - rollout_logp), cap)`` (B, T),
    detached; None when TIS is off (no cap or no rollout log-probs)."""
    if not cap or rollout_logp is None:
        return None
    if rollout_logp.shape != old_logp.shape:
        raise ValueError(f"rollout_logp must be (B, T)={tuple(old_logp.shape)}, got {tuple(rollout_logp.shape)}")
    with torch.no_grad():
        return torch.exp(old_logp.detach().float() - rollout_logp.float()).clamp(max=float(cap))


# ----------------------------------------------------------------------------- OMD (Kimi k1.5)
def omd_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
             group_ids: torch.Tensor, tau: float, normalize_by_tokens: bool = False,
             exact_logz: bool = False, *, baseline: torch.Tensor | None = None,
             reduction: str = "mean", return_metrics: bool = False, cp_group=None,
             rollout_logp: torch.Tensor | None = None, is_cap: float | None = None):
    """Kimi k1.5 online-mirror-descent surrogate (module docstring has the formula).

    ``baseline`` (B,) overrides the in-batch group baseline (use it when a group is split
    across micro-batches). ``reduction="sum"`` returns the sum over samples instead of the
    mean. With ``return_metrics=True`` returns ``(loss, metrics)``, metrics being detached
    scalars: ``kl_proxy`` mean (S - S_old)^2, ``advantage_mean``, ``advantage_abs_mean``,
    ``logp_seq_mean`` (mean S), ``baseline_mean``, ``reward_mean``, ``policy_term``,
    ``kl_term``. ``cp_group``: the rows are this rank's zigzag shards of the sequences; S and
    S_old are all-reduced over the group first (module docstring), so every cp rank returns
    the whole-sequence loss. ``rollout_logp`` and ``is_cap``: truncated importance sampling of
    the policy term (module docstring).

    DESIGN.md section 2 lists the argument order ``(logp, old_logp, rewards, mask, ...)``;
    issue 7 (newer) says ``(logp, old_logp, mask, rewards, ...)``, which is what this takes.
    A 1-D third and 2-D fourth positional argument are recognised as the older order.
    """
    if mask.dim() == 1 and torch.as_tensor(rewards).dim() == 2:  # DESIGN.md's (rewards, mask) order
        mask, rewards = rewards, mask
    _check(logp, old_logp, mask)
    B = logp.shape[0]
    rewards = torch.as_tensor(rewards, device=logp.device).to(torch.float32)
    if rewards.shape != (B,):
        raise ValueError(f"rewards must be (B,)={B}, got {tuple(rewards.shape)}")
    group_ids = torch.as_tensor(group_ids, device=logp.device)

    dt = torch.promote_types(logp.dtype, torch.float32)  # fp32 at least (bf16 log-probs)
    S = sequence_logprob(logp.to(dt), mask, normalize_by_tokens, cp_group)
    with torch.no_grad():
        S_old = sequence_logprob(old_logp.detach().to(dt), mask, normalize_by_tokens, cp_group)
        if baseline is None:
            baseline = group_baseline(rewards, group_ids, tau, exact_logz)
        baseline = torch.as_tensor(baseline, device=logp.device, dtype=torch.float32)
        adv = (rewards - baseline).to(dt)
    delta = S - S_old
    w = rollout_is_weights(old_logp, rollout_logp, is_cap)
    S_pg = S if w is None else sequence_logprob(logp.to(dt) * w, mask, normalize_by_tokens, cp_group)
    policy = -adv * S_pg
    kl = 0.5 * tau * delta ** 2
    loss = _reduce(policy + kl, reduction)
    if not return_metrics:
        return loss
    with torch.no_grad():
        metrics = {
            "kl_proxy": (delta ** 2).mean().detach(),
            "advantage_mean": adv.mean(),
            "advantage_abs_mean": adv.abs().mean(),
            "logp_seq_mean": S.detach().mean(),
            "baseline_mean": baseline.mean(),
            "reward_mean": rewards.mean(),
            "policy_term": policy.detach().mean(),
            "kl_term": kl.detach().mean(),
        }
    return loss, metrics


# ----------------------------------------------------------------------------- PPO-clip / GRPO
def _rewards_and_advantages(rewards, group_ids, advantages, eps: float, device):
    """(rewards, advantages) as fp32 tensors on ``device``; the advantages default to GRPO's
    group-normalised ones (GRPO, GSPO)."""
    rewards = torch.as_tensor(rewards, device=device).float()
    if advantages is None:
        advantages = group_normalized_advantages(rewards, torch.as_tensor(group_ids, device=device), eps)
    return rewards, torch.as_tensor(advantages, device=device).float()


def clip_range(loss: str, clip_eps: float | None = None, clip_eps_high: float | None = None) -> tuple[float, float]:
    """(eps_low, eps_high) of the ratio clip ``[1 - eps_low, 1 + eps_high]``. Defaults: 0.2 for
    the token-level ratios of PPO / GRPO, GSPO's (3e-4, 4e-4) for its length-normalised sequence
    ratio; ``clip_eps_high`` defaults to ``clip_eps`` when only that is given (DAPO's
    clip-higher sets it above). CISPO truncates its weight from above only (MiniMax-M1 sets
    eps_low "to a large value" and tunes eps_high): (1.0, 0.28), i.e. weights in [0, 1.28];
    there ``clip_eps`` sets the lower bound alone."""
    lo, hi = {"gspo": (3e-4, 4e-4), "cispo": (1.0, 0.28)}.get(loss, (0.2, 0.2))
    if clip_eps is not None:
        lo = float(clip_eps)
        hi = hi if loss == "cispo" else lo
    if clip_eps_high is not None:
        hi = float(clip_eps_high)
    return lo, hi


def _clipped_surrogate(logp, old_logp, mask, adv_tok, clip_eps, clip_eps_high=None, weights=None):
    """Token-level PPO-clip objective terms (to be maximised) and its statistics; the ratio is
    clipped to ``[1 - clip_eps, 1 + clip_eps_high]`` (default symmetric), ``weights``: TIS."""
    hi = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = torch.exp(logp.float() - old_logp.detach().float())
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + hi)
    surr = torch.minimum(ratio * adv_tok, clipped * adv_tok)
    if weights is not None:
        surr = surr * weights
    with torch.no_grad():
        m = mask.bool()
        n = m.sum().clamp(min=1)
        was_clipped = ((ratio * adv_tok) > (clipped * adv_tok)) & m
        stats = {
            "ratio_mean": (ratio.detach() * m).sum() / n,
            "clip_frac": was_clipped.sum().float() / n,
            "clipped": was_clipped.sum().float(), "clip_units": m.sum().float(),  # summable over ranks
            "kl_proxy": (((logp.detach().float() - old_logp.float()) ** 2) * m).sum() / n,
        }
    return surr, stats


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
             clip_eps: float = 0.2, clip_eps_high: float | None = None, *, reduction: str = "mean",
             return_metrics: bool = False, rollout_logp: torch.Tensor | None = None,
             is_cap: float | None = None, loss_agg_mode: str = "token-mean",
             seq_lengths: torch.Tensor | None = None, norm_tokens: float | None = None):
    """Token-level PPO-clip: ``-mean_{masked tokens} min(rho A, clip(rho, 1-eps, 1+eps_high) A)``,
    rho = exp(logp - old_logp). ``advantages`` is (B,) (broadcast over tokens; for our
    value-free setting r - r_bar) or (B, T). The mean is over all masked tokens of the batch
    (``reduction="sum"``: their sum; ``loss_agg_mode``, ``seq_lengths``: ``_aggregate_tokens``).
    ``rollout_logp``, ``is_cap``: TIS (module docstring)."""
    _check(logp, old_logp, mask)
    adv = torch.as_tensor(advantages, device=logp.device).float()
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    if adv.shape != logp.shape:
        raise ValueError(f"advantages must be (B,) or (B, T), got {tuple(adv.shape)}")
    maskf = mask.float()
    surr, stats = _clipped_surrogate(logp, old_logp, mask, adv, clip_eps, clip_eps_high,
                                     rollout_is_weights(old_logp, rollout_logp, is_cap))
    loss = _aggregate_tokens(-surr, maskf, reduction, loss_agg_mode, seq_lengths, norm_tokens)
    if not return_metrics:
        return loss
    stats["advantage_mean"] = adv[:, 0].mean() if adv.shape[1] else adv.new_zeros(())
    return loss, stats


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
              group_ids: torch.Tensor, clip_eps: float = 0.2, kl_coef: float = 0.0,
              ref_logp: torch.Tensor | None = None, *, eps: float = 1e-6,
              advantages: torch.Tensor | None = None, reduction: str = "mean",
              return_metrics: bool = False, clip_eps_high: float | None = None,
              rollout_logp: torch.Tensor | None = None, is_cap: float | None = None,
              loss_agg_mode: str = "token-mean", seq_lengths: torch.Tensor | None = None,
              norm_tokens: float | None = None):
    """GRPO: PPO-clip with group-normalised advantages ``(r - mean) / (std + eps)`` (population
    std within the group), token-level ratio clipping, averaged over all masked tokens of the
    batch (DAPO-style token mean; ``loss_agg_mode="seq-mean-token-mean"``: the GRPO paper's mean
    over samples of each one's token mean, ``_aggregate_tokens``). With ``kl_coef > 0`` adds
    ``kl_coef * k3(ref - logp)`` per token; ``ref_logp`` defaults to ``old_logp`` (the reference
    is then the iteration's starting policy; the trainer passes a frozen model's with
    ``--ref-load``).
    ``advantages`` (B,) overrides the in-batch advantages; ``clip_eps_high``: DAPO's
    clip-higher; ``rollout_logp``, ``is_cap``: TIS of the surrogate (module docstring)."""
    _check(logp, old_logp, mask)
    rewards, adv = _rewards_and_advantages(rewards, group_ids, advantages, eps, logp.device)
    maskf = mask.float()
    surr, stats = _clipped_surrogate(logp, old_logp, mask, adv[:, None].expand_as(logp), clip_eps,
                                     clip_eps_high, rollout_is_weights(old_logp, rollout_logp, is_cap))
    per_tok = -surr
    if kl_coef:
        ref = (old_logp if ref_logp is None else ref_logp).detach().float()
        kl = k3(ref - logp.float())
        per_tok = per_tok + kl_coef * kl
        with torch.no_grad():
            stats["kl_k3"] = (kl.detach() * maskf).sum() / maskf.sum().clamp(min=1.0)
    loss = _aggregate_tokens(per_tok, maskf, reduction, loss_agg_mode, seq_lengths, norm_tokens)
    if not return_metrics:
        return loss
    stats["advantage_mean"] = adv.mean()
    stats["advantage_abs_mean"] = adv.abs().mean()
    stats["reward_mean"] = rewards.mean()
    return loss, stats


# ----------------------------------------------------------------------------- GSPO
def gspo_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
              group_ids: torch.Tensor, clip_eps: float | None = None, clip_eps_high: float | None = None, *,
              eps: float = 1e-6, advantages: torch.Tensor | None = None, reduction: str = "mean",
              return_metrics: bool = False, cp_group=None, rollout_logp: torch.Tensor | None = None,
              is_cap: float | None = None):
    """GSPO (Qwen's group sequence policy optimisation): PPO-clip on the length-normalised
    sequence ratio ``s_j = exp(mean_t(logp_jt - old_logp_jt))`` (masked tokens) with GRPO's
    group-normalised advantages,

        L = -mean_j min(s_j A_j, clip(s_j, 1 - eps_low, 1 + eps_high) A_j),

    so one ratio per response is clipped (range from ``clip_range("gspo", ...)``: by default
    3e-4 / 4e-4, the paper's) instead of one per token. Normalised by samples like OMD
    (``reduction="sum"``: the sum over samples);
    ``cp_group``: the means are all-reduced over the zigzag shards (every cp rank returns the
    whole-sequence loss)."""
    _check(logp, old_logp, mask)
    rewards, adv = _rewards_and_advantages(rewards, group_ids, advantages, eps, logp.device)
    clip_eps, hi = clip_range("gspo", clip_eps, clip_eps_high)
    # the mean of per-token differences, not a difference of means: the log-ratio is ~1e-4
    # next to sequence means of ~-1, so this keeps fp32 from cancelling it away
    dt = torch.promote_types(logp.dtype, torch.float32)
    ratio = torch.exp(sequence_logprob(logp.to(dt) - old_logp.detach().to(dt), mask, True, cp_group))
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + hi)
    surr = torch.minimum(ratio * adv, clipped * adv)
    if is_cap and rollout_logp is not None:
        with torch.no_grad():
            drift = sequence_logprob(old_logp.detach().to(dt) - rollout_logp.to(dt), mask, True, cp_group)
        surr = surr * torch.exp(drift).clamp(max=float(is_cap))
    loss = _reduce(-surr, reduction)
    if not return_metrics:
        return loss
    with torch.no_grad():
        was_clipped = ((ratio * adv) > (clipped * adv)).float()
        stats = {"ratio_mean": ratio.detach().mean(),
                 "clip_frac": was_clipped.mean(), "clipped": was_clipped.sum(),
                 "clip_units": ratio.new_tensor(float(ratio.numel())),  # samples: whole sequences under cp
                 "advantage_mean": adv.mean(), "advantage_abs_mean": adv.abs().mean(),
                 "reward_mean": rewards.mean()}
    return loss, stats


# ----------------------------------------------------------------------------- CISPO
def cispo_loss(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, rewards: torch.Tensor,
               group_ids: torch.Tensor, clip_eps: float | None = None, clip_eps_high: float | None = None, *,
               eps: float = 1e-6, advantages: torch.Tensor | None = None, reduction: str = "mean",
               return_metrics: bool = False, rollout_logp: torch.Tensor | None = None,
               is_cap: float | None = None, loss_agg_mode: str = "token-mean",
               seq_lengths: torch.Tensor | None = None, norm_tokens: float | None = None):
    """CISPO (MiniMax-M1's clipped importance-sampling policy optimisation): REINFORCE with the
    token's importance weight clipped and held constant,

        L = -mean_{masked tokens} sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) A_j logp_t,

    rho_t = exp(logp_t - old_logp_t), GRPO's group-normalised advantages by default. Where
    PPO-clip drops a token whose ratio left the range (no gradient once ``rho A`` is clipped),
    CISPO keeps every token's gradient and bounds only its weight: the rare tokens that fork a
    long chain of thought ("wait", "however"), whose ratios move most, keep learning after the
    first update of an iteration. At ratio 1 the gradient is GRPO's. Range from
    ``clip_range("cispo", ...)``: by default no lower bound and 1 + 0.28 above. Aggregation as
    the token-level losses (``_aggregate_tokens``); ``rollout_logp``, ``is_cap``: TIS, one more
    constant factor per token (module docstring)."""
    _check(logp, old_logp, mask)
    rewards, adv = _rewards_and_advantages(rewards, group_ids, advantages, eps, logp.device)
    lo, hi = clip_range("cispo", clip_eps, clip_eps_high)
    maskf = mask.float()
    with torch.no_grad():
        ratio = torch.exp(logp.detach().float() - old_logp.detach().float())
        weight = ratio.clamp(1.0 - lo, 1.0 + hi)
        tis = rollout_is_weights(old_logp, rollout_logp, is_cap)
        coef = weight * adv[:, None] if tis is None else weight * tis * adv[:, None]
    loss = _aggregate_tokens(-coef * logp.float(), maskf, reduction, loss_agg_mode, seq_lengths, norm_tokens)
    if not return_metrics:
        return loss
    with torch.no_grad():
        m = mask.bool()
        n = m.sum().clamp(min=1)
        truncated = ((weight != ratio) & m).sum().float()
        stats = {"ratio_mean": (ratio * m).sum() / n,
                 "clip_frac": truncated / n, "clipped": truncated, "clip_units": m.sum().float(),
                 "kl_proxy": (((logp.detach().float() - old_logp.float()) ** 2) * m).sum() / n,
                 "advantage_mean": adv.mean(), "advantage_abs_mean": adv.abs().mean(),
                 "reward_mean": rewards.mean()}
    return loss, stats


# ----------------------------------------------------------------------------- registry
def _ppo_from_rewards(logp, old_logp, mask, rewards, group_ids, clip_eps: float = 0.2,
                      clip_eps_high: float | None = None, *, advantages=None, baseline=None,
                      reduction: str = "mean", return_metrics: bool = False, rollout_logp=None,
                      is_cap: float | None = None, loss_agg_mode: str = "token-mean", seq_lengths=None,
                      norm_tokens: float | None = None):
    """PPO-clip with value-free advantages r - r_bar (group mean) unless given."""
    if advantages is None:
        r = torch.as_tensor(rewards, device=logp.device).float()
        if baseline is None:
            baseline = group_mean(r, torch.as_tensor(group_ids, device=logp.device))
        advantages = r - torch.as_tensor(baseline, device=logp.device).float()
    return ppo_loss(logp, old_logp, mask, advantages, clip_eps, clip_eps_high, reduction=reduction,
                    return_metrics=return_metrics, rollout_logp=rollout_logp, is_cap=is_cap,
                    loss_agg_mode=loss_agg_mode, seq_lengths=seq_lengths, norm_tokens=norm_tokens)


LOSSES: dict[str, Callable] = {"omd": omd_loss, "grpo": grpo_loss, "ppo": _ppo_from_rewards, "gspo": gspo_loss,
                               "cispo": cispo_loss}
# losses averaged over samples (one term per response, whole-sequence under cp); the others
# average over response tokens
SEQUENCE_LEVEL_LOSSES = frozenset({"omd", "gspo"})


def get_loss_fn(name: str) -> Callable:
    """Loss for ``--rl-loss {omd,grpo,ppo,gspo,cispo}`` with the uniform call signature
    ``fn(logp, old_logp, mask, rewards, group_ids, **kwargs)``. Keyword arguments a loss does
    not take are dropped, so the trainer can pass ``tau=, clip_eps=, kl_coef=, ...`` to any."""
    try:
        fn = LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown RL loss {name!r}; choose from {sorted(LOSSES)}") from None
    params = inspect.signature(fn).parameters

    def loss_fn(logp, old_logp, mask, rewards, group_ids, **kwargs):
        kw = {k: v for k, v in kwargs.items() if k in params}
        return fn(logp, old_logp, mask, rewards, group_ids, **kw)

    loss_fn.__name__ = f"{name}_loss"
    loss_fn.__doc__ = fn.__doc__
    return loss_fn
