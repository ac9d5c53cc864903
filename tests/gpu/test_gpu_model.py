"""The model (``GPTModel``) on GPU in bf16: ``--attention-backend triton`` against ``sdpa``.

Three models hold the same weights (a Qwen2.5-0.5B-shaped stack cut to 2 layers: hidden 896,
14 heads / 2 kv heads, head_dim 64, vocabulary 151936, tied embeddings, QKV bias; or gpt-oss-20b's
attention cut to 2 layers, a 128-token sliding layer and a full one, with sinks, and 4 of its
experts): triton in
bf16, sdpa in bf16 and sdpa in fp32 (the reference, with the plain cross-entropy log-probs).
Per-token log-probs and every parameter gradient of ``sum(w * logp)`` (random w) are compared
with the fp32 model's, for a packed batch (varlen attention, as SFT/RL training packs) and a
dense batch of two rows.

Tolerance: for the log-probs and for each parameter's gradient, the triton model's max abs
error is at most 2 x the sdpa-bf16 model's + 1e-2 x max |reference| (the two bf16 models
differ only in the attention kernel, so a broken forward or backward shows up as a much
larger error than sdpa's).
"""

from __future__ import annotations

import pytest
import torch

from gpu_refs import DEVICE, amax, gpu_marks, low_precision_bound, max_err, real_or_tiny

pytestmark = gpu_marks()


def _models(arch="qwen2.5"):
    from megatron_k15.models.config import preset
    from megatron_k15.models.gpt import GPTModel

    if arch == "gpt-oss":
        cfg = preset("gpt-oss-20b", num_layers=2, num_moe_experts=4, moe_router_topk=2,
                     layer_types=["sliding_attention", "full_attention"], **real_or_tiny(
                         dict(vocab_size=32000), dict(hidden_size=128, num_attention_heads=4, num_query_groups=2,
                                                      kv_channels=32, moe_ffn_hidden_size=64, vocab_size=500,
                                                      sliding_window=16)))
    else:
        cfg = preset("qwen2.5-0.5b", num_layers=2, **real_or_tiny(
            {}, dict(hidden_size=112, num_attention_heads=7, num_query_groups=1, ffn_hidden_size=64,
                 vocab_size=500)))
    dev = torch.device(DEVICE)
    triton = GPTModel(cfg, attention_backend="triton", params_dtype=torch.bfloat16, device=dev,
                      logprob_impl="fused")
    triton.reset_parameters(5)
    state = triton.checkpoint_state_dict()
    sdpa = GPTModel(cfg, attention_backend="sdpa", params_dtype=torch.bfloat16, device=dev,
                    logprob_impl="fused")
    ref = GPTModel(cfg, attention_backend="sdpa", params_dtype=torch.float32, device=dev,
                   logprob_impl="ce")
    for m in (sdpa, ref):
        m.load_checkpoint_state_dict(state)  # bf16 values, upcast exactly for the reference
    return cfg, triton, sdpa, ref


def _run(model, batch, weights):
    model.zero_grad(set_to_none=True)
    logp = model(input_ids=batch["input_ids"], labels=batch["labels"],
                 cu_seqlens=batch.get("cu_seqlens"), max_seqlen=batch.get("max_seqlen"))
    (logp * weights).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach().float(), grads


@pytest.mark.parametrize("arch,layout", [("qwen2.5", "packed"), ("qwen2.5", "dense"), ("gpt-oss", "packed")])
def test_triton_backend_matches_sdpa_in_bf16(single_rank, arch, layout, check):
    cfg, triton, sdpa, ref = _models(arch)
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    if layout == "packed":
        lengths = real_or_tiny([1000, 2000, 1096], [30, 50, 16])
        b, s = 1, sum(lengths)
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32,
                          device=DEVICE)
        extra = {"cu_seqlens": cu, "max_seqlen": max(lengths)}
    else:
        b, s, extra = 2, real_or_tiny(2048, 64), {}
    ids = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=gen, device=DEVICE)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], **extra}
    weights = torch.randn(b, s, generator=gen, device=DEVICE) / s
    lp_t, g_t = _run(triton, batch, weights)
    lp_s, g_s = _run(sdpa, batch, weights)
    lp_r, g_r = _run(ref, batch, weights)
    assert lp_t.shape == (b, s) and torch.isfinite(lp_t).all()
    check("logp", max_err(lp_t, lp_r), low_precision_bound(max_err(lp_s, lp_r), amax(lp_r),
                                                           torch.bfloat16))
    assert sorted(g_t) == sorted(g_r) == sorted(g_s)
    for name in sorted(g_r):
        check(f"grad {name}", max_err(g_t[name], g_r[name]),
              low_precision_bound(max_err(g_s[name], g_r[name]), amax(g_r[name]), torch.bfloat16))
    check.done()
