"""The RL iteration: same update in every tp/pp/cp/dp layout with the same seeds; partial
rollouts continue across iterations with old segments masked out of the loss; OMD raises the
log-probability of rewarded responses."""

import argparse
import collections
import functools
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from megatron_k15.generation.replay_buffer import Trajectory
from megatron_k15.models.sharding import merge_shards
from megatron_k15.rl.trainer import (build_microbatches, build_packed_microbatches, mismatch_sums, pack_by_tokens,
                                     packed_to_rows)
from megatron_k15.testing import run_distributed

PROMPTS = [f"{a}+{b}=" for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]


def graded_reward(response: str, record: dict) -> float:
    """A dense reward for an untrained model (which never answers the sums): a hash of the
    response text in [0, 1), so the samples of a group get different rewards and every update
    really moves the weights."""
    return (sum(ord(c) for c in response) % 97) / 97.0


GRADE_TIMES: list = []  # when timed_reward graded (in the rank's process)


def timed_reward(response: str, record: dict) -> float:
    import time

    GRADE_TIMES.append(time.monotonic())
    return graded_reward(response, record)


def half_flat_reward(response: str, record: dict) -> float:
    """Every sample of q0 and q2 scores 1 (flat groups: zero advantage), the others as
    ``graded_reward``."""
    return 1.0 if record["id"] in ("q0", "q2") else graded_reward(response, record)


LETTERS = [chr(c) for c in range(ord("a"), ord("z") + 1)]


def no_letter_reward(response: str, record: dict) -> float:
    """1 when the graded text holds no lowercase ASCII letter (with every letter a stop string,
    the text before the first one never does)."""
    return float(not any(c in LETTERS for c in response))


def parity_reward(response: str, record: dict) -> float:
    """The fraction of the response's characters whose byte value has the parity of the
    prompt's index: learnable only by conditioning on the prompt, ~0.5 for a random policy."""
    want = int(record["id"][1:]) % 2
    return sum(ord(c) % 2 == want for c in response) / max(1, len(response))


def logged_reward(response: str, record: dict) -> float:
    """``graded_reward``, and one line "process thread" in $K15_REWARD_LOG; waits a little, so
    parallel graders overlap."""
    import threading
    import time

    with open(os.environ["K15_REWARD_LOG"], "a") as f:
        f.write(f"{os.getpid()}:{threading.get_ident()}\n")
    time.sleep(0.05)
    return graded_reward(response, record)


def _records(reward_fn="graded_reward"):
    recs = []
    for i, p in enumerate(PROMPTS):
        a, b = p[:-1].split("+")
        recs.append({"id": f"q{i}", "prompt": p, "task": "math", "answer": str(int(a) + int(b)),
                     "reward_fn": f"{__name__}:{reward_fn}"})
    return recs


def _args(**kw):
    base = dict(lr=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-4, clip_grad=1.0,
                attention_backend="sdpa", params_dtype=torch.float32, sequence_parallel=True,
                recompute_granularity=None, grad_bucket_numel=10_000, rl_loss="omd", rl_tau=0.05,
                exact_logz=False, clip_eps=None, clip_eps_high=None, kl_coef=0.0, ref_load=None, rollout_is_cap=None,
                skip_zero_advantage=False, reward_workers=1, loss_agg_mode="token-mean", dynamic_sampling=False, dynamic_sampling_max_rounds=4,
                use_dynamic_batch_size=False, max_tokens_per_gpu=None,
                overlong_buffer_tokens=0, overlong_penalty_factor=1.0, overlong_filter=False, samples_per_prompt=4, rollout_max_tokens=6,
                rollout_segment_tokens=0, rollout_batch_size=64, temperature=1.0, top_p=1.0, top_k=0,
                seed=5, no_repeat_detection=False, length_penalty_weight=0.1, length_penalty_start_iter=0,
                repeat_penalty=0.0, micro_batch_size=3, updates_per_iter=2, keep_optimizer_state=False,
                include_old_segments=False, replay_buffer_size=0, replay_max_age=0)
    base.update(kw)
    return argparse.Namespace(**base)


def rl_worker(rank, world_size, tp, loss, segment, iters=2, pp=1, cp=1, opts=None):
    from megatron_k15.data.tokenizer import ByteTokenizer
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.config import preset
    from megatron_k15.rl.trainer import RLIteration
    from megatron_k15.training import build_train_context

    opts = dict(opts or {})
    moe = opts.pop("moe", None)  # an MoE model's expert fields (test_training_parallel.MOE)
    initialize_model_parallel(tp, pp, cp, ep=opts.pop("ep", 1))
    reward_fn = opts.pop("reward_fn", "graded_reward")
    shift = opts.pop("shift_rollout_logprobs", 0.0)
    extra_eos = opts.pop("extra_eos_ids", [])
    lr = opts.pop("run_lr", 1e-3)
    save_init = opts.pop("save_init", None)
    prompts = opts.pop("prompts", None)  # per iteration; default: [0, 1] then [2, 3]
    more = opts.pop("draw_prompts", None)  # what --dynamic-sampling's further rounds draw, in turn
    tasks = opts.pop("tasks", None)  # task names, prompt i gets tasks[i % len] (grading is unchanged)
    poison = opts.pop("nan_grad_at_step", None)  # a NaN in the gradient of that optimizer step (0-based)
    tool_calls = opts.pop("tool_calls", 0)  # > 0: a letter calls a tool, up to this many times per response
    silent = opts.pop("tool_silent_ranks", ())  # ranks whose responses never call it
    args = _args(rl_loss=loss, rollout_segment_tokens=segment, **opts)
    ctx = build_train_context(args, preset("tiny", init_method_std=0.3, **(moe or {})), seed=7)
    if save_init:  # the initial weights as a checkpoint (a --ref-load for this or another layout)
        from megatron_k15.checkpointing import save_checkpoint

        save_checkpoint(save_init, None, ctx, save_optimizer=False)
    if poison is not None:
        real_step, calls = ctx.optimizer.step, []

        def poisoned_step(lr=None):
            if len(calls) == poison:
                ctx.optimizer.buckets[0].shard_grad[0] = float("nan")
            calls.append(lr)
            return real_step(lr)

        ctx.optimizer.step = poisoned_step
    tok = ByteTokenizer()
    recs = _records(reward_fn)
    for i, r in enumerate(recs if tasks else []):
        r["task"] = tasks[i % len(tasks)]
    rl = RLIteration(ctx, args, tok, recs, [tok.encode(r["prompt"]) for r in recs])
    rl.eos_ids = rl.eos_ids + list(extra_eos)  # more ways to stop: some responses end early
    if tool_calls:  # the tool answers with its rank in the replica: all must insert the first's answer
        from megatron_k15.generation.stop_strings import StopStrings
        from megatron_k15.rl.tools import TOOL_STOP_REASON, ToolRunner, ToolUse

        in_replica = ctx.pc.tp_rank + ctx.pc.tp_size * ctx.pc.pp_rank
        trigger = ["\x01never"] if rank in silent else LETTERS
        rl.settings.tools = ToolUse(tok, StopStrings(tok, trigger, reason=TOOL_STOP_REASON),
                                    ToolRunner(lambda text: f"[{in_replica}:{len(text)}]", 2, rl.gen_rank),
                                    tool_calls)
    if shift:  # the engine "records" log-probs lower by `shift` than the training forward's
        generate = rl.generator.generate

        def shifted(*a, **k):
            results = generate(*a, **k)
            for res in results:
                res.output_logprobs = [x - shift for x in res.output_logprobs]
            return results

        rl.generator.generate = shifted
    metrics, states = [], []
    for it in range(iters):
        draw = (lambda n: more.pop(0)) if more else None
        metrics.append(rl.run(it, prompts[it] if prompts else [0, 1, 2, 3][it % 2 * 2: it % 2 * 2 + 2], lr, draw))
        states.append({k: v.clone() for k, v in ctx.model.checkpoint_state_dict(all_experts=True).items()})
    return {"metrics": metrics, "tp_rank": ctx.pc.tp_rank, "pp_rank": ctx.pc.pp_rank, "dp_rank": ctx.pc.dp_rank,
            "cp_rank": ctx.pc.cp_rank, "state": states[-1], "states": states, "buffer": rl.buffer.state_dict()}


def _weights(results, iteration=-1):
    """The full weights after ``iteration`` (index into the iterations run), from the shards."""
    return merge_shards({(r["tp_rank"], r["pp_rank"]): r["states"][iteration] for r in results
                         if r["dp_rank"] == 0 and r["cp_rank"] == 0}, 260)


# Responses of up to 12 tokens after 4-token prompts: rows of 15 tokens, padded to 16, so under
# cp=2 (chunks of 4; rank 0 holds positions 0-3 and 12-15) both cp ranks hold response tokens and
# a missing all-reduce of OMD's sequence sums changes the update. Two samples per prompt and
# microbatches of one keep the interpreted ring attention short (two microbatches per update).
LAYOUT_OPTS = {"rollout_max_tokens": 12, "samples_per_prompt": 2, "micro_batch_size": 1}


@functools.lru_cache(maxsize=None)
def _single_rank(loss):
    """The reference: the same two iterations on one rank."""
    return run_distributed(rl_worker, 1, 1, loss, 0, 2, 1, 1, LAYOUT_OPTS)


# name: (world size, tp, pp, cp, iterations): tp=2; dp=2; pp=2 (1F1B, the engine passing hidden
# states between stages); cp=2 (ring attention on zigzag shards); cp=2 x tp=2 (sequence
# parallelism inside each cp shard). Ring attention runs our Triton kernels, interpreted on
# CPU, so the cp layouts take one iteration (two optimizer steps) to keep the test short.
LAYOUTS = {"tp2": (2, 2, 1, 1, 2), "dp2": (2, 1, 1, 1, 2), "pp2": (2, 1, 2, 1, 2), "cp2": (2, 1, 1, 2, 1),
           "cp2_tp2": (4, 2, 1, 2, 1)}
# metrics that must match the single-rank run (the rollouts are the same, so exactly) and those
# that go through floating-point reductions in another order (relative tolerance; the KL proxy
# squares a difference of two sequence log-probs of ~-30 each, so weights equal to ~1e-6 after
# the first update leave ~1e-5 of it; the second update's gradient holds that same difference,
# tau * (logp - old_logp), so its norm gets the same tolerance: measured under tp=2, 2e-6 in the
# first update and 1.1e-5 in the second with AVX-512 kernels, 5e-6 with ATEN_CPU_CAPABILITY=avx2)
EXACT = ("reward_mean", "accuracy", "response_length_mean", "response_length_max", "num_finished",
         "replay_buffer_size")
CLOSE = {"loss": 1e-5, "entropy": 1e-5, "grad_norm": 1e-4, "kl_proxy": 1e-4}


def _assert_same_update(got, ref, what, same_samples=True):
    """``same_samples``: both trained on the same samples (the model FLOPs agree too)."""
    m0 = ref[0]["metrics"]
    iters = len(got[0]["metrics"])
    for r in got:
        for a, b in zip(r["metrics"], m0):
            for k in EXACT:
                assert a[k] == b[k], (what, k, a[k], b[k])
            for k, tol in CLOSE.items():
                assert abs(a[k] - b[k]) <= tol * max(1.0, abs(b[k])), (what, k, a[k], b[k])
            if "clip_frac" in b:  # the baselines: clipped tokens counted over every shard and microbatch
                assert a["clip_frac"] == pytest.approx(b["clip_frac"], abs=1e-9), (what, a["clip_frac"], b["clip_frac"])
            if not same_samples:
                continue
            # the model FLOPs of the iteration's training passes: the same samples in every layout
            flops = [m["train_tflops_per_gpu"] * m["train_time_s"] * n * 1e12 for m, n in ((a, len(got)), (b, 1))]
            assert flops[0] == pytest.approx(flops[1], rel=1e-9) and flops[1] > 0, (what, flops)
        if iters == len(m0):
            assert r["buffer"] == ref[0]["buffer"], what
    wr, wg = _weights(ref, iters - 1), _weights(got)
    assert sorted(wr) == sorted(wg)
    for name, w in wr.items():
        # floor 0.1 on the scale: Adam turns rounding noise of ~zero grads (the K bias) into tiny steps
        assert (wg[name] - w).abs().max() <= 1e-5 * max(0.1, w.abs().max().item()), (what, name)


@pytest.mark.slow
@pytest.mark.parametrize("loss,layout", [("omd", name) for name in LAYOUTS] + [("grpo", "cp2"), ("cispo", "dp2")])
def test_rl_iterations_equal_across_layouts(loss, layout):
    ref = _single_rank(loss)
    m0 = ref[0]["metrics"]
    assert all(m["num_finished"] == 4 for m in m0) and max(m["response_length_max"] for m in m0) > 8
    # a real update: rewards differ within groups, and the second update of each iteration sees
    # a policy that the first one moved (KL proxy > 0)
    assert all(m["reward_mean"] > 0 and m["grad_norm"] > 0 and m["kl_proxy"] > 0 for m in m0)
    world, tp, pp, cp, iters = LAYOUTS[layout]
    got = run_distributed(rl_worker, world, tp, loss, 0, iters, pp, cp, LAYOUT_OPTS)
    _assert_same_update(got, ref, (loss, layout))


@pytest.mark.parametrize("tp,pp", [(2, 2), (2, 1)])
def test_tool_calls_in_rollouts_equal_one_rank(tp, pp):
    """Rollouts that call a tool (here: a letter calls it; it answers with its rank in the model
    replica and the response's length): on 4 ranks, tp=2 x pp=2 (one replica) or tp=2 x dp=2 (two), every rank
    inserts its replica's first rank's answer, so the update equals one rank's. The model's tokens after an answer are conditioned on it and the
    answers are out of the loss: the engine's log-probs equal the training forward's on the
    loss tokens (an answer's tokens carry 0)."""
    opts = {**LAYOUT_OPTS, "tool_calls": 2, "samples_per_prompt": 4}
    ref = run_distributed(rl_worker, 1, 1, "omd", 0, 2, 1, 1, opts)
    for m in ref[0]["metrics"]:
        assert m["tool_calls_mean"] > 0 and 0 < m["tool_tokens_fraction"] < 1
        assert m["rollout_logp_abs_diff"] < 1e-5 and m["grad_norm"] > 0
    got = run_distributed(rl_worker, 4, tp, "omd", 0, 2, pp, 1, opts)
    _assert_same_update(got, ref, ("omd", f"tools tp{tp} pp{pp}"))


def test_tool_calls_under_expert_parallelism_when_one_replica_never_calls():
    """ep=2: the two ranks generate apart but their engines serve each other's experts. When
    only rank 1's responses call the tool, rank 0 still goes round with it (an engine round
    without requests serves the experts) instead of leaving it waiting in the next round."""
    from test_training_parallel import MOE

    opts = dict(LAYOUT_OPTS, moe=MOE, tool_calls=2, samples_per_prompt=4, ep=2, tool_silent_ranks=[0])
    got = run_distributed(rl_worker, 2, 1, "omd", 0, 1, 1, 1, opts, timeout=300)
    m = got[0]["metrics"][0]
    assert m["tool_calls_mean"] > 0 and m["num_finished"] == 8 and m["rollout_logp_abs_diff"] < 1e-5


@pytest.mark.slow
def test_rl_with_sliding_window_and_sinks_under_cp_equals_one_rank():
    """gpt-oss's attention (a sliding layer of window 4, then a full one; attention sinks) at
    cp=2: every cp rank generates its own requests with a whole KV cache (the window cache on
    the sliding layer), and the ring trains the sliding layer on the neighbours' chunks (rows
    of 16 tokens: chunks of 4). One iteration equals one rank's."""
    opts = dict(LAYOUT_OPTS, moe={"sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
                                  "attention_sinks": True})
    ref = run_distributed(rl_worker, 1, 1, "omd", 0, 1, 1, 1, opts)
    assert ref[0]["metrics"][0]["grad_norm"] > 0
    world, tp, pp, cp, _ = LAYOUTS["cp2"]
    _assert_same_update(run_distributed(rl_worker, world, tp, "omd", 0, 1, pp, cp, opts), ref, "window cp2")


DEEPSEEK = dict(add_qkv_bias=False, multi_latent_attention=True, q_lora_rank=32, kv_lora_rank=16, qk_head_dim=16,
                qk_pos_emb_head_dim=8, v_head_dim=16, num_layers=3, num_moe_experts=4, moe_router_topk=2,
                moe_ffn_hidden_size=32, moe_norm_topk_prob=True, moe_router_score_function="sigmoid",
                moe_router_enable_expert_bias=True, moe_router_num_groups=2, moe_router_group_topk=1,
                moe_router_topk_scaling_factor=2.5, moe_shared_expert_intermediate_size=32,
                moe_layer_freq=[0, 1, 1], architecture="deepseek_v3")


@pytest.mark.slow
def test_rl_on_deepseek_v3_block_under_tp_equals_one_rank():
    """Kimi's own architecture (Moonlight / K2: MLA, DeepSeek's experts) through a whole RL
    iteration at tp=2: rollouts from the latent KV cache (whole on both tp ranks, absorbed
    queries), the update through MLA's replicated latent projections (partial gradients summed
    over tp) and the expert biases moved after each step. Two iterations equal one rank's,
    biases included."""
    opts = dict(LAYOUT_OPTS, moe=DEEPSEEK, moe_router_bias_update_rate=0.01)
    ref = run_distributed(rl_worker, 1, 1, "omd", 0, 2, 1, 1, opts)
    assert all(m["grad_norm"] > 0 and m["kl_proxy"] > 0 and m["moe_max_load_ratio"] > 1 for m in ref[0]["metrics"])
    biases = [k for k in ref[0]["state"] if k.endswith("router.expert_bias")]
    assert len(biases) == 2 and all(ref[0]["states"][0][k].abs().max() > 0 for k in biases)
    got = run_distributed(rl_worker, 2, 2, "omd", 0, 2, 1, 1, opts)
    _assert_same_update(got, ref, "deepseek tp2")
    for r in got:
        assert [m["moe_max_load_ratio"] for m in r["metrics"]] == [m["moe_max_load_ratio"] for m in ref[0]["metrics"]]
        for step in range(2):
            assert all(torch.equal(r["states"][step][k], ref[0]["states"][step][k]) for k in biases)


@pytest.mark.parametrize("packed", [False, True])
def test_rl_with_expert_parallelism_equals_one_rank(packed):
    """An MoE policy with its experts split over the two dp ranks (ep=2): rollouts (each rank's
    engine serving the other's tokens once its own requests are done), old log-probs and both
    updates equal one rank. Each update trains on one prompt group, so one rank has no
    microbatch of its own and runs empty ones that serve the other's experts (measured: 0 vs 2
    microbatches per update, also with packed microbatches of at most 20 tokens)."""
    from test_training_parallel import MOE

    opts = dict(LAYOUT_OPTS, moe=MOE)
    if packed:
        opts.update(use_dynamic_batch_size=True, max_tokens_per_gpu=20)
    ref = run_distributed(rl_worker, 1, 1, "omd", 0, 2, 1, 1, opts)
    assert all(m["grad_norm"] > 0 and m["kl_proxy"] > 0 for m in ref[0]["metrics"])
    got = run_distributed(rl_worker, 2, 1, "omd", 0, 2, 1, 1, dict(opts, ep=2))
    _assert_same_update(got, ref, ("ep2", packed))


def _grading_worker(rank, world_size, overlap, tp):
    import time

    import megatron_k15.generation.engine as engine

    ends, real = [], engine.GenerationEngine.generate

    def generate(self, *a, **k):
        out = real(self, *a, **k)
        ends.append(time.monotonic())
        return out

    engine.GenerationEngine.generate = generate
    res = rl_worker(rank, world_size, tp, "omd", 0, 1, 1, 1,
                    dict(LAYOUT_OPTS, reward_fn="timed_reward", overlap_grading=overlap))
    return res["metrics"], list(GRADE_TIMES), ends


def test_overlapped_grading_starts_during_the_rollout_and_changes_nothing():
    """--overlap-grading (the default) grades a response as soon as it is complete, while the
    engine decodes the others: the first grade comes before the rollout ends, each response is
    graded once (tp=2: the two tp ranks split them), and the iteration's metrics are those of
    grading after the rollout (--no-overlap-grading)."""
    (after,) = run_distributed(_grading_worker, 1, False, 1)
    (during,) = run_distributed(_grading_worker, 1, True, 1)
    metrics_after, times_after, ends_after = after
    metrics_during, times_during, ends_during = during
    assert min(times_after) > ends_after[0] and min(times_during) < ends_during[0]
    assert len(times_during) == len(times_after) == metrics_after[0]["num_finished"]
    for k in ("reward_mean", "loss", "grad_norm", "num_finished"):
        assert metrics_during[0][k] == metrics_after[0][k], k
    split = run_distributed(_grading_worker, 2, True, 2)
    assert sorted(len(times) for _, times, _ in split) == [2, 2]  # 4 responses, 2 per tp rank
    assert split[0][0][0]["reward_mean"] == metrics_after[0]["reward_mean"]


def _eval_worker(rank, world_size, tp):
    from megatron_k15.data.tokenizer import ByteTokenizer
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.config import preset
    from megatron_k15.models.gpt import GPTModel
    from megatron_k15.rl.evaluation import evaluate

    initialize_model_parallel(tp)
    model = GPTModel(preset("tiny", init_method_std=0.3), attention_backend="sdpa")
    model.reset_parameters(7)
    tok = ByteTokenizer()
    recs = _records("timed_reward")
    res = evaluate(model.eval(), tok, recs, [tok.encode(r["prompt"]) for r in recs], max_new_tokens=6,
                   eos_ids=[], n_samples=2, temperature=1.0, seed=3)
    return [[s["text"] for s in p["samples"]] for p in res["results"]], len(GRADE_TIMES)


def test_evaluation_splits_grading_over_the_replicas_ranks():
    """tools/evaluate and train_rl's eval: the tp ranks decode the same requests; each grades
    half of them (as the engine finishes them) and the grades are shared: the same results
    as one rank, and 8 responses graded 8 times in all, not 16."""
    (one,) = run_distributed(_eval_worker, 1, 1)
    two = run_distributed(_eval_worker, 2, 2)
    assert one[1] == 8 and [n for _, n in two] == [4, 4]
    assert two[0][0] == two[1][0] == one[0]


@pytest.mark.slow
def test_seq_mean_token_mean_under_cp_matches_one_rank():
    """GRPO with --loss-agg-mode seq-mean-token-mean: each cp rank's partial token sums are
    divided by their sample's whole loss-token count, so cp=2, dp=2 and packed microbatches take
    the one-rank update; responses of different lengths make it differ from token-mean's."""
    # 40 byte values also end a response: lengths 1-12
    opts = dict(LAYOUT_OPTS, extra_eos_ids=list(range(100, 140)), updates_per_iter=1)
    token_mean = run_distributed(rl_worker, 1, 1, "grpo", 0, 1, 1, 1, opts)[0]["metrics"][0]
    opts["loss_agg_mode"] = "seq-mean-token-mean"
    ref = run_distributed(rl_worker, 1, 1, "grpo", 0, 1, 1, 1, opts)
    m = ref[0]["metrics"][0]
    assert m["response_length_max"] > m["response_length_mean"]
    assert abs(m["grad_norm"] - token_mean["grad_norm"]) > 1e-3 * token_mean["grad_norm"]
    world, tp, pp, cp, iters = LAYOUTS["cp2"]
    got = run_distributed(rl_worker, world, tp, "grpo", 0, iters, pp, cp, opts)
    _assert_same_update(got, ref, "seq-mean cp2")
    # dp=2: each rank normalises its own samples by the global sample count
    got = run_distributed(rl_worker, 2, 1, "grpo", 0, 1, 1, 1, opts)
    _assert_same_update(got, ref, "seq-mean dp2")
    # packed microbatches: the per-sample token counts follow the samples into their rows
    packed = run_distributed(rl_worker, 1, 1, "grpo", 0, 1, 1, 1,
                             dict(opts, use_dynamic_batch_size=True, max_tokens_per_gpu=40))
    _assert_same_update(packed, ref, "seq-mean packed")
    # responses all of one length L (no early stops): then the two modes are the same loss, which
    # pins the normaliser (samples, not tokens: that would shrink the loss and gradient by L)
    equal = run_distributed(rl_worker, 1, 1, "grpo", 0, 1, 1, 1, dict(LAYOUT_OPTS, loss_agg_mode="seq-mean-token-mean"))
    m, t = equal[0]["metrics"][0], _single_rank("grpo")[0]["metrics"][0]
    assert m["response_length_max"] == m["response_length_mean"] == 12
    for k in ("loss", "grad_norm"):
        assert m[k] == pytest.approx(t[k], rel=1e-5), k


@pytest.mark.slow
def test_dr_grpo_and_rloo_updates():
    """Dr. GRPO (group-mean advantages, --loss-agg-mode seq-mean-token-sum-norm): with every
    response at the budget (12 tokens) its loss is token-mean's over the same advantages, which
    pins the normaliser (samples) and the divisor (the budget); with early stops dp=2 takes the
    one-rank update. RLOO with 2 samples per prompt is group-mean times 2: twice the gradient."""
    one = dict(LAYOUT_OPTS, updates_per_iter=1)  # one update: the logged loss is the first forward's
    dr = dict(one, advantage_estimator="group-mean")
    token_mean = run_distributed(rl_worker, 1, 1, "ppo", 0, 1, 1, 1, one)[0]["metrics"][0]
    full = run_distributed(rl_worker, 1, 1, "grpo", 0, 1, 1, 1, dict(dr, loss_agg_mode="seq-mean-token-sum-norm"))
    m = full[0]["metrics"][0]
    assert m["response_length_max"] == m["response_length_mean"] == 12
    # ppo's advantages are group-mean, its aggregation token-mean (the losses at ratio 1 are the
    # mean advantage, 0 up to rounding: the gradients tell)
    assert m["grad_norm"] == pytest.approx(token_mean["grad_norm"], rel=1e-5) and token_mean["grad_norm"] > 1e-3
    rloo = run_distributed(rl_worker, 1, 1, "grpo", 0, 1, 1, 1, dict(one, advantage_estimator="rloo"))
    assert rloo[0]["metrics"][0]["grad_norm"] == pytest.approx(2 * token_mean["grad_norm"], rel=1e-5)
    opts = dict(dr, loss_agg_mode="seq-mean-token-sum-norm", extra_eos_ids=list(range(100, 140)))
    ref = run_distributed(rl_worker, 1, 1, "grpo", 0, 1, 1, 1, opts)
    assert ref[0]["metrics"][0]["response_length_max"] > ref[0]["metrics"][0]["response_length_mean"]
    _assert_same_update(run_distributed(rl_worker, 2, 1, "grpo", 0, 1, 1, 1, opts), ref, "dr-grpo dp2")


@pytest.mark.slow
def test_cispo_first_update_is_grpos():
    """With one update per iteration the policy is the rollout policy (every ratio 1), where
    CISPO's gradient is GRPO's: the same advantages (group-norm), token normaliser and weights
    after the step. (The layout test covers CISPO's off-policy second update.)"""
    one = dict(LAYOUT_OPTS, updates_per_iter=1)
    grpo = run_distributed(rl_worker, 1, 1, "grpo", 0, 1, 1, 1, one)[0]
    cispo = run_distributed(rl_worker, 1, 1, "cispo", 0, 1, 1, 1, one)[0]
    a, b = cispo["metrics"][0], grpo["metrics"][0]
    assert a["reward_mean"] == b["reward_mean"] and b["grad_norm"] > 1e-3
    assert a["clip_frac"] == b["clip_frac"] == 0.0  # on-policy: every ratio 1
    # the reference's second update moves some ratios past CISPO's 1.28: the dp2 layout test
    # then checks the clipped-token count adds up over ranks
    assert _single_rank("cispo")[0]["metrics"][1]["clip_frac"] > 0
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    for name, w in grpo["state"].items():
        torch.testing.assert_close(cispo["state"][name], w, rtol=1e-5, atol=1e-7, msg=name)


# --use-dynamic-batch-size: the iteration's trajectories packed into microbatches of at most
# 40 tokens per rank (two trajectories of <= 16 tokens share one), against the padded reference
PACKED_OPTS = dict(LAYOUT_OPTS, use_dynamic_batch_size=True, max_tokens_per_gpu=40)


@pytest.mark.slow
@pytest.mark.parametrize("loss,layout", [("omd", "one"), ("grpo", "tp2"), ("omd", "cp2")])
def test_packed_microbatches_give_the_same_update(loss, layout):
    """Packed (varlen) RL microbatches take the same update as the padded ones: on one rank,
    under tp=2 with sequence parallelism (a pad segment keeps the row divisible by tp), and
    under cp=2 (every trajectory zigzag-split on its own, ring attention over the packed row)."""
    ref = _single_rank(loss)
    world, tp, pp, cp, iters = {"one": (1, 1, 1, 1, 2), **LAYOUTS}[layout]
    got = run_distributed(rl_worker, world, tp, loss, 0, iters, pp, cp, PACKED_OPTS)
    _assert_same_update(got, ref, ("packed", loss, layout))


def _trajectory(prompt, response, logprobs, iteration=0):
    t = Trajectory(prompt_id="q", prompt_ids=prompt, sample_index=0, group_id="g")
    t.append_segment(response, logprobs, iteration=iteration, stop_reason="eos")
    return t


def test_pack_by_tokens_first_fit_decreasing():
    # 9 -> bin 0; 7 -> bin 1; 5 -> bin 2; 3 -> bin 1 (10); 2 -> bin 2 (7)
    assert pack_by_tokens([5, 3, 7, 2, 9], 10) == [[4], [1, 2], [0, 3]]
    assert pack_by_tokens([12, 4], 10) == [[0], [1]]  # longer than the budget: alone
    assert pack_by_tokens([], 10) == []


def test_packed_microbatches_hold_the_padded_rows():
    """Each packed microbatch is its trajectories' padded rows laid end to end (cu_seqlens
    between them), and packed_to_rows gives the rows back; with sequence parallelism over 4
    ranks a pad segment (mask 0) rounds the row up."""
    trajs = [_trajectory([5, 6], [10, 11, 12], [-0.1, -0.2, -0.3]),
             _trajectory([7, 8, 9], [13], [-0.4]),
             _trajectory([5], [14, 15, 16, 17, 18], [-0.5, -0.6, -0.7, -0.8, -0.9])]
    extra = {"rewards": torch.tensor([1.0, 2.0, 3.0])}
    padded = build_microbatches(trajs, 0, 3, 1, False, torch.device("cpu"), extra)[0]
    packed = build_packed_microbatches(trajs, 0, 9, False, torch.device("cpu"), extra, sp_size=4)
    # lengths 4, 3, 5 (tokens - 1): first-fit decreasing with budget 9 -> [0, 2] (9 tokens, a pad
    # segment of 3 makes 12) and [1] (3 tokens + 1 of padding)
    assert [mb["num_samples"] for mb in packed] == [2, 1]
    first, second = packed
    assert first["cu_seqlens"].tolist() == [0, 4, 9, 12] and first["input_ids"].shape == (1, 12)
    assert first["rewards"].tolist() == [1.0, 3.0] and not first["mask"][0, 9:].any()
    assert second["cu_seqlens"].tolist() == [0, 3, 4] and second["max_seqlen"] == 3
    # token_mask: 1 on every real token, 0 on padding (what the MoE load-balancing loss counts)
    assert first["token_mask"].tolist() == [[1.0] * 9 + [0.0] * 3]
    assert second["token_mask"].tolist() == [[1.0] * 3 + [0.0]]
    assert padded["token_mask"].tolist() == [[1.0] * 4 + [0.0], [1.0] * 3 + [0.0] * 2, [1.0] * 5]
    for mb, members in ((first, [0, 2]), (second, [1])):
        for key in ("input_ids", "labels", "mask", "rollout_logp"):
            rows = packed_to_rows([mb[key]], mb["cu_seqlens"], mb["num_samples"], 5)[0]
            assert rows.shape == (len(members), 5)
            for row, i in zip(rows, members):
                n = len(trajs[i].token_ids) - 1
                assert row[:n].tolist() == padded[key][i, :n].tolist(), (key, i)
                assert not row[n:].any()
    # differentiable: the gradient of a row sum reaches exactly that sample's packed tokens
    x = torch.randn(1, 12, requires_grad=True)
    packed_to_rows([x], first["cu_seqlens"], 2, 5)[0][1].sum().backward()
    assert x.grad[0].tolist() == [0] * 4 + [1] * 5 + [0] * 3


@pytest.mark.slow
def test_partial_rollouts_resume_from_the_buffer():
    """Segments of 2 tokens, trajectories of at most 6: a trajectory needs up to 3 iterations."""
    res = run_distributed(rl_worker, 1, 1, "omd", 2, 3)[0]
    m = res["metrics"]
    assert m[0]["stop_partial_fraction"] > 0 and m[0]["replay_buffer_size"] > 0
    assert m[0]["response_length_mean"] <= 2 if m[0]["num_finished"] else True
    # by iteration 2, trajectories started in iteration 0 finish with 3 segments (6 tokens)
    assert m[2]["num_finished"] > 0 and m[2]["response_length_max"] > 2


def test_stop_strings_end_rollouts_and_grading_sees_the_text_before_them():
    """--stop-strings (every lowercase letter, 8-token rollouts of a random byte model): some
    rollouts stop on a letter (stop reason 'stop', the letter's token kept in the response),
    and the verifier, grading the text before the first stop string, never sees a letter;
    without stop strings it does."""
    opts = {"reward_fn": "no_letter_reward", "rollout_max_tokens": 8, "samples_per_prompt": 8}
    free = run_distributed(rl_worker, 1, 1, "omd", 0, 1, 1, 1, opts)[0]["metrics"][0]
    stopped = run_distributed(rl_worker, 1, 1, "omd", 0, 1, 1, 1, {**opts, "stop_strings": LETTERS})[0]
    m = stopped["metrics"][0]
    assert free["accuracy"] < 1.0 and free["stop_stop_fraction"] == 0.0
    assert m["accuracy"] == 1.0 and 0.0 < m["stop_stop_fraction"] <= 1.0
    assert m["response_length_mean"] < free["response_length_mean"]


LEARN_OPTS = {"reward_fn": "parity_reward", "samples_per_prompt": 8, "micro_batch_size": 16,
              "rollout_max_tokens": 4, "length_penalty_weight": 0.0, "run_lr": 3e-3}


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["omd", "grpo"])
def test_rl_raises_the_reward(loss):
    """The whole loop learns: rollouts -> rewards -> advantages -> update. A random policy
    scores ~0.5 on ``parity_reward``; 32 iterations (2 prompts x 8 samples, 2 updates each)
    take it past 0.7. A sign error in the advantage, rewards attached to the wrong samples or
    groups, or a loss that does not reach the weights leaves it at 0.5 or drives it down.
    Margins measured over 32 runs (both losses; sampling seeds 5-16 with AVX-512 kernels and 5-8
    with ATEN_CPU_CAPABILITY=avx2, whose rounding sends runs down other paths): the first 4
    iterations average 0.45-0.60, the last 6 0.76-1.00. A higher lr (1e-2) sometimes collapses the policy onto one
    answer per prompt: rewards equal within every group, no advantage left, stuck at 0.5-0.75."""
    m = run_distributed(rl_worker, 1, 1, loss, 0, 32, 1, 1, LEARN_OPTS)[0]["metrics"]
    rewards = [x["reward_mean"] for x in m]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-6:]) / 6
    assert first < 0.65 and last > 0.7 and last - first > 0.15, rewards


SKIP_OPTS = {"reward_fn": "half_flat_reward", "updates_per_iter": 1, "length_penalty_weight": 0.0}


def test_mixed_tasks_get_metrics_per_task():
    """A prompt set of two tasks: each iteration also logs {task}/reward_mean, /accuracy,
    /response_length_mean and /samples, and the per-task means weighted by their samples give
    the overall ones."""
    m = run_distributed(rl_worker, 1, 1, "omd", 0, 1, 1, 1, {"tasks": ["math", "code"], "updates_per_iter": 1})[0]
    m = m["metrics"][0]
    assert m["math/samples"] == m["code/samples"] == 4  # prompts 0 (math) and 1 (code), 4 samples each
    for name in ("reward_mean", "accuracy", "response_length_mean"):
        assert (m[f"math/{name}"] + m[f"code/{name}"]) / 2 == pytest.approx(m[name], rel=1e-12), name
    assert m["math/reward_mean"] != m["code/reward_mean"]


def test_a_non_finite_gradient_skips_one_update_and_the_run_goes_on():
    """A NaN in the first update's gradient: that update is skipped and counted, the second one
    trains, and no weight is NaN."""
    import torch as _torch

    res = run_distributed(rl_worker, 1, 1, "omd", 0, 1, 1, 1, {"nan_grad_at_step": 0})[0]
    m = res["metrics"][0]
    assert m["skipped_updates"] == 1 and m["grad_norm"] > 0  # the last (second) update's norm
    assert all(_torch.isfinite(w).all() for w in res["state"].values())


def test_metrics_by_task_by_hand():
    from megatron_k15.rl.task_metrics import by_task

    got = by_task(["a", "b", "a"], {"x": [1.0, 5.0, 2.0], "ok": [True, False, False]})
    assert got == {"a/x": 1.5, "a/ok": 0.5, "a/samples": 2.0, "b/x": 5.0, "b/ok": 0.0, "b/samples": 1.0}
    assert by_task(["a", "a"], {"x": [1.0, 2.0]}) == {}  # one task: the overall metrics say it
    assert by_task(["a"], {"x": [3.0]}, "problems", all_tasks=["a", "b"]) == {"a/x": 3.0, "a/problems": 1.0}


@pytest.mark.slow
def test_skipping_zero_advantage_groups_gives_the_same_update():
    """One group of each iteration is flat (all samples reward 1): skipping it changes neither
    the loss, the gradient norm nor the weights (the loss stays divided by every sample of the
    update), at dp=2, where one dp rank then has nothing to train on."""
    ref = run_distributed(rl_worker, 1, 1, "omd", 0, 2, 1, 1, SKIP_OPTS)
    for m in ref[0]["metrics"]:
        assert m["zero_advantage_fraction"] == 0.5 and m["solve_all_fraction"] == 0.5
        assert m["trained_samples"] == m["num_finished"] == 8
        # the engine's recorded log-probs are the training forward's (fp32 on CPU)
        assert m["rollout_logp_abs_diff"] < 1e-5 and abs(m["rollout_kl"]) < 1e-9
    got = run_distributed(rl_worker, 2, 1, "omd", 0, 2, 1, 1, dict(SKIP_OPTS, skip_zero_advantage=True))
    for m in got[0]["metrics"]:
        assert m["trained_samples"] == 4 and m["zero_advantage_fraction"] == 0.5
    _assert_same_update(got, ref, "skip", same_samples=False)  # the flat groups are not trained


@pytest.mark.slow
def test_dynamic_sampling_trains_on_the_first_groups_with_varied_rewards():
    """DAPO's dynamic sampling with 2 groups per iteration: the first round's q0 is flat, so a
    second round draws q2 (flat) and q3; the update trains on q1 and q3 only: the same update
    as rolling out and training on just those two prompts."""
    opts = dict(SKIP_OPTS, updates_per_iter=2)
    got = run_distributed(rl_worker, 1, 1, "omd", 0, 1, 1, 1,
                          dict(opts, dynamic_sampling=True, prompts=[[0, 1]], draw_prompts=[[2, 3]]))
    ref = run_distributed(rl_worker, 1, 1, "omd", 0, 1, 1, 1, dict(opts, prompts=[[1, 3]]))
    m, r = got[0]["metrics"][0], ref[0]["metrics"][0]
    assert (m["sampling_rounds"], m["kept_groups"], m["num_finished"], m["trained_samples"]) == (2, 2, 16, 8)
    assert m["zero_advantage_fraction"] == 0.5 and r["zero_advantage_fraction"] == 0.0
    for k in ("loss", "grad_norm", "kl_proxy"):
        assert m[k] == pytest.approx(r[k], rel=1e-6, abs=1e-12), k
    for name, w in got[0]["state"].items():
        assert torch.equal(w, ref[0]["state"][name]), name
    # at dp=2 the ranks roll out each round's groups between them, agree on the kept ones and
    # take one each: the same update
    dp2 = run_distributed(rl_worker, 2, 1, "omd", 0, 1, 1, 1,
                          dict(opts, dynamic_sampling=True, prompts=[[0, 1]], draw_prompts=[[2, 3]]))
    assert all(r["metrics"][0]["sampling_rounds"] == 2 for r in dp2)
    _assert_same_update(dp2, got, "dynamic sampling dp2")
    # enough varied groups in the first round: no second round
    one = run_distributed(rl_worker, 1, 1, "omd", 0, 1, 1, 1,
                          dict(opts, dynamic_sampling=True, prompts=[[1, 3]], draw_prompts=[[0, 2]]))[0]
    assert one["metrics"][0]["sampling_rounds"] == 1 and one["metrics"][0]["num_finished"] == 8
    for name, w in one["state"].items():
        assert torch.equal(w, ref[0]["state"][name]), name
    # only flat groups (q0, q2, then q0 and q2 again as groups of their own) until the rounds run
    # out: nothing to train on, the weights stay
    flat = run_distributed(rl_worker, 1, 1, "omd", 0, 1, 1, 1,
                           dict(opts, dynamic_sampling=True, dynamic_sampling_max_rounds=2, prompts=[[0, 2]],
                                draw_prompts=[[0, 2], [1, 3]]))[0]
    m = flat["metrics"][0]
    assert (m["sampling_rounds"], m["kept_groups"], m["num_finished"], m["trained_samples"]) == (2, 0, 16, 0)
    assert m["grad_norm"] == 0.0


def test_resuming_a_run_with_a_fixed_reference_needs_it():
    from megatron_k15.rl.trainer import RLIteration
    from megatron_k15.generation.replay_buffer import ReplayBuffer

    rl = RLIteration.__new__(RLIteration)
    rl.buffer, rl.args = ReplayBuffer(), argparse.Namespace(ref_load="/ckpt/sft")
    state = rl.state_dict()
    assert state["ref_load"] == "/ckpt/sft"
    rl.load_state_dict(state)
    rl.args.ref_load = "/elsewhere/sft"  # the same weights moved: fine
    rl.load_state_dict(state)
    rl.args.ref_load = None
    with pytest.raises(ValueError, match="resume with --ref-load /ckpt/sft"):
        rl.load_state_dict(state)
    rl.load_state_dict({"replay_buffer": state["replay_buffer"]})  # a checkpoint without one


@pytest.mark.slow
def test_ranks_split_the_grading(tmp_path, monkeypatch):
    """At dp=2 every response is graded once, by one of the two ranks, and both ranks train on
    the same rewards as one rank (the all-gathered grades); with --reward-workers threads share
    one rank's grading."""
    log = tmp_path / "graded.txt"
    monkeypatch.setenv("K15_REWARD_LOG", str(log))
    opts = {"reward_fn": "logged_reward", "updates_per_iter": 1}
    got = run_distributed(rl_worker, 2, 1, "omd", 0, 1, 1, 1, opts)
    graders = log.read_text().split()
    m = got[0]["metrics"][0]
    assert len(graders) == m["num_finished"] == 8 and len({g.split(":")[0] for g in graders}) == 2
    ref = run_distributed(rl_worker, 1, 1, "omd", 0, 1, 1, 1, opts)[0]["metrics"][0]
    assert got[1]["metrics"][0]["reward_mean"] == m["reward_mean"] == ref["reward_mean"]
    # --reward-workers 4 on one rank: threads share the grading, the rewards stay the same
    log.write_text("")
    threaded = run_distributed(rl_worker, 1, 1, "omd", 0, 1, 1, 1, dict(opts, reward_workers=4))[0]["metrics"][0]
    graders = log.read_text().split()
    assert len(graders) == 8 and len(set(graders)) > 1 and threaded["reward_mean"] == ref["reward_mean"]


def test_a_prompt_drawn_twice_gets_a_group_with_other_seeds():
    from megatron_k15.rl.trainer import RLIteration, _seed_for

    rl = RLIteration.__new__(RLIteration)
    rl.args = argparse.Namespace(samples_per_prompt=2)
    rl.records_by_index = _records()
    rl.prompt_ids = {r["id"]: [1, 2] for r in rl.records_by_index}
    seen = collections.Counter()
    trajs = rl._fresh_trajectories([1, 1], 5, seen) + rl._fresh_trajectories([2, 1], 5, seen)
    assert [t.group_id for t in trajs] == ["q1@5"] * 2 + ["q1@5#1"] * 2 + ["q2@5"] * 2 + ["q1@5#2"] * 2
    assert len({_seed_for(t, 5) for t in trajs}) == len(trajs)


@pytest.mark.slow
def test_truncated_importance_sampling_weights_the_update():
    """GSPO with the engine's recorded log-probs 0.5 below the training forward's: the logged
    mismatch is 0.5, every weight exp(0.5) = 1.65 is capped at 1.5, and the gradient (one
    update, the same rollouts) is exactly 1.5 x the one without TIS."""
    opts = {"updates_per_iter": 1, "shift_rollout_logprobs": 0.5}
    plain = run_distributed(rl_worker, 1, 1, "gspo", 0, 1, 1, 1, opts)[0]["metrics"][0]
    tis = run_distributed(rl_worker, 1, 1, "gspo", 0, 1, 1, 1, dict(opts, rollout_is_cap=1.5))[0]["metrics"][0]
    assert plain["rollout_logp_abs_diff"] == pytest.approx(0.5, abs=1e-5)
    assert plain["rollout_kl"] == pytest.approx(math.exp(0.5) - 1.5, abs=1e-4)
    assert tis["rollout_is_capped_fraction"] == 1.0 and plain["grad_norm"] > 0
    # (the grad norm before clipping; the loss itself is ~0 at ratio 1: advantages sum to 0)
    assert tis["grad_norm"] == pytest.approx(1.5 * plain["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_dapo_overlong_shaping_and_filtering():
    """Responses of 6 tokens hit the budget (40 byte values also end a response, so some
    stop earlier): with a 3-token buffer they lose up to 1 reward, and the overlong filter
    leaves exactly the cut-off ones out of training."""
    opts = {"updates_per_iter": 1, "extra_eos_ids": list(range(100, 140))}
    plain = run_distributed(rl_worker, 1, 1, "omd", 0, 1, 1, 1, opts)[0]["metrics"][0]
    dapo = run_distributed(rl_worker, 1, 1, "omd", 0, 1, 1, 1,
                           dict(opts, overlong_buffer_tokens=3, overlong_filter=True))[0]["metrics"][0]
    cut = round(plain["stop_length_fraction"] * plain["num_finished"])
    assert 0 < cut < plain["num_finished"] and plain["trained_samples"] == plain["num_finished"]
    assert dapo["trained_samples"] == plain["num_finished"] - cut
    # the same rollouts; every cut-off response loses the full factor 1 (length = budget)
    assert dapo["response_length_mean"] == plain["response_length_mean"]
    assert dapo["reward_mean"] <= plain["reward_mean"] - cut / plain["num_finished"] + 1e-6


REF_OPTS = dict(LAYOUT_OPTS, kl_coef=0.5)


@pytest.fixture(scope="module")
def initial_weights(tmp_path_factory):
    """GRPO with a fixed reference on one rank; the reference (--ref-load) is a checkpoint of
    the initial weights, which this run saves. Returns (its dir, results)."""
    path = str(tmp_path_factory.mktemp("ref") / "init")
    res = run_distributed(rl_worker, 1, 1, "grpo", 0, 2, 1, 1, dict(REF_OPTS, save_init=path, ref_load=path))
    return path, res


@pytest.mark.slow
def test_fixed_reference_model_pins_the_kl(initial_weights):
    """--ref-load: the reference stays the initial policy. At iteration 0 it is pi_0 = the
    old policy, so the update equals GRPO's default (KL to pi_i) and KL(pi_0 || ref) is 0; at
    iteration 1 the policy has moved: the KL is > 0 and the update differs from the default's."""
    _, fixed = initial_weights
    default = _single_rank("grpo")  # LAYOUT_OPTS without the KL term
    moving = run_distributed(rl_worker, 1, 1, "grpo", 0, 2, 1, 1, REF_OPTS)[0]["metrics"]
    m = fixed[0]["metrics"]
    assert m[0]["ref_kl"] == 0.0 and m[1]["ref_kl"] > 1e-4
    assert "ref_kl" not in moving[0] and "ref_kl" not in default[0]["metrics"][0]
    for k in ("loss", "grad_norm", "kl_proxy"):
        assert m[0][k] == pytest.approx(moving[0][k], rel=1e-6, abs=1e-9), k
    assert abs(m[1]["grad_norm"] - moving[1]["grad_norm"]) > 1e-4 * moving[1]["grad_norm"]
    # and the KL term is really in the loss: it changes the update of iteration 0's second step
    assert abs(moving[0]["grad_norm"] - default[0]["metrics"][0]["grad_norm"]) > 1e-4 * moving[0]["grad_norm"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2_packed"])
def test_fixed_reference_model_in_other_layouts(initial_weights, layout):
    """The one-rank checkpoint resharded into tp=2 / pp=2 reference stages (and at tp=2 with
    packed microbatches, whose reference log-probs are unpacked with the others): the same
    update and the same KL to the reference as one rank."""
    path, ref = initial_weights
    world, tp, pp, cp, iters = LAYOUTS[layout.split("_")[0]]
    opts = dict(PACKED_OPTS if layout.endswith("packed") else REF_OPTS, kl_coef=REF_OPTS["kl_coef"], ref_load=path)
    got = run_distributed(rl_worker, world, tp, "grpo", 0, iters, pp, cp, opts)
    _assert_same_update(got, ref, layout)
    for r in got:
        for a, b in zip(r["metrics"], ref[0]["metrics"]):
            assert a["ref_kl"] == pytest.approx(b["ref_kl"], rel=1e-4, abs=1e-9)


def test_mismatch_sums_by_hand():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    rollout = torch.tensor([[-1.5, -2.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])
    got = mismatch_sums(old, rollout, mask, is_cap=1.5).tolist()
    d = [0.5, -0.5]  # masked tokens: old - rollout
    assert got[:2] == pytest.approx([2.0, 1.0])
    assert got[2] == pytest.approx(sum(math.exp(x) - 1 - x for x in d))
    assert got[3] == 1.0  # exp(0.5) > 1.5
    assert got[4] == 0.0  # no reference model
    ref = torch.tensor([[-0.8, 5.0, -1.5]])
    x = [-0.8 - -1.0, -1.5 - -0.5]  # masked tokens: ref - old
    got = mismatch_sums(old, rollout, mask, ref_logp=ref).tolist()
    assert got[4] == pytest.approx(sum(math.exp(v) - 1 - v for v in x))


def test_old_segments_are_masked_out_of_the_loss():
    t = Trajectory(prompt_id="q", prompt_ids=[5, 6, 7], sample_index=0, group_id="g")
    t.append_segment([10, 11], [-1.0, -1.1], iteration=0, stop_reason="partial")
    t.append_segment([12, 13, 257], [-1.2, -1.3, -1.4], iteration=1, stop_reason="eos")
    mb = build_microbatches([t], 1, 1, 4, False, torch.device("cpu"))[0]
    # positions predicting response tokens 12, 13, 257 (labels at indices 4, 5, 6)
    assert mb["labels"][0, :7].tolist() == [6, 7, 10, 11, 12, 13, 257]
    assert mb["mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    # the engine's log-prob of each label
    assert mb["rollout_logp"][0].tolist() == pytest.approx([0, 0, -1.0, -1.1, -1.2, -1.3, -1.4, 0])
    mb_all = build_microbatches([t], 1, 1, 4, True, torch.device("cpu"))[0]
    assert mb_all["mask"][0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0]


# ------------------------------------------------------------------------------------ the CLI
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save_initial_checkpoint(rank, world_size, path):
    from megatron_k15.checkpointing import save_checkpoint
    from megatron_k15.initialize import initialize_model_parallel
    from megatron_k15.models.config import preset
    from megatron_k15.training import build_train_context

    initialize_model_parallel(1)
    ctx = build_train_context(_args(), preset("tiny", init_method_std=0.3), seed=7)
    save_checkpoint(path, None, ctx)


@pytest.fixture(scope="module")
def cli_inputs(tmp_path_factory):
    """A starting checkpoint (tiny, random) and prompt / eval datasets (byte tokenizer)."""
    tmp = tmp_path_factory.mktemp("train_rl_cli")
    ckpt = str(tmp / "init")
    run_distributed(_save_initial_checkpoint, 1, ckpt)
    data = {name: _preprocess_prompts(tmp, name, rows) for name, rows in
            (("prompts", _records()), ("eval", _records()[:2]))}
    return {"ckpt": ckpt, **data}


def _preprocess_prompts(tmp, name, rows, keys=("id", "prompt", "task", "answer")) -> str:
    """``rows`` (their ``keys``) as a prompt dataset ``tmp/name``."""
    src = tmp / f"{name}.jsonl"
    src.write_text("".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in rows))
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--mode", "prompts",
                    "--input", str(src), "--output-prefix", str(tmp / name), "--tokenizer", "byte",
                    "--no-progress"], check=True, capture_output=True)
    return str(tmp / name)


def _rl_argv(inputs, *extra):
    return ["--load", inputs["ckpt"], "--tokenizer", "byte", "--prompt-data", inputs["prompts"],
            "--attention-backend", "sdpa", "--samples-per-prompt", "2", "--prompts-per-iter", "2",
            "--rollout-max-tokens", "4", "--micro-batch-size", "2", "--lr", "1e-3", "--seed", "3",
            "--log-interval", "1", *extra]


def _env():
    env = dict(os.environ)
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _parse(argv, world_size):
    from megatron_k15.arguments import parse_args
    from megatron_k15.train_rl import _validate, add_rl_args

    return parse_args(argv, "test", add_rl_args, _validate,
                      groups=("model", "parallel", "precision", "training", "checkpoint", "inference"),
                      world_size=world_size)


def test_cli_accepts_every_layout_and_checks_lengths(cli_inputs, capsys):
    base = _rl_argv(cli_inputs, "--train-iters", "1", "--finetune")
    args = _parse(base + ["--pipeline-model-parallel-size", "2", "--context-parallel-size", "2",
                          "--tensor-model-parallel-size", "2"], 8)
    assert (args.pipeline_model_parallel_size, args.context_parallel_size, args.data_parallel_size) == (2, 2, 1)
    # the longest trajectory (LongRoPE's choice of factors): the longest prompt + --rollout-max-tokens
    from megatron_k15.data.blend import open_prompt_data

    prompts = open_prompt_data(args.prompt_data, "--prompt-data")
    assert args.longest_sequence == max(int(n) for n in prompts.lengths) + 4
    # 2 prompts per iteration cannot feed 4 generation-parallel ranks (dp 2 x cp 2)
    with pytest.raises(SystemExit):
        _parse(base + ["--context-parallel-size", "2"], 4)
    assert "--prompts-per-iter 2 is smaller than the 4 generation-parallel ranks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(base + ["--pipeline-model-parallel-size", "2", "--inference-engine", "recompute"], 2)
    assert "--inference-engine recompute" in capsys.readouterr().err
    # prompts are 4 bytes: 4 + 4 fits --seq-length 8, not 7; the check names both flags
    _parse(base + ["--seq-length", "8"], 1)
    with pytest.raises(SystemExit):
        _parse(base + ["--seq-length", "7"], 1)
    err = capsys.readouterr().err
    assert "4 of 4 prompts do not fit" in err and "--rollout-max-tokens 4 must be <= --seq-length 7" in err, err
    with pytest.raises(SystemExit):
        _parse(base + ["--rollout-max-tokens", "2045"], 1)  # the tiny model has 2048 positions
    assert "max_position_embeddings 2048" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # eval prompts must fit the positions too
        _parse(base + ["--eval-data", cli_inputs["eval"], "--eval-max-tokens", "2045"], 1)
    assert "--eval-data" in capsys.readouterr().err
    # ratio clipping belongs to the baselines; the TIS cap is a weight bound >= 1
    args = _parse(base + ["--rl-loss", "grpo", "--clip-eps-high", "0.28", "--rollout-is-cap", "2"], 1)
    assert (args.clip_eps, args.clip_eps_high, args.rollout_is_cap) == (None, 0.28, 2.0)
    args = _parse(base + ["--rl-loss", "cispo", "--clip-eps", "1", "--clip-eps-high", "4",
                          "--loss-agg-mode", "seq-mean-token-mean"], 1)  # 1: no lower bound on the weight
    assert (args.clip_eps, args.clip_eps_high) == (1.0, 4.0)
    args = _parse(base + ["--rl-loss", "grpo", "--kl-coef", "0.04", "--ref-load", cli_inputs["ckpt"]], 1)
    assert (args.kl_coef, args.ref_load) == (0.04, cli_inputs["ckpt"])
    for extra, message in ((["--clip-eps", "0.2"], "--clip-eps: --rl-loss omd has no ratio clipping"),
                           (["--rl-loss", "gspo", "--clip-eps-high", "-1"], "--clip-eps-high must be >= 0"),
                           (["--rl-loss", "ppo", "--clip-eps", "1.5"], "--clip-eps must be in [0, 1)"),
                           (["--rl-loss", "cispo", "--clip-eps", "1.5"], "--clip-eps must be in [0, 1] for --rl-loss cispo"),
                           (["--rollout-is-cap", "0.5"], "--rollout-is-cap must be >= 1"),
                           (["--use-dynamic-batch-size"], "--use-dynamic-batch-size needs --max-tokens-per-gpu"),
                           (["--max-tokens-per-gpu", "64"], "--max-tokens-per-gpu only applies with "
                                                            "--use-dynamic-batch-size"),
                           (["--kl-coef", "0.1"], "--kl-coef is GRPO's KL term; --rl-loss omd has none"),
                           (["--dynamic-sampling", "--rollout-segment-tokens", "2"],
                            "--dynamic-sampling keeps whole groups scored in one iteration"),
                           (["--dynamic-sampling", "--dynamic-sampling-max-rounds", "0"],
                            "--dynamic-sampling-max-rounds must be >= 1"),
                           (["--dynamic-sampling-max-rounds", "2"], "only applies with --dynamic-sampling"),
                           (["--loss-agg-mode", "seq-mean-token-mean"], "--loss-agg-mode applies to the token-level"),
                           (["--rl-loss", "grpo", "--exact-logz"], "--exact-logz sets OMD's baseline"),
                           (["--advantage-estimator", "rloo"], "--advantage-estimator rloo applies to grpo/ppo/gspo"),
                           (["--reward-workers", "0"], "--reward-workers must be >= 1"),
                           (["--rl-loss", "grpo", "--kl-coef", "0.1", "--ref-load", cli_inputs["ckpt"],
                             "--skip-zero-advantage"], "the KL to the fixed reference pulls on every group"),
                           (["--rl-loss", "grpo", "--ref-load", cli_inputs["ckpt"]], "add --kl-coef > 0"),
                           (["--rl-loss", "grpo", "--kl-coef", "0.1", "--ref-load", cli_inputs["prompts"]],
                            f"--ref-load {cli_inputs['prompts']}: no latest_checkpointed_iteration.txt")):
        with pytest.raises(SystemExit):
            _parse(base + extra, 1)
        assert message in capsys.readouterr().err, extra


def _latest(path):
    with open(os.path.join(path, "latest_checkpointed_iteration.txt")) as f:
        return f.read().strip()


@pytest.mark.slow
def test_exit_signal_handler_saves_and_resumes(cli_inputs, tmp_path):
    """SIGUSR1 mid-training: the run finishes its iteration, saves it and exits 0; a run with
    --load on the same directory continues from that iteration."""
    save = str(tmp_path / "rl")
    cmd = [sys.executable, "-m", "megatron_k15.train_rl",
           *_rl_argv(cli_inputs, "--finetune", "--train-iters", "1000", "--save", save, "--exit-signal-handler")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith("[train_rl] iteration 1/1000"):
                proc.send_signal(signal.SIGUSR1)
                break
        out.extend(proc.stdout)
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = "".join(out)
    assert rc == 0, text
    stops = [line for line in out if "received: stopping after iteration" in line]
    assert len(stops) == 1 and "SIGUSR1" in stops[0], text
    stopped = int(stops[0].split("stopping after iteration ")[1].split(",")[0])
    assert 1 <= stopped < 1000 and f"iteration {stopped}/1000" in text
    assert f"iteration {stopped + 1}/1000" not in text
    assert _latest(save) == str(stopped)
    assert os.path.isdir(os.path.join(save, f"iter_{stopped:07d}"))

    resumed = subprocess.run([sys.executable, "-m", "megatron_k15.train_rl",
                              *_rl_argv(cli_inputs, "--train-iters", str(stopped + 1), "--save", save)[2:],
                              "--load", save], capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"start at iteration {stopped}" in resumed.stdout
    assert f"iteration {stopped + 1}/{stopped + 1}" in resumed.stdout
    assert _latest(save) == str(stopped + 1)


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["reset", "keep"])
def test_resume_is_bitwise_identical(cli_inputs, tmp_path, optimizer):
    """4 iterations straight versus resuming from the straight run's iteration-2 checkpoint:
    iterations 3-4 log the same metrics and end on the same weights, bit for bit. The run uses
    what a checkpoint must carry: the prioritized sampler's success rates, partial rollouts
    waiting in the replay buffer, the RNG, and Adam's moments with --keep-optimizer-state
    (without it they are reset every iteration and not saved: the checkpoint holds only the
    fp32 master weights)."""
    import shutil

    import torch as _torch

    keep = ["--keep-optimizer-state"] if optimizer == "keep" else []
    # graded_reward (importable from this directory): rewards that differ within a group, so
    # every update moves the weights
    prompts = _preprocess_prompts(tmp_path, "graded", _records(), ("id", "prompt", "task", "answer", "reward_fn"))
    common = ["--train-iters", "4", "--sampling", "prioritized",
              "--rollout-segment-tokens", "2", "--updates-per-iter", "2", *keep]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    env = _env()
    env["PYTHONPATH"] += os.pathsep + os.path.dirname(os.path.abspath(__file__))

    def train(save, load_args):
        res = subprocess.run([sys.executable, "-m", "megatron_k15.train_rl", *_rl_argv({**cli_inputs, "prompts": prompts}, *common)[2:],
                              *load_args, "--save", save, "--tensorboard-dir", os.path.join(save, "tb")],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
        assert res.returncode == 0, res.stdout + res.stderr
        with open(os.path.join(save, "tb", "metrics.jsonl")) as f:
            return {m["iteration"]: m for m in map(json.loads, f)}, res.stdout

    first, _ = train(straight, ["--load", cli_inputs["ckpt"], "--finetune", "--save-interval", "2"])
    shutil.copytree(os.path.join(straight, "iter_0000002"), os.path.join(resumed, "iter_0000002"))
    with open(os.path.join(resumed, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("2")
    second, console = train(resumed, ["--load", resumed, "--log-interval", "4"])

    # --log-interval thins the console only: every RL iteration (a rollout batch) is recorded
    assert sorted(second) == [3, 4]
    assert "iteration 3/4" not in console and "iteration 4/4" in console
    for it in (3, 4):
        for k, v in first[it].items():
            if not (k == "time" or k.endswith("_s") or k.endswith("_per_s") or "memory" in k
                    or "tflops" in k or k.endswith("mfu")):  # timings and rates
                assert second[it][k] == v, (it, k)
    assert first[2]["replay_buffer_size"] > 0, "no partial rollout crossed the checkpoint"
    assert all(first[it]["grad_norm"] > 0 for it in (3, 4))
    w1, w2 = _checkpoint_weights(straight, 4, 1), _checkpoint_weights(resumed, 4, 1)
    for name, w in w1.items():
        assert _torch.equal(w2[name], w), name
    state = _torch.load(os.path.join(straight, "iter_0000002", "mp_rank_00_000", "model.pt"), weights_only=True)
    assert ("exp_avg" in state["optimizer"]) == (optimizer == "keep") and "master" in state["optimizer"]
    if optimizer == "reset":  # a run that continues Adam's moments cannot start from zeros silently
        res = subprocess.run([sys.executable, "-m", "megatron_k15.train_rl",
                              *_rl_argv({**cli_inputs, "prompts": prompts}, *common)[2:], "--train-iters", "5",
                              "--keep-optimizer-state", "--load", straight], capture_output=True, text=True,
                             env=env, cwd=ROOT, timeout=400)
        assert res.returncode != 0 and "saved without Adam's moments" in res.stderr, res.stdout + res.stderr


def _checkpoint_weights(path, iteration, pp):
    import torch as _torch

    d = os.path.join(path, f"iter_{iteration:07d}")
    shards = {(0, p): _torch.load(os.path.join(d, f"mp_rank_00_{p:03d}", "model.pt"), weights_only=True)["model"]
              for p in range(pp)}
    return merge_shards(shards, 260)


@pytest.mark.slow
def test_cli_pipeline_parallel_with_eval_matches_one_process(cli_inputs, tmp_path):
    """``torchrun -m megatron_k15.train_rl --pipeline-model-parallel-size 2`` with --eval-data
    (the engine decoding through both stages) logs the same metrics and saves the same weights
    as one process (which also collects garbage by hand: --manual-gc changes no number)."""
    argv = _rl_argv(cli_inputs, "--finetune", "--train-iters", "2", "--eval-data", cli_inputs["eval"],
                    "--eval-max-tokens", "4", "--eval-samples", "2", "--eval-temperature", "1.0")
    runs = {}
    for pp in (1, 2):
        save = str(tmp_path / f"pp{pp}")
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] \
            if pp > 1 else [sys.executable]
        gc_flags = ["--manual-gc", "--manual-gc-interval", "1"] if pp == 1 else []
        res = subprocess.run([*launch, "-m", "megatron_k15.train_rl", *argv, *gc_flags, "--save", save,
                              "--tensorboard-dir", os.path.join(save, "tb"),
                              "--pipeline-model-parallel-size", str(pp)],
                             capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=400)
        assert res.returncode == 0, res.stdout + res.stderr
        assert f"tp=1 pp={pp} cp=1 dp=1" in res.stdout
        with open(os.path.join(save, "tb", "metrics.jsonl")) as f:
            runs[pp] = ([json.loads(line) for line in f], _checkpoint_weights(save, 2, pp))
    (m1, w1), (m2, w2) = runs[1], runs[2]
    assert [m["iteration"] for m in m2] == [0, 1, 2] and "eval_accuracy" in m2[0] and "eval_accuracy" in m2[-1]
    for a, b in zip(m2, m1):
        for k in ("reward_mean", "response_length_mean", "eval_accuracy", "eval_response_length_mean",
                  "eval_pass@2", "eval_maj@2"):
            assert a.get(k) == b.get(k), k
        for k in ("loss", "kl_proxy", "entropy", "grad_norm"):
            if k in b:
                assert abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(b[k])), k
    assert "eval_maj@2" in m2[0] and "eval_maj@2" in m1[-1]  # math eval set, 2 samples: self-consistency
    assert sorted(w1) == sorted(w2)
    for name, w in w1.items():
        assert (w2[name] - w).abs().max() <= 1e-5 * max(0.1, w.abs().max().item()), name


# (loss, keyword arguments, size of logp - old_logp): OMD with and without per-token
# normalisation, GSPO with the paper's clip range (log-ratios of 1e-4 so that some samples are
# inside it) and with a loose one plus truncated importance sampling
CP_LOSS_CASES = [("omd", dict(tau=0.3), 0.1), ("omd", dict(tau=0.3, normalize_by_tokens=True), 0.1),
                 ("gspo", dict(), 2e-4), ("gspo", dict(clip_eps=0.2, clip_eps_high=0.3, is_cap=1.5), 0.1)]


def _cp_loss_worker(rank, world_size, logp, noise, rollout, mask, rewards, groups):
    import torch.distributed as dist

    from megatron_k15.parallel.context import zigzag_split
    from megatron_k15.rl.losses import LOSSES

    out = []
    for name, kw, scale in CP_LOSS_CASES:
        old = logp + scale * noise
        x = zigzag_split(logp, 1, world_size, rank).clone().requires_grad_()
        extra = {"rollout_logp": zigzag_split(rollout, 1, world_size, rank)} if "is_cap" in kw else {}
        loss = LOSSES[name](x, zigzag_split(old, 1, world_size, rank), zigzag_split(mask, 1, world_size, rank),
                            rewards, groups, **kw, **extra, reduction="sum", cp_group=dist.group.WORLD)
        loss.backward()
        out.append((loss.detach(), x.grad))
    return out


@pytest.mark.slow
def test_sequence_level_losses_under_cp_match_whole_sequences():
    """OMD and GSPO on zigzag shards of 2 cp ranks: every rank gets the whole-sequence loss, and
    each shard the gradient of its tokens (sequence sums / means all-reduced forward, identity
    backward) - against one tensor."""
    from megatron_k15.parallel.context import zigzag_merge
    from megatron_k15.rl.losses import LOSSES

    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 8, generator=g, dtype=torch.float64) * 3
    noise = torch.randn(3, 8, generator=g, dtype=torch.float64)
    rollout = logp + 0.5 * torch.randn(3, 8, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 8, generator=g) > 0.3).double()
    rewards, groups = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0, 0, 1])
    got = run_distributed(_cp_loss_worker, 2, logp, noise, rollout, mask, rewards, groups)
    for case, (name, kw, scale) in enumerate(CP_LOSS_CASES):
        old = logp + scale * noise
        x = logp.clone().requires_grad_()
        extra = {"rollout_logp": rollout} if "is_cap" in kw else {}
        ref = LOSSES[name](x, old, mask, rewards, groups, **kw, **extra, reduction="sum")
        ref.backward()
        assert x.grad.abs().sum() > 0, (name, kw)
        for r in got:
            torch.testing.assert_close(r[case][0].double(), ref.detach().double(), rtol=1e-6, atol=1e-6)
        grad = zigzag_merge([r[case][1] for r in got], 1)
        torch.testing.assert_close(grad, x.grad, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name} {kw}: {m}")


def test_rl_from_a_hugging_face_directory_equals_rl_from_its_conversion(cli_inputs, tmp_path):
    """``train_rl --load HF_DIR --finetune`` (each rank converting its own part while it loads)
    runs the same iterations as from the converted checkpoint: equal metrics and weights; the
    saved checkpoint is ours and resumes as usual."""
    from megatron_k15.testing import save_tiny_hf_checkpoint

    hf_dir, ck = str(tmp_path / "hf"), str(tmp_path / "ck")
    save_tiny_hf_checkpoint(hf_dir, "qwen2")
    env = _env()
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "checkpoint", "convert_hf_to_megatron.py"),
                    "--hf-dir", hf_dir, "--save", ck], check=True, capture_output=True, env=env)

    def train(load, save):
        res = subprocess.run([sys.executable, "-m", "megatron_k15.train_rl", *_rl_argv(cli_inputs)[2:], "--load", load,
                              "--finetune", "--train-iters", "2", "--save", save, "--save-interval", "2",
                              "--tensorboard-dir", os.path.join(save, "tb")],
                             capture_output=True, text=True, env=env, cwd=ROOT, timeout=400)
        assert res.returncode == 0, res.stdout + res.stderr
        with open(os.path.join(save, "tb", "metrics.jsonl")) as f:
            return {m["iteration"]: m for m in map(json.loads, f)}

    from_hf, from_ck = train(hf_dir, str(tmp_path / "a")), train(ck, str(tmp_path / "b"))
    assert sorted(from_hf) == [1, 2]
    for it in (1, 2):
        for k, v in from_ck[it].items():
            if not (k == "time" or k.endswith("_s") or k.endswith("_per_s") or "memory" in k
                    or "tflops" in k or k.endswith("mfu")):
                assert from_hf[it][k] == v, (it, k)
    w_hf, w_ck = _checkpoint_weights(str(tmp_path / "a"), 2, 1), _checkpoint_weights(str(tmp_path / "b"), 2, 1)
    assert sorted(w_hf) == sorted(w_ck) and all(torch.equal(w_hf[k], w_ck[k]) for k in w_ck)
