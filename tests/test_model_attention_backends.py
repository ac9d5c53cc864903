"""The model with --attention-backend triton (our flash kernels; interpreter on CPU) equals sdpa:
logits and every gradient, dense and packed variable-length batches."""

import copy

import pytest
import torch

from megatron_k15.initialize import initialize_model_parallel
from megatron_k15.models.attention import resolve_attention_backend
from megatron_k15.models.gpt import GPTModel
from megatron_k15.models.config import preset


@pytest.fixture(scope="module", autouse=True)
def _single_rank():
    initialize_model_parallel(1)


def _pair():
    torch.manual_seed(0)
    cfg = preset("tiny", num_layers=2, init_method_std=0.2)
    sdpa = GPTModel(cfg, attention_backend="sdpa")
    triton = GPTModel(cfg, attention_backend="triton")
    triton.load_state_dict(copy.deepcopy(sdpa.state_dict()))
    return sdpa, triton


def _logp_and_grads(model, ids, labels, cu_seqlens=None):
    model.zero_grad()
    logp = model(ids, labels=labels, cu_seqlens=cu_seqlens)
    logits = model(ids, cu_seqlens=cu_seqlens)
    (logp.sum() + 0.01 * logits.float().pow(2).mean()).backward()
    return logp.detach(), logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed", [False, True])
def test_triton_backend_equals_sdpa(packed):
    sdpa, triton = _pair()
    gen = torch.Generator().manual_seed(1)
    if packed:
        ids = torch.randint(0, 256, (1, 40), generator=gen)
        cu = torch.tensor([0, 1, 18, 33, 40], dtype=torch.int32)  # includes a length-1 sequence
    else:
        ids = torch.randint(0, 256, (2, 33), generator=gen)
        cu = None
    labels = torch.roll(ids, -1, dims=1)
    a = _logp_and_grads(sdpa, ids, labels, cu)
    b = _logp_and_grads(triton, ids, labels, cu)
    assert (a[0] - b[0]).abs().max() <= 1e-5
    assert (a[1][..., :260] - b[1][..., :260]).abs().max() <= 1e-5
    for name, g in a[2].items():
        # fp32 with different summation orders: 1e-5 relative to the gradient's scale
        scale = max(1.0, g.abs().max().item())
        assert (g - b[2][name]).abs().max() <= 1e-5 * scale, name


def test_auto_backend_resolves_by_device():
    expected = "triton" if torch.cuda.is_available() else "sdpa"
    assert resolve_attention_backend("auto") == expected
    assert resolve_attention_backend("auto", head_dim=128) == expected
    assert resolve_attention_backend("auto", head_dim=80) == "sdpa"  # not a power of two: never Triton
    assert resolve_attention_backend("sdpa") == "sdpa"


def test_head_dim_the_flash_kernels_cannot_take():
    """head_dim 80 (five heads of 80 in 400): auto picks SDPA; the Triton backend zero-pads the
    heads to 128 for its kernels and gives SDPA's logits, LSE and gradients; a head above 256
    is refused when the model is built, naming the flag, not at the first forward."""
    from megatron_k15.models.attention import get_attention_backend

    initialize_model_parallel(1)
    cfg = preset("tiny", hidden_size=400, num_attention_heads=5, num_query_groups=5, ffn_hidden_size=64)
    assert cfg.head_dim == 80
    model = GPTModel(cfg, attention_backend="auto")
    model.reset_parameters(0)
    assert model.attention_backend == "sdpa"
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7]])
    assert model(ids)[..., :cfg.vocab_size].isfinite().all()  # the padding is -inf
    triton = GPTModel(cfg, attention_backend="triton")
    triton.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (triton(ids) - model(ids))[..., :cfg.vocab_size].abs().max() <= 1e-5
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 5, 80, generator=gen, requires_grad=True) for _ in range(3))
    grads = []
    for name in ("sdpa", "triton"):
        fn = get_attention_backend(name, 80)
        out, lse = fn(q, k, v, causal=True, softmax_scale=0.1, return_lse=True)
        assert out.shape == q.shape
        grads.append((out, lse, torch.autograd.grad(out.square().sum(), (q, k, v))))
    (o1, l1, g1), (o2, l2, g2) = grads
    assert (o1 - o2).abs().max() <= 1e-5 and (l1 - l2).abs().max() <= 1e-5
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(g1, g2))
    big = preset("tiny", hidden_size=320, num_attention_heads=1, num_query_groups=1, ffn_hidden_size=64)
    with pytest.raises(ValueError, match="head_dim 320.*--attention-backend sdpa"):
        GPTModel(big, attention_backend="triton")


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_chunk_over_cached_prefix_is_bottom_right_causal(backend):
    """q shorter than k/v (a prefill chunk over a cached prefix): query i sees key j iff
    j <= i + s_k - s_q, as flash-attn aligns it; checked against a float64 reference, GQA 4:1."""
    from megatron_k15.kernels.flash_attention import attention_reference
    from megatron_k15.models.attention import get_attention_backend

    gen = torch.Generator().manual_seed(3)
    sq, sk, h, kv, d = 5, 13, 8, 2, 16
    q = torch.randn(1, sq, h, d, generator=gen)
    k = torch.randn(1, sk, kv, d, generator=gen)
    v = torch.randn(1, sk, kv, d, generator=gen)
    out = get_attention_backend(backend)(q, k, v, causal=True, softmax_scale=0.3)
    ref = attention_reference(q, k, v, causal=True, softmax_scale=0.3, upcast=torch.float64)
    assert (out.double() - ref).abs().max() <= 1e-5
    # and it is bottom-right: the top-left alignment would differ
    top_left = attention_reference(q, k[:, :sq], v[:, :sq], causal=True, softmax_scale=0.3,
                                   upcast=torch.float64)
    assert (out.double() - top_left).abs().max() > 1e-2
