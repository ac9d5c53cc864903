"""Our GPT reproduces transformers' logits for random Qwen2, Qwen3, Qwen3-MoE, Llama, Mistral, Phi-3, OLMo 2
and OLMo 3 models (fp32), sliding windows included."""

import math

import pytest
import torch

from megatron_k15.initialize import initialize_model_parallel
from megatron_k15.testing import gpt_from_hf, tiny_hf_model

YARN_SCALING = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}  # x4 = 512
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def build_from_hf(hf, attention_backend="sdpa"):
    return gpt_from_hf(hf, attention_backend)


def assert_export_rebuilds(hf, cfg, ids):
    """A config written without the original (``extra`` cleared: as for a preset or flags)
    makes transformers build the same model: equal logits on ``ids`` with ``hf``'s weights."""
    import dataclasses

    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_k15.models.hf_mapping import hf_config_from_gpt

    d = dict(hf_config_from_gpt(dataclasses.replace(cfg, extra={})))
    d.pop("architectures")
    rebuilt = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d)).eval()
    rebuilt.load_state_dict(hf.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(ids).logits, hf(ids).logits)


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    initialize_model_parallel(1)


@pytest.mark.parametrize("kind,overrides", [
    ("qwen2", {}),                                   # QKV bias, GQA 3:1, untied
    ("llama", {}),                                   # tied, theta 500000, GQA 2:1
    ("qwen3", {}),                                   # QK-norm, head_dim 32 != hidden / heads
    ("qwen3", {"rope_scaling": YARN_SCALING}),       # Qwen3 at 128K
    ("qwen3_moe", {}),                               # 8 experts, top-2 renormalised
    ("qwen3_moe", {"norm_topk_prob": False, "num_experts_per_tok": 3}),
    ("llama", {"rope_scaling": LLAMA3_SCALING}),     # Llama-3 frequency scaling
    ("mistral", {}),                                 # head_dim 32 != hidden / heads, GQA 2:1
    ("mistral", {"sliding_window": 512}),            # a window as long as the context: full attention
    ("phi3", {}),                                    # fused qkv_proj / gate_up_proj tensors
    ("qwen2", {"rope_scaling": YARN_SCALING}),       # YaRN (Qwen2.5 at 128K), attention factor
    ("qwen2", {"rope_scaling": {**YARN_SCALING, "beta_fast": 16, "mscale": 0.9, "mscale_all_dim": 0.5}}),
])
def test_logits_match_transformers(kind, overrides):
    hf = tiny_hf_model(kind, **overrides)
    model = build_from_hf(hf)
    cfg = model.config
    assert cfg.sliding_window is None
    assert cfg.qk_layernorm == kind.startswith("qwen3")
    assert cfg.is_moe == (kind == "qwen3_moe")
    if kind == "qwen2":
        assert cfg.add_qkv_bias and not cfg.tie_word_embeddings
        assert cfg.num_attention_heads // cfg.num_query_groups == 3
    elif kind == "qwen3":
        assert not cfg.add_qkv_bias and cfg.head_dim == 32 != cfg.hidden_size // cfg.num_attention_heads
    elif kind == "phi3":
        assert not cfg.add_qkv_bias and cfg.architecture == "phi3" and cfg.rotary_base == 250000.0
    elif kind == "mistral":
        assert not cfg.add_qkv_bias and not cfg.tie_word_embeddings and cfg.architecture == "mistral"
        assert cfg.head_dim == 32 and cfg.num_query_groups == 2
    elif kind == "qwen3_moe":
        assert (cfg.num_moe_experts, cfg.moe_ffn_hidden_size) == (8, 48)
        assert (cfg.moe_router_topk, cfg.moe_norm_topk_prob) == ((3, False) if overrides else (2, True))
    else:
        assert cfg.tie_word_embeddings and cfg.rotary_base == 500000.0
    assert (cfg.rope_scaling is not None) == ("rope_scaling" in overrides)
    if kind == "mistral":
        assert cfg.rotary_base == 1000000.0
    if "rope_scaling" in overrides:
        assert cfg.rope_scaling["rope_type"] == overrides["rope_scaling"]["rope_type"]
    ids = torch.randint(0, cfg.vocab_size, (3, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model.gather_logits(model(ids))
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def test_token_logprobs_and_packed_sequences_match_transformers():
    hf = tiny_hf_model("qwen2")
    model = build_from_hf(hf)
    gen = torch.Generator().manual_seed(2)
    a = torch.randint(0, 300, (1, 23), generator=gen)
    b = torch.randint(0, 300, (1, 41), generator=gen)
    with torch.no_grad():
        ref = [torch.log_softmax(hf(x).logits.float(), -1) for x in (a, b)]
        packed = torch.cat([a, b], dim=1)
        labels = torch.roll(packed, -1, dims=1)
        cu = torch.tensor([0, 23, 64], dtype=torch.int32)
        logp = model(packed, labels=labels, cu_seqlens=cu)
    expect = torch.cat([
        ref[0][0, :-1].gather(-1, a[0, 1:, None])[:, 0],
        ref[1][0, :-1].gather(-1, b[0, 1:, None])[:, 0],
    ])
    got = torch.cat([logp[0, :22], logp[0, 23:63]])
    assert (got - expect).abs().max().item() <= 1e-4


def test_padded_vocab_never_gets_probability():
    hf = tiny_hf_model("llama")
    model = build_from_hf(hf)
    assert model.padded_vocab_size > model.config.vocab_size  # 300 -> 384
    with torch.no_grad():
        shard = model(torch.tensor([[1, 2, 3]]))
    assert torch.isinf(shard[..., model.config.vocab_size:]).all()


# parameter counts on the model cards (Hugging Face), rounded as published
PUBLISHED_PARAMETERS = {
    "qwen2.5-0.5b": 0.49e9, "qwen2.5-1.5b": 1.54e9, "qwen2.5-7b": 7.61e9, "qwen2.5-32b": 32.5e9,
    "qwen3-0.6b": 0.6e9, "qwen3-1.7b": 1.7e9, "qwen3-4b": 4.0e9, "qwen3-8b": 8.2e9,
    "qwen3-14b": 14.8e9, "qwen3-32b": 32.8e9, "llama3-8b": 8.03e9, "mistral-7b": 7.25e9, "mistral-nemo-12b": 12.2e9,
    "phi-4": 14.7e9, "gemma3-1b": 1.0e9, "gemma2-2b": 2.61e9, "gemma2-9b": 9.24e9, "gemma2-27b": 27.2e9, "olmo2-7b": 7.30e9, "olmo3-7b": 7.30e9, "gpt-oss-20b": 20.91e9, "gpt-oss-120b": 116.83e9,
    "qwen3-30b-a3b": 30.5e9, "qwen3-235b-a22b": 235e9, "qwen1.5-moe-a2.7b": 14.3e9, "qwen2-57b-a14b": 57e9,
    # DeepSeek-V3 without its multi-token-prediction module (685B with it); Kimi K2: "1.03T" on
    # its Hugging Face page ("1T" on the card); GLM-4.5's card
    "moonlight-16b-a3b": 16e9, "kimi-k2": 1.03e12, "deepseek-v3": 671e9, "glm-4.5-air": 106e9, "glm-4.5": 355e9,
    "deepseek-v2-lite": 15.7e9,
}
# activated parameters per token of the MoE presets, as published
PUBLISHED_ACTIVE = {"qwen1.5-moe-a2.7b": 2.7e9, "qwen2-57b-a14b": 14e9, "qwen3-30b-a3b": 3.3e9, "qwen3-235b-a22b": 22e9, "gpt-oss-20b": 3.61e9, "gpt-oss-120b": 5.13e9,
                    "kimi-k2": 32e9, "deepseek-v3": 37e9, "glm-4.5-air": 12e9, "glm-4.5": 32e9}
# what a card's "active" leaves out: gpt-oss, DeepSeek-V3 and Kimi K2 the input embedding, GLM-4.5
# both embeddings
ACTIVE_WITHOUT = {"gpt-oss": 1, "kimi-k2": 1, "deepseek-v3": 1, "glm-4.5": 2}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_preset_is_the_published_model(name):
    """Each preset exports to an HF config that transformers builds (on the meta device) into
    a model with our parameter count, which is the model card's; and it converts back."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_k15.models.config import preset
    from megatron_k15.models.hf_mapping import gpt_config_from_hf, hf_config_from_gpt

    cfg = preset(name)
    hf_dict = dict(hf_config_from_gpt(cfg))
    architecture = hf_dict["architectures"][0]
    config = AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config)
    assert type(hf).__name__ == architecture
    assert sum(p.numel() for p in hf.parameters()) == cfg.num_parameters()
    assert abs(cfg.num_parameters() / PUBLISHED_PARAMETERS[name] - 1) <= 0.015
    if name in PUBLISHED_ACTIVE:
        left_out = next((n for prefix, n in ACTIVE_WITHOUT.items() if name.startswith(prefix)), 0)
        active = cfg.num_active_parameters() - left_out * cfg.vocab_size * cfg.hidden_size
        assert abs(active / PUBLISHED_ACTIVE[name] - 1) <= 0.02
    back = gpt_config_from_hf(hf_config_from_gpt(cfg))
    for field in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads",
                  "num_query_groups", "kv_channels", "rotary_base", "add_qkv_bias", "qk_layernorm",
                  "tie_word_embeddings", "architecture", "eos_token_id", "num_moe_experts",
                  "moe_router_topk", "moe_ffn_hidden_size", "moe_norm_topk_prob", "rope_scaling",
                  "qk_layernorm_scope", "norm_placement", "norm_in_fp32", "sliding_window", "sliding_rope",
                  "attention_sinks", "add_attention_output_bias", "moe_router_bias", "moe_expert_bias",
                  "activation", "swiglu_alpha", "swiglu_limit", "norm_weight_offset", "embedding_multiplier",
                  "attention_softmax_scale", "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
                  "qk_pos_emb_head_dim", "v_head_dim", "moe_router_score_function", "moe_router_enable_expert_bias",
                  "moe_router_num_groups", "moe_router_group_topk", "moe_router_topk_scaling_factor",
                  "moe_shared_expert_intermediate_size", "rotary_percent"):
        assert getattr(back, field) == getattr(cfg, field), field
    assert [back.is_moe_layer(i) for i in range(cfg.num_layers)] == [cfg.is_moe_layer(i) for i in range(cfg.num_layers)]
    assert [back.is_sliding_layer(i) for i in range(cfg.num_layers)] == [
        cfg.is_sliding_layer(i) for i in range(cfg.num_layers)]


# Sliding windows of 24 tokens (30 for Phi-3) over 150-token sequences, so they bind:
# (kind, overrides, the layers that slide)
SLIDING_CASES = [
    ("mistral", {"sliding_window": 24}, [0, 1]),  # Mistral 7B v0.1: every layer
    ("phi3", {"sliding_window": 30}, [0, 1]),  # Phi-3-mini-4k's window
    ("qwen2", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 1}, [1]),
    ("olmo3", {}, [0, 1, 2]),  # three sliding layers, then a full one
    ("olmo3", {"rope_scaling": YARN_SCALING}, [0, 1, 2]),  # YaRN on the full layer only
    ("gemma3", {}, [0, 1, 2, 3, 4]),  # five local layers (RoPE base 1e4), a global one (1e6, linear x8)
    ("gemma2", {}, [0, 2]),  # alternating local and global layers, soft-capped scores and logits
    # Qwen2-MoE's own rule (not Qwen2's): every other layer below max_window_layers slides
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 24, "max_window_layers": 3}, [0, 2]),
]


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("kind,overrides,sliding", SLIDING_CASES)
def test_sliding_window_models_match_transformers(kind, overrides, sliding, backend):
    hf = tiny_hf_model(kind, **overrides)
    model = build_from_hf(hf, backend)
    cfg = model.config
    assert [i for i in range(cfg.num_layers) if cfg.is_sliding_layer(i)] == sliding
    assert (cfg.sliding_rope is not None) == (("rope_scaling" in overrides and kind == "olmo3") or kind == "gemma3")
    ids = torch.randint(0, cfg.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model.gather_logits(model(ids))
        assert (ours - ref).abs().max().item() <= 1e-4
        # the window matters: without it (every layer full) the logits move
        for layer in model.layers.values():
            layer.self_attention.window_size = (-1, -1)
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() > 1e-3


@pytest.mark.parametrize("kind,overrides,sliding", SLIDING_CASES)
def test_sliding_window_config_exports_without_the_original(kind, overrides, sliding):
    """A model whose config did not come from HF (a preset, flags) exports windows, layer types
    and per-type RoPE that transformers reads back into the same model."""
    hf = tiny_hf_model(kind, **overrides)
    cfg = build_from_hf(hf).config
    assert_export_rebuilds(hf, cfg, torch.randint(0, cfg.vocab_size, (1, 150), generator=torch.Generator().manual_seed(3)))


def test_olmo3_hub_config_scales_only_the_full_layers():
    """The hub's OLMo 3 configs (transformers 4) give one flat rope_scaling, which Olmo3Config
    applies to the full-attention layers only: read as transformers 5's nested form is."""
    from megatron_k15.models.hf_mapping import gpt_config_from_hf
    from megatron_k15.testing import hf_config_dict

    nested = hf_config_dict(tiny_hf_model("olmo3", rope_scaling=YARN_SCALING))
    flat = {k: v for k, v in nested.items() if k != "rope_parameters"}
    flat.update(rope_theta=500000.0, rope_scaling=dict(YARN_SCALING))
    a, b = gpt_config_from_hf(nested), gpt_config_from_hf(flat)
    assert (a.rotary_base, a.rope_scaling, a.sliding_rope) == (b.rotary_base, b.rope_scaling, b.sliding_rope)
    assert b.sliding_rope == {"rotary_base": 500000.0, "rope_scaling": None} and b.rope_scaling["factor"] == 4.0


def test_olmo3_with_its_own_sliding_theta_exports_nested_rope_parameters():
    """A RoPE per layer type that the old flat fields cannot say (another theta for the sliding
    layers) exports as transformers 5's nested rope_parameters, which rebuild our model."""
    import dataclasses

    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_k15.models.gpt import GPTModel
    from megatron_k15.models.hf_mapping import hf_config_from_gpt, megatron_to_hf

    cfg = dataclasses.replace(build_from_hf(tiny_hf_model("olmo3", rope_scaling=YARN_SCALING)).config, extra={},
                              sliding_rope={"rotary_base": 10000.0, "rope_scaling": None})
    ours = GPTModel(cfg, attention_backend="sdpa").eval()
    ours.reset_parameters(5)
    d = dict(hf_config_from_gpt(cfg))
    d.pop("architectures")
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d)).eval()
    full = {k: v[: cfg.vocab_size] if k in ("embedding.weight", "output_layer.weight") else v
            for k, v in ours.checkpoint_state_dict().items()}
    hf.load_state_dict(megatron_to_hf(full, cfg))
    ids = torch.randint(0, cfg.vocab_size, (1, 100), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (ours.gather_logits(ours(ids)) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_gpt_oss_matches_transformers(backend, monkeypatch):
    """gpt-oss: attention sinks, biased output projection, a sliding and a full layer, 4 biased
    experts (top-2, softmax over the chosen logits) with the clamped SwiGLU (the larger init
    drives gates past the clamp at 7), YaRN without truncation. The sinks and the clamp matter:
    without either the logits move."""
    from megatron_k15.models import layers

    hf = tiny_hf_model("gpt_oss", initializer_range=0.3)
    model = build_from_hf(hf, backend)
    cfg = model.config
    assert (cfg.architecture, cfg.activation, cfg.num_moe_experts, cfg.moe_router_topk) == ("gpt_oss", "swiglu_clamped", 4, 2)
    assert cfg.attention_sinks and cfg.moe_expert_bias and cfg.moe_router_bias and cfg.add_attention_output_bias
    assert [cfg.is_sliding_layer(i) for i in range(2)] == [True, False]
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    gates = []
    real = layers.gated_activation
    monkeypatch.setattr(layers, "gated_activation", lambda g, u, c: gates.append(g.max().item()) or real(g, u, c))
    ids = torch.randint(0, cfg.vocab_size, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() <= 1e-4
        assert max(gates) > cfg.swiglu_limit
        unclamped = dict(cfg.__dict__, swiglu_limit=1e9)
        for m in model.moe_layers():
            m.cfg = type(cfg)(**unclamped)
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() > 1e-3
        for m in model.moe_layers():
            m.cfg = cfg
        for layer in model.layers.values():
            layer.self_attention.sinks.fill_(-1e4)  # no sink: plain softmax
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() > 1e-3


def _assert_meta_conversion_matches(sd, cfg, converted):
    """The converter's dry run on meta tensors (no data read) sees the names, shapes and
    dtypes the real conversion makes, dequantization included; every tensor of ``sd`` (blocks,
    scales) is read."""
    from megatron_k15.models.hf_mapping import hf_to_megatron, unread_hf_tensors
    from megatron_k15.models.lazy_state_dict import meta_state_dict

    meta = hf_to_megatron(meta_state_dict(sd), cfg)
    assert {k: (tuple(v.shape), v.dtype) for k, v in meta.items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in converted.items()}
    assert all(v.is_meta for v in meta.values())
    assert unread_hf_tensors(sd, cfg) == []


def test_mxfp4_dequantization_equals_transformers_and_loads_the_model():
    """The hub ships gpt-oss's experts as MXFP4 blocks and scales: our dequantization equals
    transformers' on random codes, and a checkpoint holding the experts that way gives the
    logits of the model holding them dequantized."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from megatron_k15.models.hf_mapping import dequantize_mxfp4, gpt_config_from_hf, hf_config_from_gpt, hf_to_megatron
    from megatron_k15.models.sharding import split_for_rank
    from megatron_k15.testing import hf_config_dict

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 2, 16), generator=g, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(120, 131, (3, 10, 2), generator=g, dtype=torch.int32).to(torch.uint8)
    ours = dequantize_mxfp4(blocks, scales, torch.float32)
    assert torch.equal(ours.transpose(1, 2), convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))

    hf = tiny_hf_model("gpt_oss", initializer_range=0.3, intermediate_size=64)  # MXFP4 rows: 32s
    sd = dict(hf.state_dict())
    for i in range(2):
        e = f"model.layers.{i}.mlp.experts."
        for name, (rows, cols) in (("gate_up_proj", (128, 64)), ("down_proj", (64, 64))):
            blk = torch.randint(0, 256, (4, rows, cols // 32, 16), generator=g, dtype=torch.int32).to(torch.uint8)
            sc = torch.randint(118, 124, (4, rows, cols // 32), generator=g, dtype=torch.int32).to(torch.uint8)
            with torch.no_grad():  # the HF model holds them dequantized (E, in, out)
                getattr(hf.model.layers[i].mlp.experts, name).copy_(convert_moe_packed_tensors(blk, sc, dtype=torch.float32))
            del sd[e + name]
            sd[e + name + "_blocks"], sd[e + name + "_scales"] = blk, sc
    cfg = gpt_config_from_hf({**hf_config_dict(hf), "quantization_config": {"quant_method": "mxfp4"}})
    assert "quantization_config" not in hf_config_from_gpt(cfg)  # exported weights are dequantized
    model = build_from_hf(hf)
    ours = hf_to_megatron(sd, cfg)
    _assert_meta_conversion_matches(sd, cfg, ours)
    model.load_checkpoint_state_dict(split_for_rank(ours, 1, 0, 1, 0, cfg.num_layers,
                                                    cfg.tie_word_embeddings, model.padded_vocab_size))
    ids = torch.randint(0, cfg.vocab_size, (1, 64), generator=g)
    with torch.no_grad():
        assert (model.gather_logits(model(ids)) - hf(ids).logits).abs().max().item() <= 1e-4


def test_gemma3_reads_its_block_from_the_config():
    """Gemma 3 (text): the block's pieces come from the config (the logits tests above need
    every one of them: (1 + w) norms before and after each sublayer, sqrt(hidden)-scaled
    embeddings, query_pre_attn_scalar's softmax scale, GeGLU, per-head q/k norms, local/global RoPE)."""
    hf = tiny_hf_model("gemma3")
    cfg = build_from_hf(hf).config
    assert (cfg.architecture, cfg.norm_placement, cfg.norm_weight_offset, cfg.activation) == (
        "gemma3", "sandwich", 1.0, "geglu_tanh")
    assert cfg.embedding_multiplier == 64 ** 0.5 and cfg.attention_softmax_scale == 24 ** -0.5
    assert cfg.qk_layernorm and cfg.qk_layernorm_scope == "head" and cfg.tie_word_embeddings
    assert cfg.rope_scaling == {"factor": 8.0, "rope_type": "linear"}
    assert cfg.sliding_rope == {"rotary_base": 10000.0, "rope_scaling": None}
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_gemma2_soft_caps_match_transformers_and_matter(backend):
    """Gemma 2 (eager attention in transformers, its only soft-capping one): logits, and the
    response log-probs of both our paths (vocab-parallel cross-entropy and the fused kernel),
    equal transformers'; each cap matters (removing it moves the logits)."""
    hf = tiny_hf_model("gemma2", initializer_range=0.2)
    model = build_from_hf(hf, backend)
    cfg = model.config
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (0.5, 1.0)
    assert not cfg.qk_layernorm and cfg.sliding_rope is None and cfg.num_parameters() == sum(
        p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() <= 1e-4
        want = torch.log_softmax(ref.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        for impl in ("ce", "fused"):
            model.logprob_impl = impl
            assert (model(ids[:, :-1], labels=ids[:, 1:]) - want).abs().max().item() <= 1e-4, impl
        for field in ("attn_logit_softcapping", "final_logit_softcapping"):
            uncapped = build_from_hf(hf, backend)
            setattr(uncapped.config, field, None)
            for layer in uncapped.layers.values():
                layer.self_attention.softcap = uncapped.config.attn_logit_softcapping or 0.0
            assert (uncapped.gather_logits(uncapped(ids)) - ref).abs().max().item() > 1e-2, field


def test_gemma2_caps_default_as_gemma2config_and_null_turns_them_off():
    from megatron_k15.models.hf_mapping import gpt_config_from_hf
    from megatron_k15.testing import hf_config_dict

    d = hf_config_dict(tiny_hf_model("gemma2"))
    absent = {k: v for k, v in d.items() if k not in ("attn_logit_softcapping", "final_logit_softcapping")}
    cfg = gpt_config_from_hf(absent)
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (50.0, 30.0)  # Gemma2Config's
    cfg = gpt_config_from_hf({**d, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) == (None, None)


def test_olmo2_matches_transformers_and_its_block():
    hf = tiny_hf_model("olmo2")
    model = build_from_hf(hf)
    cfg = model.config
    assert (cfg.architecture, cfg.norm_placement, cfg.qk_layernorm_scope) == ("olmo2", "post", "all")
    assert cfg.norm_in_fp32 and cfg.sliding_window is None and not cfg.add_qkv_bias
    layer = model.layers["0"]
    assert not hasattr(layer, "input_layernorm") and layer.post_mlp_layernorm.weight.shape == (64,)
    assert layer.self_attention.q_norm_all_heads.weight.shape == (cfg.query_projection_size,)
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (3, 150), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model.gather_logits(model(ids)) - hf(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind,change,match", [
    ("qwen2", lambda d: d.update(layer_types=["sliding_attention"] * 2, use_sliding_window=False),
     "no sliding_window"),
    ("olmo3", lambda d: d.update(sliding_window=None), "without sliding_window"),
    ("olmo3", lambda d: d.update(layer_types=["full_attention", "sliding_attention", "full_attention"]),
     "entries"),
    ("olmo3", lambda d: d.update(sliding_window=0), "positive"),
])
def test_sliding_window_config_errors_name_the_field(kind, change, match):
    from megatron_k15.models.hf_mapping import HFCheckpointError, gpt_config_from_hf
    from megatron_k15.testing import hf_config_dict

    d = hf_config_dict(tiny_hf_model(kind, num_hidden_layers=2))
    change(d)
    with pytest.raises(HFCheckpointError, match=match):
        gpt_config_from_hf(d)


def test_qwen3_config_without_head_dim_follows_transformers():
    from transformers import Qwen3Config

    from megatron_k15.models.hf_mapping import gpt_config_from_hf
    from megatron_k15.testing import hf_config_dict

    d = hf_config_dict(tiny_hf_model("qwen3"))
    del d["head_dim"]
    assert gpt_config_from_hf(d).head_dim == Qwen3Config(**d).head_dim == 128


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_glm_matches_transformers_with_partial_interleaved_rope(kind, backend):
    """GLM-4 and GLM-4-0414: RoPE on the first half of each head's channels, in GLM's
    interleaved pairs (reordered on conversion), QKV bias, fused gate_up; GLM-4-0414 adds a
    norm after each sublayer. Logits equal transformers; rotating whole heads moves them; a
    config written without the original rebuilds the same HF model."""
    hf = tiny_hf_model(kind)
    model = build_from_hf(hf, backend)
    cfg = model.config
    assert (cfg.architecture, cfg.rotary_percent, cfg.rotary_dim, cfg.add_qkv_bias) == (kind, 0.5, 16, True)
    assert cfg.norm_placement == ("sandwich" if kind == "glm4" else "pre") and cfg.norm_weight_offset == 0.0
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() <= 1e-4
        whole = build_from_hf(hf, backend)
        whole.rotary = type(whole.rotary)(cfg.head_dim, cfg.rotary_base)  # RoPE over the whole head
        assert (whole.gather_logits(whole(ids)) - ref).abs().max().item() > 1e-3
    assert_export_rebuilds(hf, cfg, ids)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_smollm3_matches_transformers_with_nope_layers(backend):
    """SmolLM3: Llama's block with no position embedding on every fourth layer (the config's
    no_rope_layers). Logits equal transformers; rotating that layer too moves them; a config
    written without the original rebuilds the same HF model."""
    hf = tiny_hf_model("smollm3")
    model = build_from_hf(hf, backend)
    cfg = model.config
    assert (cfg.architecture, cfg.nope_layers, cfg.tie_word_embeddings) == ("smollm3", [3], True)
    assert [layer.self_attention.use_rope for layer in model.layers.values()] == [True, True, True, False]
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() <= 1e-4
        model.layers["3"].self_attention.use_rope = True
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() > 1e-3
    assert_export_rebuilds(hf, cfg, ids)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("hybrid", [True, False], ids=["32b-hybrid", "1.2b-global"])
def test_exaone4_matches_transformers(hybrid, backend):
    """EXAONE 4.0: norms after the sublayers, per-head q/k norms; the 32B form slides three
    layers in four (with RoPE) and leaves the global ones without RoPE, the 1.2B form has only
    global layers with RoPE. Logits equal transformers; the exported config rebuilds the model."""
    hf = tiny_hf_model("exaone4", **({} if hybrid else {"sliding_window": None, "layer_types": ["full_attention"] * 4}))
    model = build_from_hf(hf, backend)
    cfg = model.config
    assert (cfg.norm_placement, cfg.qk_layernorm, cfg.qk_layernorm_scope, cfg.norm_in_fp32) == ("post", True, "head", False)
    assert (cfg.nope_layers, cfg.sliding_window) == (([3], 24) if hybrid else (None, None))
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() <= 1e-4
    assert_export_rebuilds(hf, cfg, ids)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_glm4_moe_matches_transformers_with_deepseek_routing(backend):
    """GLM-4.5 (DeepSeek-V3's MoE): a dense first layer, then experts chosen by sigmoid score +
    correction bias within the best group, weighted by the renormalised scores x 2.5, plus a
    shared expert; partial (rotate-half) RoPE, QKV bias, per-head q/k norms. Logits equal
    transformers; each routing piece matters (changing it moves them); the exported config
    rebuilds the same HF model."""
    from megatron_k15.models.layers import MoEMLP, SwiGLUMLP

    hf = tiny_hf_model("glm4_moe")
    model = build_from_hf(hf, backend)
    cfg = model.config
    assert (cfg.moe_layer_freq, cfg.moe_router_score_function, cfg.moe_router_num_groups,
            cfg.moe_router_group_topk, cfg.moe_router_topk_scaling_factor,
            cfg.moe_shared_expert_intermediate_size) == ([0, 1, 1], "sigmoid", 2, 1, 2.5, 32)
    assert (cfg.rotary_dim, cfg.add_qkv_bias, cfg.qk_layernorm) == (16, True, True)
    assert [type(layer.mlp) for layer in model.layers.values()] == [SwiGLUMLP, MoEMLP, MoEMLP]
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() <= 1e-4
        for change in ("expert_bias", "groups", "scaling"):
            other = build_from_hf(hf, backend)
            for m in other.moe_layers():
                if change == "expert_bias":
                    m.router.expert_bias.zero_()
                elif change == "groups":
                    m.groups = 1
                else:
                    m.scaling = 1.0
            assert (other.gather_logits(other(ids)) - ref).abs().max().item() > 1e-3, change
    assert_export_rebuilds(hf, cfg, ids)


DEEPSEEK_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "mscale": 1.0,
                 "mscale_all_dim": 1.0, "beta_fast": 1.0, "beta_slow": 1.0}  # Kimi K2's form at x4


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("variant", ["q-lora", "no-q-lora", "yarn", "moonlight-eps"])
def test_deepseek_v3_matches_transformers(variant, backend):
    """DeepSeek-V3 / Moonlight / Kimi K2: multi-latent attention (q through a latent or not;
    heads of 16 + 8 interleaved-RoPE channels, v of 16: the core runs at 24, Triton pads it to
    32) and DeepSeek's MoE. Logits equal transformers; under YaRN the softmax scale carries
    mscale(factor, mscale_all_dim)^2; the exported config rebuilds the same HF model."""
    from megatron_k15.models.layers import MultiLatentAttention

    # moonlight-eps: the model's norms take rms_norm_eps (1e-2 here, to be seen; Moonlight's 1e-5),
    # the latent norms transformers' fixed 1e-6
    over = {"no-q-lora": {"q_lora_rank": None}, "yarn": {"rope_scaling": DEEPSEEK_YARN},
            "moonlight-eps": {"q_lora_rank": None, "rms_norm_eps": 1e-2}}.get(variant, {})
    hf = tiny_hf_model("deepseek_v3", **over)
    model = build_from_hf(hf, backend)
    cfg = model.config
    assert (cfg.multi_latent_attention, cfg.head_dim, cfg.rotary_dim, cfg.num_query_groups) == (True, 24, 8, 4)
    assert cfg.q_lora_rank == (None if variant in ("no-q-lora", "moonlight-eps") else 32)
    assert (cfg.norm_epsilon, cfg.mla_latent_norm_epsilon) == ((1e-2 if variant == "moonlight-eps" else 1e-6), 1e-6)
    attn = model.layers["0"].self_attention
    assert isinstance(attn, MultiLatentAttention)
    mscale = (0.1 * math.log(4.0) + 1.0) ** 2 if variant == "yarn" else 1.0
    assert attn.softmax_scale == pytest.approx(24 ** -0.5 * mscale)
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() <= 1e-4
        if variant == "yarn":  # without the mscale^2 the logits move
            for layer in model.layers.values():
                layer.self_attention.softmax_scale = 24 ** -0.5
            assert (model.gather_logits(model(ids)) - ref).abs().max().item() > 1e-3
    assert_export_rebuilds(hf, cfg, ids)


def test_fp8_block_checkpoint_dequantizes_to_the_model_it_encodes():
    """DeepSeek-V3 / Kimi K2 ship their linear weights as float8 e4m3 with one fp32 scale per
    block (``weight_scale_inv``; 16 x 16 here, so the tiny matrices hold several blocks and some
    cut at the edge). Conversion dequantizes them: the model equals transformers holding
    q * s, block by block; a wrong block mapping would not."""
    from megatron_k15.models.gpt import GPTModel
    from megatron_k15.models.hf_mapping import (HFCheckpointError, dequantize_fp8_blocks, gpt_config_from_hf,
                                                hf_config_from_gpt, hf_to_megatron)
    from megatron_k15.testing import hf_config_dict

    block = (16, 16)
    hf = tiny_hf_model("deepseek_v3")
    quantized, dequantized = {}, {}
    for name, t in hf.state_dict().items():
        if name.endswith("proj.weight") and t.dim() == 2 and "layernorm" not in name:
            rows, cols = t.shape
            tiles = (-(-rows // 16), -(-cols // 16))
            gen = torch.Generator().manual_seed(len(name))
            scale = torch.rand(tiles, generator=gen) * 0.01 + 0.001
            full = scale.repeat_interleave(16, 0)[:rows].repeat_interleave(16, 1)[:, :cols]
            q = (t / full).to(torch.float8_e4m3fn)
            quantized[name], quantized[name + "_scale_inv"] = q, scale
            dequantized[name] = (q.float() * full).to(torch.bfloat16).float()
        else:
            quantized[name] = t
    assert len(dequantized) > 10
    d = hf_config_dict(hf)
    d["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(block)}
    cfg = gpt_config_from_hf(d)
    ours = hf_to_megatron(quantized, cfg)
    _assert_meta_conversion_matches(quantized, cfg, ours)
    hf.load_state_dict({**hf.state_dict(), **dequantized})
    model = GPTModel(cfg, attention_backend="sdpa")
    from megatron_k15.models.sharding import split_for_rank

    model.load_checkpoint_state_dict(split_for_rank({k: v.float() for k, v in ours.items()}, 1, 0, 1, 0,
                                                    cfg.num_layers, cfg.tie_word_embeddings, model.padded_vocab_size))
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model.gather_logits(model(ids)) - hf(ids).logits).abs().max().item() <= 1e-4
    assert "quantization_config" not in hf_config_from_gpt(cfg)  # exports unquantized
    with pytest.raises(HFCheckpointError, match=r"needs \(2, 2\) scales"):
        dequantize_fp8_blocks(torch.zeros(32, 32).to(torch.float8_e4m3fn), torch.ones(2, 3), block)
    bad = {k: v for k, v in quantized.items()}
    bad["model.layers.0.self_attn.missing.weight_scale_inv"] = torch.ones(1, 1)
    with pytest.raises(HFCheckpointError, match="has no weight"):
        hf_to_megatron(bad, cfg)


@pytest.mark.parametrize("change,match", [
    (dict(sliding_window=8), "sliding windows"), (dict(norm_weight_offset=1.0), "offset"),
    (dict(qk_layernorm=True), "--qk-layernorm"), (dict(kv_lora_rank=0), "--kv-lora-rank"),
])
def test_mla_refuses_what_it_does_not_implement(change, match):
    from megatron_k15.models.config import ConfigError, GPTConfig

    with pytest.raises(ConfigError, match=match):
        GPTConfig(multi_latent_attention=True, num_attention_heads=4, **change).validate()


@pytest.mark.parametrize("overrides,pattern", [
    ({"num_hidden_layers": 3, "mlp_only_layers": [1]}, [1, 0, 1]),
    ({"num_hidden_layers": 4, "decoder_sparse_step": 2}, [0, 1, 0, 1]),
])
def test_qwen3_moe_with_dense_layers_matches_transformers(overrides, pattern):
    """Qwen3-MoE's mlp_only_layers / decoder_sparse_step: those layers keep a dense MLP
    (intermediate_size); logits equal transformers, and the export rebuilds the same model."""
    hf = tiny_hf_model("qwen3_moe", **overrides)
    model = build_from_hf(hf)
    cfg = model.config
    assert [int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)] == pattern
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model.gather_logits(model(ids)) - hf(ids).logits).abs().max().item() <= 1e-4
    assert_export_rebuilds(hf, cfg, ids)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_qwen2_moe_gated_shared_expert_matches_transformers(backend):
    """Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): softmax top-2 not renormalised, a dense
    layer among MoE ones, and the shared expert scaled by sigmoid(x . g): logits equal
    transformers, the gate matters, the parameters are HF's, and the export rebuilds the model."""
    hf = tiny_hf_model("qwen2_moe", initializer_range=0.2)
    model = build_from_hf(hf, backend)
    cfg = model.config
    assert (cfg.architecture, cfg.moe_shared_expert_intermediate_size, cfg.moe_shared_expert_gate) == (
        "qwen2_moe", 48, True)
    assert cfg.add_qkv_bias and not cfg.moe_norm_topk_prob and cfg.moe_router_dtype is None
    assert [int(cfg.is_moe_layer(i)) for i in range(cfg.num_layers)] == [1, 0, 1]
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 60), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() <= 1e-4
        gate = model.layers["0"].mlp.shared_experts.gate_weight
        gate.zero_()  # sigmoid(0) = 1/2 for every token
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() > 1e-3
    assert_export_rebuilds(hf, cfg, ids)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("topk_method", ["group_limited_greedy", "greedy"])
def test_deepseek_v2_matches_transformers(topk_method, backend):
    """DeepSeek-V2 (V2-Lite's form): V3's multi-latent attention, experts by softmax scores in
    fp32 (group_limited_greedy: only in the best group, a group scoring by its best expert),
    weights not renormalised, x1.5. Logits equal transformers; the groups matter; the exported
    config rebuilds the same HF model."""
    over = {} if topk_method == "group_limited_greedy" else {"topk_method": "greedy", "n_group": None, "topk_group": None}
    hf = tiny_hf_model("deepseek_v2", **over)
    model = build_from_hf(hf, backend)
    cfg = model.config
    grouped = topk_method == "group_limited_greedy"
    assert (cfg.architecture, cfg.multi_latent_attention, cfg.q_lora_rank, cfg.moe_router_score_function) == (
        "deepseek_v2", True, None, "softmax")
    assert (cfg.moe_router_num_groups, cfg.moe_router_group_score_topk, cfg.moe_norm_topk_prob,
            cfg.moe_router_enable_expert_bias, cfg.moe_router_dtype) == ((2 if grouped else None), 1, False, False, "fp32")
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 150), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model.gather_logits(model(ids)) - ref).abs().max().item() <= 1e-4
        if grouped:
            for m in model.moe_layers():
                m.groups = 1
            assert (model.gather_logits(model(ids)) - ref).abs().max().item() > 1e-3
    assert_export_rebuilds(hf, cfg, ids)


def test_deepseek_v2_with_renormalised_weights_is_refused():
    """transformers' V2 never renormalises the k weights while DeepSeek's own code does when
    norm_topk_prob is true: such a checkpoint is refused, naming the field."""
    from megatron_k15.models.hf_mapping import HFCheckpointError, gpt_config_from_hf
    from megatron_k15.testing import hf_config_dict

    d = hf_config_dict(tiny_hf_model("deepseek_v2"))
    d["norm_topk_prob"] = True
    with pytest.raises(HFCheckpointError, match="norm_topk_prob"):
        gpt_config_from_hf(d)


# Phi-3.5-mini / Phi-4-mini's LongRoPE on the tiny Phi-3 (head 16, 3/4 of it rotated: 6 channel
# pairs), pretrained for 32 positions and stretched to 512 (factor 16, attention factor sqrt(1.8))
LONGROPE = dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.9, 2.6, 3.3],
                              "long_factor": [1.0, 1.4, 2.9, 6.5, 11.0, 17.0]},
                original_max_position_embeddings=32, partial_rotary_factor=0.75)


def test_phi3_longrope_matches_transformers_on_either_side_of_the_original_context():
    """transformers picks the short factors for a forward of <= 32 positions and the long ones
    beyond; our run picks one list by its longest sequence (``longrope_factors`` auto) or as
    told. Each matches transformers on its side and differs from it on the other, and the
    exported config rebuilds the same model (the original context at Phi-3's top level)."""
    from megatron_k15.models.rope import rope_attention_factor, rope_inv_freq, with_longrope_choice
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = tiny_hf_model("phi3", **LONGROPE)
    gen = torch.Generator().manual_seed(4)
    short_ids, long_ids = torch.randint(0, 300, (2, 20), generator=gen), torch.randint(0, 300, (2, 150), generator=gen)
    runs = {"auto": build_from_hf(hf), "short-by-length": gpt_from_hf(hf, max_sequence_length=32),
            "short": gpt_from_hf(hf, longrope_factors="short")}
    cfg = runs["auto"].config
    scaling = cfg.rope_scaling
    assert (scaling["rope_type"], scaling["original_max_position_embeddings"], scaling["factor"]) == ("longrope", 32, 16.0)
    assert cfg.rotary_dim == 12
    # the frequencies and the attention factor, against transformers' own computation
    for seq_len, choice in ((20, "short"), (33, "long")):
        ref, ref_factor = ROPE_INIT_FUNCTIONS["longrope"](hf.config, "cpu", seq_len=seq_len)
        torch.testing.assert_close(rope_inv_freq(12, cfg.rotary_base, with_longrope_choice(scaling, choice)), ref,
                                   rtol=0, atol=0)
        assert rope_attention_factor(scaling) == pytest.approx(ref_factor, rel=1e-12) == pytest.approx(math.sqrt(1.8))
    with torch.no_grad():
        ref_short, ref_long = hf(short_ids).logits, hf(long_ids).logits
        got = {name: (m.gather_logits(m(short_ids)), m.gather_logits(m(long_ids))) for name, m in runs.items()}
    def diff(a, b):
        return (a - b).abs().max().item()

    # (the other list moves the random model's logits by ~1e-3; the right one matches to ~1e-6)
    assert diff(got["auto"][1], ref_long) <= 1e-5  # the whole context: long factors
    assert diff(got["auto"][0], ref_short) > 3e-4  # (transformers: short for 20 positions)
    for name in ("short-by-length", "short"):
        assert diff(got[name][0], ref_short) <= 1e-5, name
        assert diff(got[name][1], ref_long) > 3e-4, name
    assert_export_rebuilds(hf, cfg, long_ids[:1])
    assert_export_rebuilds(hf, cfg, short_ids[:1])


@pytest.mark.parametrize("change,match", [
    (lambda s: s.update(short_factor=s["short_factor"][:5]), "short_factor must list 6 positive numbers"),
    (lambda s: s.update(long_factor=[1.0] * 5 + [0.0]), "long_factor must list 6 positive numbers"),
    (lambda s: s.pop("factor"), r"missing \['factor'\]"),
])
def test_longrope_config_errors_name_the_field(change, match):
    import dataclasses

    from megatron_k15.models.config import ConfigError

    cfg = build_from_hf(tiny_hf_model("phi3", **LONGROPE)).config
    scaling = dict(cfg.rope_scaling)
    change(scaling)
    with pytest.raises(ConfigError, match=match):
        dataclasses.replace(cfg, rope_scaling=scaling).validate()


def test_longrope_in_nested_rope_parameters_takes_the_context_for_its_factor():
    """transformers 5 nests rope_parameters by layer type; a LongRoPE entry there has no factor
    of its own, which defaults to max_position_embeddings / original (512 / 64), as at top level."""
    from megatron_k15.models.hf_mapping import _layer_type_rope

    longrope = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "rope_theta": 1e4,
                "original_max_position_embeddings": 64}
    hf = {"max_position_embeddings": 512,
          "rope_parameters": {"full_attention": longrope, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    (theta, scaling), sliding = _layer_type_rope(hf, "olmo3", "config.json")
    assert (scaling["rope_type"], scaling["factor"], scaling["original_max_position_embeddings"]) == ("longrope", 8.0, 64)
    assert sliding == {"rotary_base": 1e4, "rope_scaling": None}


@pytest.mark.parametrize("kind", ["llama", "qwen3", "olmo2", "gemma3"])
def test_attention_bias_covers_o_proj_where_transformers_puts_it(kind):
    """attention_bias=true gives these classes a bias on o_proj too (Qwen2, GLM and Phi-3 on q,
    k, v only): it converts as add_attention_output_bias, every tensor is read, the logits match
    (and would not without it), and the config exports and rebuilds the same model."""
    from megatron_k15.models.hf_mapping import unread_hf_tensors

    hf = tiny_hf_model(kind, attention_bias=True)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("o_proj.bias"):
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    model = build_from_hf(hf)
    cfg = model.config
    assert cfg.add_qkv_bias and cfg.add_attention_output_bias
    assert unread_hf_tensors(hf.state_dict(), cfg) == []
    ids = torch.randint(0, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model.gather_logits(model(ids)) - ref).abs().max() <= 1e-4
        for layer in model.layers.values():
            layer.self_attention.linear_proj.bias.zero_()
        assert (model.gather_logits(model(ids)) - ref).abs().max() > 1e-2
    assert_export_rebuilds(hf, cfg, ids[:1])
