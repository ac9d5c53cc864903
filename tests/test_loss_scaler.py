"""fp16 loss scaling: the dynamic scaler's rules (hand-derived sequences), gradients that
underflow fp16 recovered by the scale, overflowing steps skipped with the weights untouched,
a power-of-two scale that changes nothing in fp32 (MoE load-balancing gradient included),
the scale carried through checkpoints, and the flags' checks."""

import argparse
import os
import subprocess
import sys

import pytest
import torch

from megatron_k15.arguments import ArgumentError, build_parser, validate_args
from megatron_k15.parallel.loss_scaler import ConstantLossScaler, DynamicLossScaler, loss_scaler_from_args
from megatron_k15.testing import random_sft_samples, run_distributed


def test_dynamic_scaler_backs_off_after_hysteresis_and_grows_after_a_clean_window():
    s = DynamicLossScaler(initial_scale=1024.0, min_scale=64.0, growth_interval=3, hysteresis=2)
    seen = []
    for found_inf in [True, True, True, False, False, False, True, False, False, False, False]:
        s.update(found_inf)
        seen.append(s.scale)
    # first overflow only spends hysteresis, then every overflow halves until a clean window
    # (3 steps) doubles the scale and restores the hysteresis; an overflow resets the window
    assert seen == [1024, 512, 256, 256, 256, 512, 512, 512, 512, 1024, 1024]
    for _ in range(10):
        s.update(True)
    assert s.scale == 64.0 and not s.can_back_off  # floored at the minimum


def test_scaler_state_round_trip_continues_identically():
    a = DynamicLossScaler(initial_scale=2.0 ** 10, growth_interval=4, hysteresis=3)
    for f in [True, False, False]:
        a.update(f)
    b = DynamicLossScaler(initial_scale=2.0 ** 10, growth_interval=4, hysteresis=3)
    b.load_state_dict(a.state_dict())
    for f in [False, False, True, True, True, False]:
        a.update(f)
        b.update(f)
        assert a.state_dict() == b.state_dict()
    c = ConstantLossScaler(8.0)
    c.update(True)
    assert c.scale == 8.0 and not c.can_back_off


def _parse(*flags):
    args = build_parser(groups=("model", "parallel", "precision", "training")).parse_args(list(flags))
    validate_args(args, world_size=1)
    return args


def test_flags_choose_the_scaler_and_bad_combinations_name_the_flag():
    assert loss_scaler_from_args(_parse()) is None
    assert loss_scaler_from_args(_parse("--bf16")) is None
    dyn = loss_scaler_from_args(_parse("--fp16", "--initial-loss-scale", "65536", "--hysteresis", "1",
                                       "--loss-scale-window", "50"))
    assert isinstance(dyn, DynamicLossScaler)
    assert (dyn.scale, dyn.hysteresis, dyn.growth_interval) == (65536.0, 1, 50)
    const = loss_scaler_from_args(_parse("--fp16", "--loss-scale", "128"))
    assert type(const) is ConstantLossScaler and const.scale == 128.0
    for flags, needle in [(("--loss-scale", "128"), "--loss-scale applies to --fp16"),
                          (("--fp16", "--loss-scale", "0"), "--loss-scale must be > 0"),
                          (("--fp16", "--min-loss-scale", "8", "--initial-loss-scale", "4"), "--min-loss-scale"),
                          (("--fp16", "--hysteresis", "0"), "--hysteresis must be >= 1"),
                          (("--fp16", "--loss-scale-window", "0"), "--loss-scale-window must be >= 1")]:
        with pytest.raises(ArgumentError, match=needle):
            _parse(*flags)


def test_rl_starts_the_dynamic_scale_lower_than_sft():
    """Megatron-LM's 2^32 for SFT; 2^16 for RL, where each skipped step drops an update of
    rollouts (about two per halving on the way down from 2^32); an explicit flag wins."""
    from megatron_k15.arguments import build_parser
    from megatron_k15.train_rl import add_rl_args

    rl = build_parser(extra_args_provider=add_rl_args)
    assert loss_scaler_from_args(rl.parse_args(["--prompt-data", "p", "--fp16"])).scale == 2.0 ** 16
    assert loss_scaler_from_args(rl.parse_args(["--prompt-data", "p", "--fp16", "--initial-loss-scale",
                                                "1024"])).scale == 1024.0
    assert loss_scaler_from_args(_parse("--fp16")).scale == 2.0 ** 32


SEQ, GBS = 32, 4


def _ctx(dtype, scaler=None, moe=False, clip_grad=1.0):
    from megatron_k15.models.config import preset
    from megatron_k15.training import build_train_context

    cfg = preset("tiny", num_layers=2, init_method_std=0.05,
                 **(dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32) if moe else {}))
    args = argparse.Namespace(lr=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
                              clip_grad=clip_grad, attention_backend="sdpa", params_dtype=dtype,
                              recompute_granularity=None, moe_aux_loss_coeff=0.1 if moe else 0.0)
    ctx = build_train_context(args, cfg, seed=5)
    ctx.optimizer.loss_scaler = scaler
    return ctx


def _step(ctx, it=0, loss_factor=1.0):
    """One train_step on GBS packed rows; ``loss_factor`` shrinks the loss (and every gradient)."""
    from megatron_k15.data.sft import PackedSFTStream
    from megatron_k15.train_sft import sft_forward_step
    from megatron_k15.training import train_step

    stream = PackedSFTStream(random_sft_samples(40, 30), SEQ, seed=3)
    rows = stream.rows(it * GBS, GBS)
    total = sum(stream.loss_tokens(r) for r in rows)
    inner = sft_forward_step(ctx.model, total)

    def step(mb, hidden):
        loss, res = inner(mb, hidden)
        return loss * loss_factor, res

    _, norm = train_step(ctx, [stream.microbatch(rows[:2]), stream.microbatch(rows[2:])], step, 1e-3)
    return norm


def _weights(ctx):
    return {n: p.detach().float().clone() for n, p in ctx.model.named_parameters()}


def _scaling_worker(rank, world_size):
    from megatron_k15.initialize import initialize_model_parallel

    initialize_model_parallel(1, 1)
    out = {}
    # 1. gradients 1e-6 of a normal loss's: below fp16's range unless the loss is scaled
    tiny = 1e-6
    out["fp32_norm"] = _step(_ctx(torch.float32), loss_factor=tiny)
    out["fp16_unscaled_norm"] = _step(_ctx(torch.float16), loss_factor=tiny)
    out["fp16_scaled_norm"] = _step(_ctx(torch.float16, ConstantLossScaler(2.0 ** 24)), loss_factor=tiny)

    # 2. a scale that overflows fp16 (max 65504): skipped steps, weights untouched, scale halves
    ctx = _ctx(torch.float16, DynamicLossScaler(initial_scale=2.0 ** 40, hysteresis=1, growth_interval=1000))
    before = _weights(ctx)
    trace = []
    for it in range(40):
        norm = _step(ctx, it)
        trace.append((ctx.optimizer.last_step_skipped, ctx.optimizer.unrecoverable_overflow,
                      ctx.optimizer.loss_scale, norm))
        if not ctx.optimizer.last_step_skipped:
            break
        assert all(torch.equal(before[n], w) for n, w in _weights(ctx).items())
    out["trace"] = trace
    out["moved"] = any(not torch.equal(before[n], w) for n, w in _weights(ctx).items())
    out["state"] = ctx.optimizer.state_dict(moments=False)["loss_scaler"]
    stuck = _ctx(torch.float16, DynamicLossScaler(initial_scale=2.0 ** 40, min_scale=2.0 ** 40, hysteresis=1))
    _step(stuck)
    out["stuck"] = (stuck.optimizer.last_step_skipped, stuck.optimizer.unrecoverable_overflow)

    # 3. fp32 with a power-of-two scale: the same steps as no scaling (MoE aux gradient included)
    runs = []
    for scaler in (None, ConstantLossScaler(2.0 ** 12)):
        ctx = _ctx(torch.float32, scaler, moe=True, clip_grad=0.05)  # the clip is active too
        norms = [_step(ctx, it) for it in range(2)]
        runs.append((norms, _weights(ctx)))
    out["fp32_runs"] = runs
    return out


@pytest.fixture(scope="module")
def scaling():
    return run_distributed(_scaling_worker, 1)[0]


def test_loss_scale_recovers_gradients_that_underflow_fp16(scaling):
    ref = scaling["fp32_norm"]
    assert abs(scaling["fp16_scaled_norm"] - ref) < 0.02 * ref
    # unscaled, most of the gradient flushes to zero in fp16
    assert scaling["fp16_unscaled_norm"] < 0.5 * ref


def test_overflowing_steps_are_skipped_and_the_scale_backs_off(scaling):
    trace = scaling["trace"]
    assert len(trace) > 1 and trace[0][0], "2^40 must overflow fp16 at first"
    for k, (skipped, unrecoverable, scale, norm) in enumerate(trace[:-1]):
        assert skipped and not unrecoverable and not norm < float("inf")
        assert scale == 2.0 ** (40 - (k + 1))  # hysteresis 1: halved at every overflow
    skipped, _, scale, norm = trace[-1]
    assert not skipped and scale == trace[-2][2] and 0 < norm < float("inf")
    assert scaling["moved"]
    assert scaling["state"]["scale"] == scale
    assert scaling["stuck"] == (True, True)  # at --min-loss-scale nothing is left to try


def test_power_of_two_scale_in_fp32_changes_nothing_moe_aux_included(scaling):
    # multiplying by 2^12 and dividing it out is exact in binary floating point: bitwise equal
    (norms_a, w_a), (norms_b, w_b) = scaling["fp32_runs"]
    assert norms_a == norms_b
    for n in w_a:
        assert torch.equal(w_b[n], w_a[n]), n


def _checkpoint_worker(rank, world_size, save_dir):
    from megatron_k15.checkpointing import load_checkpoint, save_checkpoint
    from megatron_k15.initialize import initialize_model_parallel

    initialize_model_parallel(1, 1)
    ctx = _ctx(torch.float16, DynamicLossScaler(initial_scale=2.0 ** 40, hysteresis=2, growth_interval=7))
    for it in range(3):
        _step(ctx, it)
    saved = ctx.optimizer.loss_scaler.state_dict()
    save_checkpoint(save_dir, 3, ctx, {})
    fresh = _ctx(torch.float16, DynamicLossScaler(initial_scale=2.0 ** 40, hysteresis=2, growth_interval=7))
    load_checkpoint(save_dir, fresh)
    return saved, fresh.optimizer.loss_scaler.state_dict()


def test_loss_scale_survives_a_checkpoint(tmp_path):
    saved, loaded = run_distributed(_checkpoint_worker, 1, str(tmp_path))[0]
    assert saved["scale"] < 2.0 ** 40  # it moved
    assert loaded == saved
    # and the checkpoint inspector shows it
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "checkpoint",
                        "inspect_checkpoint.py")
    out = subprocess.run([sys.executable, tool, "--load", str(tmp_path)], capture_output=True, text=True, check=True)
    assert f"fp16 loss scale {saved['scale']:g}" in out.stdout
