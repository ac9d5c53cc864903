"""OMD / GRPO / PPO / GSPO / CISPO losses, clip-higher and truncated importance sampling against hand
computations."""

import math

import pytest
import torch

from megatron_k15.rl.losses import (cispo_loss, clip_range, get_loss_fn, group_advantages, group_baseline, group_mean,
                                    group_normalized_advantages, group_std, grpo_loss, gspo_loss, omd_loss,
                                    ppo_loss, rollout_is_weights)


def _batch():
    # 2 prompts (ids 7 and 3, non-contiguous, interleaved) x 2 samples, T = 3
    logp = torch.tensor([[-1.0, -2.0, -0.5],
                         [-0.2, -0.3, -9.0],
                         [-1.5, -0.1, -0.4],
                         [-0.7, -0.6, -0.8]])
    old = torch.tensor([[-1.1, -1.8, -0.5],
                        [-0.2, -0.5, -1.0],
                        [-1.5, -0.3, -0.2],
                        [-0.9, -0.6, -0.8]])
    mask = torch.tensor([[1, 1, 1],
                         [1, 1, 0],
                         [1, 1, 1],
                         [0, 1, 1]], dtype=torch.float32)
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    gid = torch.tensor([7, 7, 3, 3])
    return logp, old, mask, rewards, gid


def test_group_helpers_by_hand():
    v = torch.tensor([1.0, 3.0, 10.0, 2.0, 6.0])
    g = torch.tensor([5, 5, 9, 1, 1])
    torch.testing.assert_close(group_mean(v, g), torch.tensor([2.0, 2.0, 10.0, 4.0, 4.0]))
    torch.testing.assert_close(group_std(v, g), torch.tensor([1.0, 1.0, 0.0, 2.0, 2.0]))
    torch.testing.assert_close(group_std(v, g, unbiased=True),
                               torch.tensor([math.sqrt(2)] * 2 + [0.0] + [math.sqrt(8)] * 2))
    adv = group_normalized_advantages(v, g, eps=0.0)
    torch.testing.assert_close(adv[[0, 1, 3, 4]], torch.tensor([-1.0, 1.0, -1.0, 1.0]))


def test_exact_logz_baseline_by_hand_and_stable():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    g = torch.tensor([0, 0, 1, 1])
    tau = 0.5
    b = group_baseline(r, g, tau, exact_logz=True)
    expect0 = tau * math.log((math.exp(1 / tau) + 1) / 2)
    torch.testing.assert_close(b, torch.tensor([expect0, expect0, 0.0, 0.0]))
    # huge r / tau must not overflow
    b = group_baseline(torch.tensor([1000.0, 999.0]), torch.tensor([0, 0]), 0.01, exact_logz=True)
    assert torch.isfinite(b).all() and abs(b[0].item() - (1000 + 0.01 * math.log(0.5))) < 1e-3


@pytest.mark.parametrize("normalize", [False, True])
def test_omd_loss_and_grad_by_hand(normalize):
    logp, old, mask, rewards, gid = _batch()
    tau = 0.3
    logp = logp.clone().requires_grad_()
    loss = omd_loss(logp, old, mask, rewards, gid, tau, normalize_by_tokens=normalize)
    loss.backward()

    # hand computation, sample by sample, in plain Python
    L = logp.detach().tolist(); O = old.tolist(); M = mask.tolist(); R = rewards.tolist()
    groups = {7: [0, 1], 3: [2, 3]}
    rbar = {}
    for g, idx in groups.items():
        for j in idx:
            rbar[j] = sum(R[i] for i in idx) / len(idx)
    total, grads = 0.0, []
    for j in range(4):
        n = sum(M[j]) if normalize else 1.0
        S = sum(m * l for m, l in zip(M[j], L[j])) / n
        So = sum(m * o for m, o in zip(M[j], O[j])) / n
        a = R[j] - rbar[j]
        total += -a * S + tau / 2 * (S - So) ** 2
        grads.append([M[j][t] * (-a + tau * (S - So)) / 4 / n for t in range(3)])
    assert abs(loss.item() - total / 4) < 1e-6
    torch.testing.assert_close(logp.grad, torch.tensor(grads))
    assert logp.grad[1, 2] == 0  # masked token gets no gradient


def test_omd_reference_values():
    # fully hand-written numbers for the sequence-level loss
    logp, old, mask, rewards, gid = _batch()
    # S = [-3.5, -0.5, -2.0, -1.4]; S_old = [-3.4, -0.7, -2.0, -1.4]; adv = [.5, -.5, 0, 0]
    # terms: -.5*-3.5 + .05*.01 = 1.7505; .5*-.5 + .05*.04 = -.248; 0; 0 -> mean 0.375625
    loss = omd_loss(logp, old, mask, rewards, gid, tau=0.1)
    assert abs(loss.item() - 0.375625) < 1e-6
    loss_sum = omd_loss(logp, old, mask, rewards, gid, tau=0.1, reduction="sum")
    assert abs(loss_sum.item() - 4 * 0.375625) < 1e-5


def test_omd_old_logp_and_baseline_are_constants():
    logp, old, mask, rewards, gid = _batch()
    old = old.clone().requires_grad_()
    r = rewards.clone().requires_grad_()
    loss = omd_loss(logp.requires_grad_(), old, mask, r, gid, 0.5)
    loss.backward()
    assert old.grad is None and r.grad is None


def test_omd_given_baseline_matches_and_design_order():
    logp, old, mask, rewards, gid = _batch()
    base = group_baseline(rewards, gid)
    a = omd_loss(logp, old, mask, rewards, gid, 0.2)
    b = omd_loss(logp, old, mask, rewards, torch.zeros(4, dtype=torch.long), 0.2, baseline=base)
    c = omd_loss(logp, old, rewards, mask, gid, 0.2)  # DESIGN.md's (rewards, mask) order
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    # exact_logz changes the baseline, so the loss too
    d = omd_loss(logp, old, mask, rewards, gid, 0.2, exact_logz=True)
    assert abs(d.item() - a.item()) > 1e-3


def test_omd_metrics():
    logp, old, mask, rewards, gid = _batch()
    loss, m = omd_loss(logp, old, mask, rewards, gid, 0.1, return_metrics=True)
    # (S - S_old)^2 = [.01, .04, 0, 0]
    assert abs(m["kl_proxy"].item() - 0.0125) < 1e-6
    assert abs(m["advantage_mean"].item()) < 1e-7
    assert abs(m["advantage_abs_mean"].item() - 0.25) < 1e-7
    assert abs(m["reward_mean"].item() - 0.25) < 1e-7


def test_ppo_loss_by_hand():
    logp = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), 0.0]])
    old = torch.zeros(2, 2)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    logp = logp.requires_grad_()
    loss, stats = ppo_loss(logp, old, mask, adv, clip_eps=0.2, return_metrics=True)
    # token 0: ratio 1.5, A=2 -> min(3, 2.4) = 2.4 (clipped, no grad)
    # token 1: ratio 0.5, A=2 -> min(1, 1.6) = 1.0 (unclipped, grad = A * ratio)
    # token 2: ratio 1.1, A=-1 -> min(-1.1, -1.1) = -1.1 (inside the range)
    expect = -(2.4 + 1.0 - 1.1) / 3
    assert abs(loss.item() - expect) < 1e-6
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -2.0 * 0.5 / 3], [1.1 / 3, 0.0]]))
    assert abs(stats["clip_frac"].item() - 1 / 3) < 1e-6


def test_ppo_on_policy_gradient_is_policy_gradient():
    # at ratio 1 the clipped objective's gradient is -A * mask / n_tokens
    logp = torch.randn(3, 4).requires_grad_()
    mask = torch.ones(3, 4)
    adv = torch.tensor([1.0, -2.0, 0.5])
    ppo_loss(logp, logp.detach(), mask, adv).backward()
    torch.testing.assert_close(logp.grad, (-adv[:, None] / 12).expand(3, 4))


def test_grpo_uses_group_normalised_advantages():
    logp, old, mask, rewards, gid = _batch()
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    loss = grpo_loss(logp, old, mask, rewards, gid, clip_eps=0.2)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])  # (r - mean) / std, both groups
    expect = ppo_loss(logp, old, mask, adv, clip_eps=0.2)
    torch.testing.assert_close(loss, expect, rtol=1e-5, atol=1e-6)
    # zero-variance groups give zero advantage, hence zero loss
    flat = grpo_loss(logp, old, mask, torch.ones(4), gid)
    assert abs(flat.item()) < 1e-6
    # exactly zero, also for rewards whose fp32 mean does not round back (8 x 0.3 / 8 != 0.3)
    for value, k in ((0.3, 8), (0.9, 16), (1.05, 8)):
        r = torch.full((k,), value)
        assert group_normalized_advantages(r, torch.zeros(k)).abs().max().item() == 0.0
        assert (r - group_mean(r, torch.zeros(k))).abs().max().item() == 0.0


def test_grpo_kl_term_by_hand():
    logp = torch.tensor([[math.log(0.5)]]).requires_grad_()
    old = torch.tensor([[math.log(0.5)]])
    ref = torch.tensor([[0.0]])
    mask = torch.ones(1, 1)
    loss = grpo_loss(logp, old, mask, torch.tensor([1.0]), torch.tensor([0]), kl_coef=0.1, ref_logp=ref)
    d = 0.0 - math.log(0.5)
    expect = 0.1 * (math.exp(d) - d - 1)  # advantage 0 in a singleton group
    assert abs(loss.item() - expect) < 1e-6
    # without ref_logp the reference is old_logp: k3 = 0 at logp == old_logp
    loss2 = grpo_loss(logp, old, mask, torch.tensor([1.0]), torch.tensor([0]), kl_coef=0.1)
    assert abs(loss2.item()) < 1e-7


def test_get_loss_fn_uniform_signature():
    logp, old, mask, rewards, gid = _batch()
    kw = dict(tau=0.1, clip_eps=0.2, kl_coef=0.0)
    torch.testing.assert_close(get_loss_fn("omd")(logp, old, mask, rewards, gid, **kw),
                               omd_loss(logp, old, mask, rewards, gid, 0.1))
    torch.testing.assert_close(get_loss_fn("grpo")(logp, old, mask, rewards, gid, **kw),
                               grpo_loss(logp, old, mask, rewards, gid, 0.2))
    adv = rewards - group_mean(rewards, gid)
    torch.testing.assert_close(get_loss_fn("ppo")(logp, old, mask, rewards, gid, **kw),
                               ppo_loss(logp, old, mask, adv, 0.2))
    torch.testing.assert_close(get_loss_fn("gspo")(logp, old, mask, rewards, gid, **kw),
                               gspo_loss(logp, old, mask, rewards, gid, 0.2, 0.2))
    torch.testing.assert_close(get_loss_fn("cispo")(logp, old, mask, rewards, gid, **kw),
                               cispo_loss(logp, old, mask, rewards, gid, 0.2))
    with pytest.raises(ValueError):
        get_loss_fn("dpo")


def test_clip_higher_by_hand():
    """DAPO's clip-higher: ratio 1.25 with A > 0 is clipped at eps_high 0.2 (no gradient) but
    not at 0.28 (gradient A * ratio / n); the lower bound stays 1 - eps."""
    logp = torch.tensor([[math.log(1.25), math.log(0.7)]]).requires_grad_()
    old = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    adv = torch.tensor([1.0])
    ppo_loss(logp, old, mask, adv, clip_eps=0.2).backward()
    # token 1: ratio 0.7 < 0.8 with A > 0: min(0.7, 0.8) = 0.7, unclipped -> gradient
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.7 / 2]]))
    logp.grad = None
    loss = ppo_loss(logp, old, mask, adv, clip_eps=0.2, clip_eps_high=0.28)
    assert abs(loss.item() + (1.25 + 0.7) / 2) < 1e-6
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.25 / 2, -0.7 / 2]]))
    # GRPO passes it through
    logp.grad = None
    grpo_loss(logp, old, mask, torch.tensor([1.0, 0.0]).view(2)[:1], torch.tensor([0]),
              advantages=adv, clip_eps=0.2, clip_eps_high=0.28).backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.25 / 2, -0.7 / 2]]))


def test_clip_range_defaults():
    assert clip_range("grpo") == (0.2, 0.2)
    assert clip_range("ppo", 0.1) == (0.1, 0.1)
    assert clip_range("grpo", 0.2, 0.28) == (0.2, 0.28)
    assert clip_range("gspo") == (3e-4, 4e-4)
    assert clip_range("gspo", None, 1e-3) == (3e-4, 1e-3)
    # CISPO: no lower bound by default; --clip-eps moves the lower bound only
    assert clip_range("cispo") == (1.0, 0.28)
    assert clip_range("cispo", 0.2) == (0.2, 0.28)
    assert clip_range("cispo", None, 4.0) == (1.0, 4.0)


def _gspo_reference(logp, old, mask, adv, lo, hi):
    """GSPO written out per sample in float64 (loops, no shared helpers)."""
    total = 0.0
    for j in range(logp.shape[0]):
        n = max(float(mask[j].sum()), 1.0)
        s = sum((logp[j, t] - old[j, t]) * mask[j, t] for t in range(logp.shape[1])) / n
        ratio = torch.exp(s)
        total = total - torch.minimum(ratio * adv[j], ratio.clamp(1 - lo, 1 + hi) * adv[j])
    return total / logp.shape[0]


def test_gspo_against_per_sample_formula():
    logp, old, mask, _, gid = _batch()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # mean log-ratios 10e-4 (A > 0: above 1 + 4e-4, clipped), -0.5e-4, 1.3e-4, -0.5e-4
    old = logp + 1e-4 * torch.tensor([[-10.0, -10.0, -10.0], [0.5, 0.5, 9.0], [-3.0, -1.0, 0.0], [7.0, -1.0, 2.0]])
    adv = group_normalized_advantages(rewards, gid)
    for lo, hi in ((3e-4, 4e-4), (0.2, 0.2)):
        x = logp.double().clone().requires_grad_()
        loss, stats = gspo_loss(x, old.double(), mask, rewards, gid, lo, hi, return_metrics=True)
        y = logp.double().clone().requires_grad_()
        ref = _gspo_reference(y, old.double(), mask.double(), adv.double(), lo, hi)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=1e-9)
        loss.backward()
        ref.backward()
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-6, atol=1e-9)
        # the paper's range clips sample 0 (no gradient), the loose one nothing
        assert stats["clip_frac"].item() == (0.25 if lo == 3e-4 else 0.0)
        assert (x.grad[0] == 0).all() == (lo == 3e-4)


def test_gspo_on_policy_gradient():
    """At ratio 1: dL/dlogp_jt = -A_j * mask_jt / (|y_j| B) (the sequence ratio's gradient is
    the mean token gradient)."""
    logp, _, mask, rewards, gid = _batch()
    x = logp.clone().requires_grad_()
    gspo_loss(x, logp, mask, rewards, gid).backward()
    adv = group_normalized_advantages(rewards, gid)
    expect = -adv[:, None] * mask / mask.sum(-1, keepdim=True) / 4
    torch.testing.assert_close(x.grad, expect)


def test_truncated_importance_sampling_weights_the_policy_gradient():
    """With rollout log-probs, each token's policy-gradient term is scaled by
    w = min(exp(old - rollout), cap) (a constant); KL terms are not."""
    logp, old, mask, rewards, gid = _batch()
    rollout = old + torch.tensor([[0.1, -0.2, 0.9], [0.0, 1.5, 0.0], [-0.3, 0.2, 0.1], [0.0, -2.0, 0.4]])
    cap = 2.0
    w = torch.exp(old - rollout).clamp(max=cap)
    torch.testing.assert_close(rollout_is_weights(old, rollout, cap), w)
    assert rollout_is_weights(old, rollout, None) is None and rollout_is_weights(old, None, cap) is None
    assert (w == cap).any() and (w < 1).any()
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0])
    # PPO / GRPO: gradient of the weighted surrogate = w x the unweighted token gradient
    for fn, kw in ((ppo_loss, dict(advantages=adv)), (grpo_loss, dict(rewards=rewards, group_ids=gid))):
        x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        fn(x, old, mask, **kw, rollout_logp=rollout, is_cap=cap).backward()
        fn(y, old, mask, **kw).backward()
        torch.testing.assert_close(x.grad, w * y.grad)
    # OMD: dL/dlogp_jt = mask_jt (-(r_j - r_bar_j) w_jt + tau (S_j - S_old_j)) / B
    tau = 0.3
    x = logp.clone().requires_grad_()
    omd_loss(x, old, mask, rewards, gid, tau, rollout_logp=rollout, is_cap=cap).backward()
    a = rewards - group_mean(rewards, gid)
    delta = ((logp - old) * mask).sum(-1)
    expect = mask * (-a[:, None] * w + tau * delta[:, None]) / 4
    torch.testing.assert_close(x.grad, expect)
    # GSPO: one weight per sample, min(exp(mean_t(old - rollout)), cap)
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    gspo_loss(x, old, mask, rewards, gid, 0.2, 0.2, rollout_logp=rollout, is_cap=cap).backward()
    gspo_loss(y, old, mask, rewards, gid, 0.2, 0.2).backward()
    ws = torch.exp(((old - rollout) * mask).sum(-1) / mask.sum(-1)).clamp(max=cap)
    torch.testing.assert_close(x.grad, ws[:, None] * y.grad)


def test_seq_mean_token_mean_by_hand():
    """The GRPO paper's aggregation: the same ppo example as ``test_ppo_loss_by_hand``, sample 0's
    two tokens averaged (2.4 + 1.0) / 2, sample 1's one token -1.1, then the two samples."""
    logp = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss = ppo_loss(logp, torch.zeros(2, 2), mask, adv, clip_eps=0.2, loss_agg_mode="seq-mean-token-mean")
    assert loss.item() == pytest.approx(-((2.4 + 1.0) / 2 - 1.1) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ppo_loss(logp, torch.zeros(2, 2), mask, adv, loss_agg_mode="seq-sum")


def test_seq_mean_token_mean_equals_the_mean_of_per_sample_losses_and_splits_into_shards():
    """GRPO (with its KL term) under seq-mean-token-mean is the mean over samples of each
    sample's own token-mean loss; with each sample's whole token count given, the sums over two
    column shards of the rows (context parallelism) add up to the whole."""
    logp, old, mask, rewards, gid = _batch()
    ref = old - 0.3
    adv = group_normalized_advantages(rewards, gid)
    kw = dict(clip_eps=0.2, kl_coef=0.1, ref_logp=ref, advantages=adv)
    got = grpo_loss(logp, old, mask, rewards, gid, loss_agg_mode="seq-mean-token-mean", **kw)
    per_sample = [grpo_loss(logp[j:j + 1], old[j:j + 1], mask[j:j + 1], rewards[j:j + 1], gid[j:j + 1],
                            clip_eps=0.2, kl_coef=0.1, ref_logp=ref[j:j + 1], advantages=adv[j:j + 1])
                  for j in range(4)]
    assert got.item() == pytest.approx(sum(x.item() for x in per_sample) / 4, rel=1e-6)
    token_mean = grpo_loss(logp, old, mask, rewards, gid, **kw)
    assert abs(got.item() - token_mean.item()) > 1e-3  # unequal lengths: the two modes differ
    n = mask.sum(-1)
    shards = (slice(0, 2), slice(2, 3))
    parts = [grpo_loss(logp[:, c], old[:, c], mask[:, c], rewards, gid, loss_agg_mode="seq-mean-token-mean",
                       seq_lengths=n, reduction="sum", clip_eps=0.2, kl_coef=0.1, ref_logp=ref[:, c], advantages=adv)
             for c in shards]
    assert sum(p.item() for p in parts) / 4 == pytest.approx(got.item(), rel=1e-6)


def test_advantage_estimators_by_hand():
    """group-norm is GRPO's; group-mean r - mean; rloo r_i minus the mean of the group's other
    rewards (a loop), and 0 for a group of one."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.5])
    gid = torch.tensor([7, 7, 7, 3, 3, 9])
    torch.testing.assert_close(group_advantages(rewards, gid), group_normalized_advantages(rewards, gid))
    torch.testing.assert_close(group_advantages(rewards, gid, "group-mean"),
                               torch.tensor([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]))
    loo = []
    for i in range(6):
        others = [float(rewards[j]) for j in range(6) if j != i and gid[j] == gid[i]]
        loo.append(float(rewards[i]) - sum(others) / len(others) if others else 0.0)
    torch.testing.assert_close(group_advantages(rewards, gid, "rloo"), torch.tensor(loo))
    assert loo[0] == 1.0 and loo[1] == -0.5  # 1 - (0 + 0) / 2 and 0 - (1 + 0) / 2
    with pytest.raises(ValueError, match="advantage estimator"):
        group_advantages(rewards, gid, "gae")


def test_seq_mean_token_sum_norm_by_hand():
    """Dr. GRPO's aggregation on the ``test_seq_mean_token_mean_by_hand`` example: each sample's
    token sum over the constant budget L = 4, (2.4 + 1.0) / 4 and -1.1 / 4, then the mean over
    the two samples; every token weighs 1 / (G L), whatever its response's length."""
    logp = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(1.1), 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    loss = ppo_loss(logp, torch.zeros(2, 2), mask, adv, clip_eps=0.2, loss_agg_mode="seq-mean-token-sum-norm",
                    norm_tokens=4)
    assert loss.item() == pytest.approx(-((2.4 + 1.0) / 4 - 1.1 / 4) / 2, abs=1e-6)
    with pytest.raises(ValueError, match="norm_tokens"):
        ppo_loss(logp, torch.zeros(2, 2), mask, adv, loss_agg_mode="seq-mean-token-sum-norm")


def test_cispo_by_hand():
    """CISPO keeps the gradient of every token, weighted by its ratio clipped to [1 - lo, 1 + hi]
    (a constant): dL/dlogp_t = -clip(rho_t) A / n. PPO-clip drops the token whose ratio 1.5 left
    the range with A > 0; CISPO weighs it 1.28. Ratio 0.5 keeps weight 0.5 (no lower bound) or
    0.8 with --clip-eps 0.2."""
    ratios = [1.5, 0.5, 1.1]
    logp = torch.tensor([[math.log(r) for r in ratios]], dtype=torch.float64).requires_grad_()
    old = torch.zeros(1, 3, dtype=torch.float64)
    mask = torch.ones(1, 3)
    adv = torch.tensor([2.0])
    loss, stats = cispo_loss(logp, old, mask, torch.zeros(1), torch.zeros(1), advantages=adv, return_metrics=True)
    w = torch.tensor([[1.28, 0.5, 1.1]], dtype=torch.float64)
    assert loss.item() == pytest.approx(-(w * 2.0 * logp.detach()).sum().item() / 3, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(logp.grad, -w * 2.0 / 3)
    assert stats["clip_frac"].item() == pytest.approx(1 / 3)
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / 3)
    logp.grad = None
    cispo_loss(logp, old, mask, torch.zeros(1), torch.zeros(1), clip_eps=0.2, advantages=adv).backward()
    torch.testing.assert_close(logp.grad, -torch.tensor([[1.28, 0.8, 1.1]], dtype=torch.float64) * 2.0 / 3)
    logp.grad = None
    ppo_loss(logp, old, mask, adv, clip_eps=0.2, clip_eps_high=0.28).backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] != 0  # PPO: the first token is clipped out


def test_cispo_on_policy_is_grpo_and_off_policy_differs():
    """At ratio 1 CISPO's gradient is GRPO's, under every aggregation. Off-policy it is the
    unclipped surrogate's (GRPO with an infinite clip range: rho A dlogp) times clip(rho) / rho,
    with and without TIS."""
    logp, old, mask, rewards, gid = _batch()
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"):
        x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        cispo_loss(x, logp, mask, rewards, gid, loss_agg_mode=agg, norm_tokens=5).backward()
        grpo_loss(y, logp, mask, rewards, gid, loss_agg_mode=agg, norm_tokens=5).backward()
        torch.testing.assert_close(x.grad, y.grad)
        assert x.grad.abs().sum() > 0
    rollout = old + torch.tensor([[0.1, -0.2, 0.9], [0.0, 1.5, 0.0], [-0.3, 0.2, 0.1], [0.0, -2.0, 0.4]])
    ratio = torch.exp(logp - old)
    for lo, hi, tis in ((1.0, 0.28, None), (0.2, 0.2, 2.0)):
        x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        extra = dict(rollout_logp=rollout, is_cap=tis) if tis else {}
        cispo_loss(x, old, mask, rewards, gid, lo, hi, **extra).backward()
        grpo_loss(y, old, mask, rewards, gid, clip_eps=1e9, clip_eps_high=1e9, **extra).backward()  # rho A
        torch.testing.assert_close(x.grad, y.grad * ratio.clamp(1 - lo, 1 + hi) / ratio)
