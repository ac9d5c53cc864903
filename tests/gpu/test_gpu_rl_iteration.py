"""One Kimi k1.5 RL iteration on GPU, in process, in bf16 with the GPU defaults: Triton attention,
the paged engine with the Triton decode kernel for the rollouts, fused log-probs, OMD loss,
two optimizer updates on packed microbatches (``--use-dynamic-batch-size``: varlen Triton
attention). Driven like ``tests/test_rl_trainer.py`` (its ``_args``, ``_records`` and
graded reward are reused), on the byte-level tiny preset widened to Qwen2.5-0.5B's attention
shape (hidden 896, 14 / 2 heads, head_dim 64).

Checks: all 8 trajectories (2 prompts x 4 samples) finish; loss, KL proxy, entropy and grad
norm are finite and the grad norm positive (the graded reward and the length penalty differ
within a group, so the update is real); the weights change and stay finite; peak memory is
reported. Recorded against bounds (``check``): how far the engine's log-probs of the sampled
tokens are from the training forward's in bf16 (mean |difference| and the k3 estimate of
KL(rollout || training), the figures truncated importance sampling would correct).
"""

from __future__ import annotations

import math

import torch

from gpu_refs import ON_GPU, gpu_marks, real_or_tiny

pytestmark = gpu_marks()


def test_one_rl_iteration_bf16(single_rank, check):
    import test_rl_trainer as rl_test

    from megatron_k15.data.tokenizer import ByteTokenizer
    from megatron_k15.models.config import preset
    from megatron_k15.rl.trainer import RLIteration
    from megatron_k15.training import build_train_context

    # "auto" picks triton attention and fused log-probs on GPU; the CPU logic check asks for
    # them (interpreted)
    args = rl_test._args(attention_backend=real_or_tiny("auto", "triton"),
                         params_dtype=torch.bfloat16, logprob_impl=real_or_tiny("auto", "fused"),
                         kv_cache_memory_fraction=0.05, use_dynamic_batch_size=True,
                         max_tokens_per_gpu=32)
    cfg = preset("tiny", init_method_std=0.3, hidden_size=real_or_tiny(896, 112),
                 num_attention_heads=real_or_tiny(14, 7), num_query_groups=real_or_tiny(2, 1),
                 ffn_hidden_size=real_or_tiny(1024, 64))
    ctx = build_train_context(args, cfg, seed=7)
    assert ctx.model.attention_backend == "triton" and ctx.model.logprob_impl == "fused"
    assert next(ctx.model.parameters()).is_cuda == ON_GPU
    tok = ByteTokenizer()
    records = rl_test._records()
    rl = RLIteration(ctx, args, tok, records, [tok.encode(r["prompt"]) for r in records])
    assert rl.generator.decode_impl == real_or_tiny("triton", "torch")
    before = {k: v.detach().float().clone() for k, v in ctx.model.checkpoint_state_dict().items()}
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    m = rl.run(0, [0, 1], 1e-3)
    print({k: round(v, 5) if isinstance(v, float) else v for k, v in m.items()})
    assert m["num_finished"] == 8
    for key in ("loss", "kl_proxy", "entropy", "grad_norm", "reward_mean"):
        assert math.isfinite(m[key]), (key, m[key])
    assert m["grad_norm"] > 0 and m["kl_proxy"] >= 0 and m["entropy"] > 0
    assert m["peak_memory_bytes"] > 0
    after = ctx.model.checkpoint_state_dict()
    moved = max((after[k].float() - before[k]).abs().max().item() for k in before)
    assert moved > 0
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    # bf16 decode (paged cache) vs bf16 training forward (varlen flash attention, fused
    # log-probs) on the same tokens: rounding-level, not a different distribution
    check("rollout vs training log-prob, mean |diff| (bf16)", m["rollout_logp_abs_diff"], 0.1)
    check("KL(rollout || training), k3 estimate (bf16)", abs(m["rollout_kl"]), 1e-2)
    check.done()
