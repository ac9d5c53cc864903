"""Our GPT reproduces transformers' logits for random Qwen2 and Llama models (fp32)."""

import pytest
import torch

from megatron_k15.initialize import initialize_model_parallel
from megatron_k15.testing import gpt_from_hf, tiny_hf_model

YARN_SCALING = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}  # x4 = 512
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def build_from_hf(hf, attention_backend="sdpa"):
    return gpt_from_hf(hf, attention_backend)


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    initialize_model_parallel(1)


@pytest.mark.parametrize("kind,overrides", [
    ("qwen2", {}),                                   # QKV bias, GQA 3:1, untied
    ("llama", {}),                                   # tied, theta 500000, GQA 2:1
    ("llama", {"rope_scaling": LLAMA3_SCALING}),     # Llama-3 frequency scaling
    ("qwen2", {"rope_scaling": YARN_SCALING}),       # YaRN (Qwen2.5 at 128K), attention factor
    ("qwen2", {"rope_scaling": {**YARN_SCALING, "beta_fast": 16, "mscale": 0.9, "mscale_all_dim": 0.5}}),
])
def test_logits_match_transformers(kind, overrides):
    hf = tiny_hf_model(kind, **overrides)
    model = build_from_hf(hf)
    cfg = model.config
    if kind == "qwen2":
        assert cfg.add_qkv_bias and not cfg.tie_word_embeddings
        assert cfg.num_attention_heads // cfg.num_query_groups == 3
    else:
        assert cfg.tie_word_embeddings and cfg.rotary_base == 500000.0
    assert (cfg.rope_scaling is not None) == ("rope_scaling" in overrides)
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
