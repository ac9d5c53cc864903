"""tp=2 with sequence parallelism (and MoE without it) equals tp=1: logits, per-token log-probs
and every gradient."""

import pytest
import torch
import torch.distributed as dist

from megatron_k15.initialize import initialize_model_parallel
from megatron_k15.models.gpt import GPTModel
from megatron_k15.models.hf_mapping import gpt_config_from_hf, hf_to_megatron
from megatron_k15.models.sharding import merge_tensor, split_for_rank
from megatron_k15.parallel.tensor import allreduce_sequence_parallel_grads
from megatron_k15.testing import hf_config_dict, run_distributed, tiny_hf_model

SEQ = 24
# OLMo 3's window made shorter than SEQ so it binds
OVERRIDES = {"olmo3": {"sliding_window": 8}, "gpt_oss": {"sliding_window": 8}, "gemma3": {"sliding_window": 8},
             "gemma2": {"sliding_window": 8},
             "exaone4": {"sliding_window": 8}}


def _inputs(vocab):
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab, (2, SEQ), generator=gen)
    weights = torch.randn(2, SEQ, generator=gen)
    return ids, torch.roll(ids, -1, dims=1), weights


def _run(model, ids, labels, weights):
    """Logits (full vocab), log-probs, and grads of sum(weights * logp) for every parameter."""
    logits = model.gather_logits(model(ids))
    logp = model(ids, labels=labels)
    (weights * logp).sum().backward()
    allreduce_sequence_parallel_grads(model, model.tp_group)
    grads = {n: p.grad for n, p in model.named_parameters()}
    return logits.detach(), logp.detach(), grads


def _build(kind, tp, sequence_parallel=None):
    hf = tiny_hf_model(kind, **OVERRIDES.get(kind, {}))
    cfg = gpt_config_from_hf(hf_config_dict(hf))
    full = hf_to_megatron(hf.state_dict(), cfg)
    model = GPTModel(cfg, sequence_parallel=sequence_parallel)
    rank = model.tp_rank
    model.load_checkpoint_state_dict(split_for_rank(
        full, tp, rank, 1, 0, cfg.num_layers, cfg.tie_word_embeddings, model.padded_vocab_size))
    return model


def _tp2_worker(rank, world_size, kind, sequence_parallel=True):
    initialize_model_parallel(tp=2)
    model = _build(kind, 2, sequence_parallel)
    assert model.sequence_parallel == sequence_parallel
    ids, labels, weights = _inputs(model.config.vocab_size)
    logits, logp, grads = _run(model, ids, labels, weights)
    full_grads = {}
    for name, g in grads.items():
        shards = [torch.empty_like(g) for _ in range(2)]
        dist.all_gather(shards, g.contiguous())
        merged = merge_tensor(shards, name)
        if name in ("embedding.weight", "output_layer.weight"):
            merged = merged[: model.config.vocab_size]
        full_grads[name] = merged
    return logits, logp, full_grads


@pytest.mark.slow
@pytest.mark.parametrize("kind,sequence_parallel", [
    ("qwen2", True), ("llama", True), ("qwen3", True), ("qwen3_moe", True),
    ("qwen3_moe", False),  # the MoE layer's own tp communication without SP
    ("olmo2", True),  # q/k norms over all heads: the sum of squares all-reduced over tp
    ("olmo3", False),  # + sliding-window layers
    ("gpt_oss", True),  # sinks split over tp; biased router, experts and output projection
    ("gemma3", True),  # (1 + w) norms around the sublayers, GeGLU, scaled embeddings, local/global RoPE
    ("gemma2", True),  # soft-capped scores (per head) and logits (per vocabulary shard)
    ("glm4", True),  # partial RoPE (the reordered rows split over tp by head), norms around the sublayers
    ("smollm3", True),  # a layer without RoPE
    ("exaone4", True),  # norms after the sublayers, per-head q/k norms, sliding layers and a NoPE one
    ("qwen2_moe", True),  # the shared expert's gate: replicated, scaling this rank's partial output
    ("glm4_moe", True),  # a dense layer then MoE ones: grouped sigmoid routing, shared expert split over tp
    ("deepseek_v3", True),  # MLA: heads split, the latent projections replicated over the gathered sequence
    ("deepseek_v3", False),  # MLA's own tp communication without SP
    ("deepseek_v2", True),  # MLA with q straight from x, fp32 softmax routing by groups
])
def test_tp2_sequence_parallel_equals_tp1(kind, sequence_parallel):
    initialize_model_parallel(tp=1)
    ref = _build(kind, 1)
    ids, labels, weights = _inputs(ref.config.vocab_size)
    ref_logits, ref_logp, ref_grads = _run(ref, ids, labels, weights)

    results = run_distributed(_tp2_worker, 2, kind, sequence_parallel)
    for logits, logp, grads in results:
        assert (logits - ref_logits).abs().max().item() <= 1e-5
        assert (logp - ref_logp).abs().max().item() <= 1e-5
        assert set(grads) == set(ref_grads)
        for name, g in grads.items():
            r = ref_grads[name]
            if name in ("embedding.weight", "output_layer.weight"):
                r = r[: ref.config.vocab_size]
            assert g.shape == r.shape, name
            # fp32, relative to the gradient's scale (OLMo 3 has 4 layers: larger embedding grads)
            scale = max(1.0, r.abs().max().item())
            assert (g - r).abs().max().item() <= 1e-5 * scale, (name, scale)
