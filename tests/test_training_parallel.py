"""Training in any (tp, pp, dp) layout equals one rank: losses of 3 iterations and the final
weights (fp32, relative 1e-5), through the 1F1B schedule, ZeRO-1 Adam and SP."""

import argparse
import math

import pytest
import torch

from megatron_k15.data.sft import PackedSFTStream
from megatron_k15.models.config import preset
from megatron_k15.models.sharding import merge_shards, split_tensor
from megatron_k15.testing import random_sft_samples, run_distributed

SEQ, GBS, MBS, ITERS = 32, 8, 1, 3


def _samples():
    return random_sft_samples(40, 30)


def _args(sequence_parallel=True):
    # adam_eps 1e-4: Adam turns the rounding noise of mathematically-zero grads (e.g. the K bias,
    # which softmax ignores) into lr-sized steps; a larger eps keeps the weight comparison meaningful
    return argparse.Namespace(lr=3e-3, weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-4,
                              clip_grad=0.5, attention_backend="sdpa", params_dtype=torch.float32,
                              sequence_parallel=sequence_parallel, recompute_granularity="full", grad_bucket_numel=5000)


MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32)


def train_worker(rank, world_size, tp, pp, qk_layernorm=False, sequence_parallel=True, moe=False, ep=1):
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.parallel.data import lr_at
    from megatron_k15.train_sft import sft_forward_step
    from megatron_k15.training import build_train_context, reduce_sums, train_step

    initialize_model_parallel(tp, pp, ep=ep)
    cfg = preset("tiny", num_layers=4, init_method_std=0.05, qk_layernorm=qk_layernorm, **(MOE if moe else {}))
    args = _args(sequence_parallel)
    args.moe_aux_loss_coeff = 0.05 if moe else 0.0
    args.log_num_zeros_in_grad = True
    ctx = build_train_context(args, cfg, seed=11)
    stream = PackedSFTStream(_samples(), SEQ, seed=3)
    dp, dp_rank = ctx.pc.dp_size, ctx.pc.dp_rank
    per = GBS // dp
    losses, norms, aux, zeros = [], [], [], []
    for it in range(ITERS):
        rows = stream.rows(it * GBS, GBS)
        total = sum(stream.loss_tokens(r) for r in rows)
        mine = rows[dp_rank * per:(dp_rank + 1) * per]
        mbs = [stream.microbatch(mine[k:k + MBS]) for k in range(0, per, MBS)]
        lr = lr_at(it, 3e-3, 3e-4, 1, ITERS)
        results, norm = train_step(ctx, mbs, sft_forward_step(ctx.model, total), lr)
        loss_sum, tokens = reduce_sums([sum(r[0] for r in results), sum(r[1] for r in results)], ctx)
        losses.append(loss_sum / tokens)
        norms.append(norm)
        aux.append(ctx.moe_aux_loss)
        zeros.append(ctx.num_zeros_in_grad)
        if moe:  # coeff x the mean over the step's GBS / MBS microbatches, whatever the layout
            assert all(m.aux_loss_scale == 1.0 / (GBS // MBS) for m in ctx.model.moe_layers())
    # train_sft --valid-data's held-out loss (forward only, rows over dp, stages via 1F1B)
    from megatron_k15.train_sft import validation_loss

    valid = validation_loss(ctx, stream, MBS, torch.device("cpu"), max_rows=GBS + 2)
    return {"losses": losses, "norms": norms, "aux": aux, "zeros": zeros,
            "zero_rows": (ctx.model.padded_vocab_size - cfg.vocab_size) * cfg.hidden_size, "tp_rank": ctx.pc.tp_rank, "pp_rank": ctx.pc.pp_rank,
            "dp_rank": dp_rank, "state": ctx.model.checkpoint_state_dict(all_experts=True), "valid": valid,
            "optimizer": ctx.optimizer.state_dict()["master"], "params_norm": ctx.optimizer.params_norm()}


def _full_weights(results):
    shards = {(r["tp_rank"], r["pp_rank"]): r["state"] for r in results if r["dp_rank"] == 0}
    return merge_shards(shards, preset("tiny").vocab_size)


@pytest.fixture(scope="module")
def reference():
    return run_distributed(train_worker, 1, 1, 1)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,dp", [(2, 2, 1), (1, 2, 2), (2, 1, 2)])
def test_layout_equals_one_rank(reference, tp, pp, dp):
    _assert_equal_to_reference(run_distributed(train_worker, tp * pp * dp, tp, pp), reference)


@pytest.mark.slow
def test_qk_layernorm_under_tp_without_sequence_parallel_equals_one_rank():
    """Qwen3's per-head q/k norms: each tp rank's grad covers its own heads only, a partial sum
    the optimizer must all-reduce over tp even without sequence parallelism."""
    reference = run_distributed(train_worker, 1, 1, 1, True)
    assert any("q_layernorm" in name for name in reference[0]["state"])
    _assert_equal_to_reference(run_distributed(train_worker, 2, 2, 1, True, False), reference)


@pytest.mark.slow
def test_mixture_of_experts_under_tp_and_dp_equals_one_rank():
    """MoE layers: experts split over tp, the replicated router's grads partial over tp (each
    rank's ffn slice), ZeRO-1 over dp, the load-balancing loss (with full recompute: the
    recomputed layer must not count it twice); routing, losses, aux losses and weights equal
    one rank."""
    reference = run_distributed(train_worker, 1, 1, 1, False, True, True)
    assert any("experts.linear_fc1" in name for name in reference[0]["state"])
    assert all(0.0 < a < 4 / 2 for a in reference[0]["aux"])  # 1 for even routing, E / k = 2 at worst
    results = run_distributed(train_worker, 4, 2, 1, False, True, True)
    _assert_equal_to_reference(results, reference)
    for r in results:
        assert r["aux"] == pytest.approx(reference[0]["aux"], rel=1e-6)


@pytest.fixture(scope="module")
def moe_reference():
    return run_distributed(train_worker, 1, 1, 1, False, True, True)


@pytest.mark.parametrize("tp,pp,dp,ep", [(1, 1, 2, 2), (2, 1, 2, 2), (1, 2, 2, 2), (1, 1, 4, 4)])
def test_expert_parallel_equals_one_rank(moe_reference, tp, pp, dp, ep):
    """Experts split over ep of the dp ranks, tokens exchanged by all-to-all, expert grads
    reduced (and Adam sharded) over the expert-data-parallel group: losses, grad norms, aux
    losses, held-out loss (dp=4 gets uneven validation rows: the ranks with fewer run empty
    microbatches to serve the others' experts), weights and fp32 master weights (gathered to
    all experts, as checkpoints hold them) equal one rank."""
    results = run_distributed(train_worker, tp * pp * dp, tp, pp, False, True, True, ep)
    _assert_equal_to_reference(results, moe_reference)
    for r in results:
        assert r["aux"] == pytest.approx(moe_reference[0]["aux"], rel=1e-6)
    ref_master = moe_reference[0]["optimizer"]
    for r in results:
        for name, w in r["optimizer"].items():
            if ".mlp.experts." in name:
                want = split_tensor(ref_master[name], name, tp, r["tp_rank"])
                assert w.shape == want.shape  # all 4 experts, this tp rank's slice of each
                torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-6)


def _assert_equal_to_reference(results, reference):
    ref = reference[0]
    # it trains: every step has a gradient (lr > 0), so equal weights are not the initial ones
    # (the loss of 3 steps on different rows is too noisy to show it)
    assert all(n > 0 for n in ref["norms"])
    for r in results:
        for a, b in zip(r["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-5 * abs(b)
        for a, b in zip(r["norms"], ref["norms"]):
            assert abs(a - b) <= 1e-5 * abs(b)
        assert r["valid"]["valid_tokens"] == ref["valid"]["valid_tokens"] > 0
        assert abs(r["valid"]["valid_loss"] - ref["valid"]["valid_loss"]) <= 1e-5 * ref["valid"]["valid_loss"]
        # --log-num-zeros-in-grad: the vocabulary padding's rows (their number depends on tp), and
        # otherwise the same zeros in every layout up to an element that rounds to 0 in one order
        # of summation and not in another (seen: 1 of ~200K in one step)
        for z, zr in zip(r["zeros"], ref["zeros"]):
            assert abs((z - r["zero_rows"]) - (zr - ref["zero_rows"])) <= 2 and zr >= ref["zero_rows"] > 0
    ref_w, got_w = _full_weights(reference), _full_weights(results)
    assert sorted(ref_w) == sorted(got_w)
    # --log-params-norm: every weight once, whatever the layout (the full weights' norm)
    full = math.sqrt(math.fsum(float(w.double().pow(2).sum()) for w in ref_w.values()))
    for r in reference + results:
        assert abs(r["params_norm"] - full) <= 1e-5 * full, (r["params_norm"], full)
    for name, w in ref_w.items():
        scale = max(1e-3, w.abs().max().item())
        assert (got_w[name] - w).abs().max().item() <= 1e-5 * scale, name
