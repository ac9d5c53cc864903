"""Paged split-KV decode attention vs references (runs under TRITON_INTERPRET=1 on CPU).

Tolerances: fp32 <= 1e-5 against a float64 reference (the kernel uses IEEE fp32 dots);
fp16 <= 2e-3 and bf16 <= 2e-2 against the fp32 reference on the same (rounded) inputs.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_k15.kernels import decode_attention as da
from megatron_k15.kernels.decode_attention import (
    default_num_splits,
    paged_decode_attention,
    paged_decode_attention_reference,
    paged_decode_attention_torch,
)

HAS_TRITON_RUNTIME = da.HAVE_TRITON and (torch.cuda.is_available() or da.INTERPRET)
needs_triton = pytest.mark.skipif(not HAS_TRITON_RUNTIME,
                                  reason="needs triton on CUDA or TRITON_INTERPRET=1")


def _make(seq_lens, n_heads, n_kv, head_dim, block_size=16, dtype=torch.float32, seed=0,
          extra_blocks=5, device="cpu"):
    """Random cache whose sequences use shuffled, non-contiguous blocks."""
    g = torch.Generator().manual_seed(seed)
    batch = len(seq_lens)
    per_seq = [max(1, -(-n // block_size)) for n in seq_lens]
    num_blocks = sum(per_seq) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    width = max(per_seq) + 1  # one extra column of padding
    bt = torch.zeros(batch, width, dtype=torch.int32)
    i = 0
    for b, n in enumerate(per_seq):
        bt[b, :n] = perm[i:i + n]
        i += n
    k = torch.randn(num_blocks, block_size, n_kv, head_dim, generator=g)
    v = torch.randn(num_blocks, block_size, n_kv, head_dim, generator=g)
    q = torch.randn(batch, n_heads, head_dim, generator=g)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    cast = dict(dtype=dtype, device=device)
    return q.to(**cast), k.to(**cast), v.to(**cast), bt.to(device), lens.to(device)


def _sdpa_gathered(q, k_cache, v_cache, bt, lens, scale=None):
    """Plain SDPA on each sequence's K/V gathered into a contiguous tensor (float64)."""
    page = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    outs = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        pos = torch.arange(n)
        blocks = bt[b].long()[pos // page]
        k = k_cache[blocks, pos % page].double().repeat_interleave(group, 1).transpose(0, 1)
        v = v_cache[blocks, pos % page].double().repeat_interleave(group, 1).transpose(0, 1)
        qb = q[b].double()[:, None, :]  # (h, 1, d)
        outs.append(F.scaled_dot_product_attention(qb, k, v, scale=scale)[:, 0])
    return torch.stack(outs)


# one batch exercising length 1, a length inside the first block, exact block multiples and
# lengths just past a block boundary
LENS = [1, 16, 17, 70, 33]


@needs_triton
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_fp32_matches_reference_and_sdpa(n_heads, n_kv, head_dim):
    q, kc, vc, bt, lens = _make(LENS, n_heads, n_kv, head_dim, seed=head_dim + n_kv)
    ref, ref_lse = paged_decode_attention_reference(q.double(), kc.double(), vc.double(), bt,
                                                    lens, return_lse=True)
    sdpa = _sdpa_gathered(q, kc, vc, bt, lens)
    assert torch.allclose(ref, sdpa, atol=1e-12)
    for ns in (1, 3):
        out, lse = paged_decode_attention(q, kc, vc, bt, lens, num_splits=ns, return_lse=True)
        assert out.dtype == torch.float32 and out.shape == q.shape
        assert lse.dtype == torch.float32 and lse.shape == (len(LENS), n_heads)
        assert (out.double() - ref).abs().max() <= 1e-5, ns
        assert (lse.double() - ref_lse.double()).abs().max() <= 1e-5, ns


@needs_triton
def test_many_splits_multi_tile_and_block_size(monkeypatch):
    """Splits with several tiles each, more splits than tiles (empty splits), odd block size."""
    monkeypatch.setattr(da, "INTERPRET_BLOCK_N", 16)
    lens = [150, 3, 64, 97]
    q, kc, vc, bt, lens_t = _make(lens, 8, 2, 64, block_size=8, seed=3)
    ref, ref_lse = paged_decode_attention_reference(q.double(), kc.double(), vc.double(), bt,
                                                    lens_t, return_lse=True)
    for ns in (2, 7):
        out, lse = paged_decode_attention(q, kc, vc, bt, lens_t, num_splits=ns, return_lse=True)
        assert (out.double() - ref).abs().max() <= 1e-5, ns
        assert (lse.double() - ref_lse.double()).abs().max() <= 1e-5, ns


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, tol):
    q, kc, vc, bt, lens = _make([5, 40, 19], 8, 2, 64, dtype=dtype, seed=7)
    ref = paged_decode_attention_reference(q.float(), kc.float(), vc.float(), bt, lens)
    out, lse = paged_decode_attention(q, kc, vc, bt, lens, num_splits=2, return_lse=True)
    assert out.dtype == dtype
    assert (out.float() - ref).abs().max() <= tol
    _, ref_lse = paged_decode_attention_reference(q.float(), kc.float(), vc.float(), bt, lens,
                                                  return_lse=True)
    assert (lse - ref_lse).abs().max() <= 1e-3


@needs_triton
def test_softmax_scale_default_splits_and_lse_merge():
    """Custom scale; default num_splits; lse merges two halves of a sequence exactly."""
    q, kc, vc, bt, lens = _make([48, 48], 4, 2, 64, seed=11)
    scale = 0.3
    out = paged_decode_attention(q, kc, vc, bt, lens, softmax_scale=scale)
    ref = _sdpa_gathered(q, kc, vc, bt, lens, scale=scale)
    assert (out.double() - ref).abs().max() <= 1e-5
    # first 32 tokens = the first 2 blocks; last 16 tokens = block table shifted by 2
    o1, l1 = paged_decode_attention(q, kc, vc, bt, torch.full_like(lens, 32), scale,
                                    return_lse=True)
    o2, l2 = paged_decode_attention(q, kc, vc, bt[:, 2:].contiguous(), torch.full_like(lens, 16),
                                    scale, return_lse=True)
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m)[..., None], torch.exp(l2 - m)[..., None]
    merged = (w1 * o1 + w2 * o2) / (w1 + w2)
    assert (merged.double() - ref).abs().max() <= 1e-5


@needs_triton
def test_empty_sequence_and_strided_cache():
    """seq_len 0 gives out 0 / lse -inf; the cache may be a strided view (per-layer slice)."""
    q, kc, vc, bt, lens = _make([0, 20], 4, 2, 64, seed=5)
    big = torch.stack([torch.stack([kc, vc])] * 2)  # (layers, 2, blocks, page, kv, d)
    k_view, v_view = big[1, 0], big[1, 1]
    out, lse = paged_decode_attention(q, k_view, v_view, bt, lens, num_splits=2,
                                      return_lse=True)
    assert torch.all(out[0] == 0) and torch.all(torch.isneginf(lse[0]))
    ref = paged_decode_attention_reference(q.double(), kc.double(), vc.double(), bt, lens)
    assert (out[1].double() - ref[1]).abs().max() <= 1e-5


def test_torch_fallback_matches_reference():
    q, kc, vc, bt, lens = _make(LENS, 8, 2, 32, seed=1)
    ref, ref_lse = paged_decode_attention_reference(q.double(), kc.double(), vc.double(), bt,
                                                    lens, return_lse=True)
    out, lse = paged_decode_attention(q, kc, vc, bt, lens, return_lse=True, impl="torch")
    assert (out.double() - ref).abs().max() <= 1e-5
    assert (lse.double() - ref_lse.double()).abs().max() <= 1e-5
    # float64 always takes the torch path, and an empty sequence gives 0 / -inf there too
    lens0 = lens.clone()
    lens0[0] = 0
    out64, lse64 = paged_decode_attention(q.double(), kc.double(), vc.double(), bt, lens0,
                                          return_lse=True)
    ref64 = paged_decode_attention_reference(q.double(), kc.double(), vc.double(), bt, lens0)
    assert out64.dtype == torch.float64
    assert torch.allclose(out64, ref64, atol=1e-12)
    assert torch.all(out64[0] == 0) and torch.isneginf(lse64[0]).all()
    assert torch.equal(paged_decode_attention_torch(q, kc, vc, bt, lens),
                       paged_decode_attention(q, kc, vc, bt, lens, impl="torch"))


@needs_triton
@pytest.mark.parametrize("window_left", [0, 5, 20, 200])
def test_sliding_window(monkeypatch, window_left):
    """A sliding window (the query sees its last window_left + 1 tokens): the Triton kernel
    (splits over the window only, some empty) and both torch paths against the reference,
    which is checked against SDPA on the window's K/V gathered by hand."""
    monkeypatch.setattr(da, "INTERPRET_BLOCK_N", 16)
    lens = [150, 3, 64, 97, 1]
    q, kc, vc, bt, lens_t = _make(lens, 8, 2, 32, block_size=8, seed=window_left)
    ref, ref_lse = paged_decode_attention_reference(q.double(), kc.double(), vc.double(), bt, lens_t,
                                                    return_lse=True, window_left=window_left)
    for b, n in enumerate(lens):  # the reference: SDPA over the window's K/V gathered by hand
        lo = max(n - 1 - window_left, 0)
        pos = torch.arange(lo, n)
        blocks = bt[b].long()[pos // 8]
        k = kc[blocks, pos % 8].double().repeat_interleave(4, 1).transpose(0, 1)
        v = vc[blocks, pos % 8].double().repeat_interleave(4, 1).transpose(0, 1)
        want = F.scaled_dot_product_attention(q[b].double()[:, None, :], k, v)[:, 0]
        assert torch.allclose(ref[b], want, atol=1e-12)
    full = paged_decode_attention_reference(q.double(), kc.double(), vc.double(), bt, lens_t)
    if window_left < 149:  # the window changes the longest sequence's result
        assert (full[0] - ref[0]).abs().max() > 1e-3
    for ns in (1, 3, 7):
        out, lse = paged_decode_attention(q, kc, vc, bt, lens_t, num_splits=ns, return_lse=True,
                                          window_left=window_left)
        assert (out.double() - ref).abs().max() <= 1e-5, ns
        assert (lse.double() - ref_lse.double()).abs().max() <= 1e-5, ns
    for lse_too in (False, True):  # the torch paths: explicit scores, and masked SDPA
        got = paged_decode_attention(q, kc, vc, bt, lens_t, impl="torch", return_lse=lse_too,
                                     window_left=window_left)
        got = got[0] if lse_too else got
        assert (got.double() - ref).abs().max() <= 1e-5, lse_too


@pytest.mark.parametrize("lens", [[7, 40, 19, 1], [33, 33, 33], [0, 12, 5]])
def test_torch_fallback_sdpa_path_matches_reference(lens):
    """fp32 without LSE takes the fused SDPA path (query heads of a group as its rows): padded
    lengths (masked), equal lengths (no mask) and an empty sequence (0, not NaN)."""
    q, kc, vc, bt, seq_lens = _make(lens, 8, 2, 32, seed=3)
    ref = paged_decode_attention_reference(q.double(), kc.double(), vc.double(), bt, seq_lens)
    out = paged_decode_attention(q, kc, vc, bt, seq_lens, impl="torch")
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert (out.double() - ref).abs().max() <= 1e-5
    assert not torch.isnan(out).any()


def test_input_validation():
    q, kc, vc, bt, lens = _make([4], 6, 4, 32)
    with pytest.raises(ValueError, match="multiple"):
        paged_decode_attention(q, kc, vc, bt, lens, impl="torch")
    q, kc, vc, bt, lens = _make([4], 8, 4, 32)
    with pytest.raises(ValueError, match="seq_lens"):
        paged_decode_attention(q, kc, vc, bt, lens[:0], impl="torch")
    with pytest.raises(TypeError):
        paged_decode_attention(q, kc.half(), vc, bt, lens)
    with pytest.raises(ValueError, match="impl"):
        paged_decode_attention(q, kc, vc, bt, lens, impl="cuda")


def test_default_num_splits():
    assert default_num_splits(1, 8, 131072, "cpu") >= 2
    assert default_num_splits(256, 8, 131072, "cpu") == 1
    assert default_num_splits(1, 1, 100, "cpu") == 1  # short contexts are not split
    assert 1 <= default_num_splits(1, 1, 10**7, "cpu") <= da.MAX_SPLITS
    assert math.isfinite(da.LOG2E)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_long_context_and_graph_capture(dtype, tol):
    """Compiled kernel on the GPU: long contexts, many splits, CUDA-graph capturable."""
    q, kc, vc, bt, lens = _make([5000, 1, 257, 3000], 32, 4, 128, dtype=dtype, seed=2,
                                device="cuda")
    hi = torch.float64 if dtype == torch.float32 else torch.float32
    ref, ref_lse = paged_decode_attention_reference(q.to(hi), kc.to(hi), vc.to(hi), bt, lens,
                                                    return_lse=True)
    ref = ref.float()
    for ns in (None, 1, 16):
        out, lse = paged_decode_attention(q, kc, vc, bt, lens, num_splits=ns, return_lse=True)
        assert (out.float() - ref).abs().max() <= tol, ns
        assert (lse - ref_lse).abs().max() <= 1e-3, ns
    static_out = paged_decode_attention(q, kc, vc, bt, lens, num_splits=8)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = paged_decode_attention(q, kc, vc, bt, lens, num_splits=8)
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    ref2 = paged_decode_attention_reference(q.float(), kc.float(), vc.float(), bt, lens)
    assert (static_out.float() - ref2).abs().max() <= tol


@needs_triton
@pytest.mark.parametrize("window_left", [-1, 10])
def test_score_softcap(window_left):
    """Gemma 2's soft-capped scores (cap * tanh(s / cap)): both implementations, with and
    without lse, equal the explicit formula on each sequence's gathered K/V (float64)."""
    q, k, v, bt, lens = _make(LENS, 8, 2, 32, seed=3)
    q = q * 4  # many scores past the cap
    scale, cap = 32 ** -0.5, 5.0
    page, group = k.shape[1], 4
    want_o, want_l = [], []
    for b, n in enumerate(LENS):
        pos = torch.arange(max(0, n - 1 - window_left) if window_left >= 0 else 0, n)
        blocks = bt[b].long()[pos // page]
        kb = k[blocks, pos % page].double().repeat_interleave(group, 1)  # (n, h, d)
        vb = v[blocks, pos % page].double().repeat_interleave(group, 1)
        s = cap * torch.tanh(torch.einsum("hd,nhd->hn", q[b].double(), kb) * scale / cap)
        want_o.append(torch.einsum("hn,nhd->hd", torch.softmax(s, -1), vb))
        want_l.append(torch.logsumexp(s, -1))
    want_o, want_l = torch.stack(want_o), torch.stack(want_l)
    for impl in ("triton", "torch"):
        out, lse = paged_decode_attention(q, k, v, bt, lens, return_lse=True, impl=impl, window_left=window_left,
                                          softcap=cap)
        plain = paged_decode_attention(q, k, v, bt, lens, impl=impl, window_left=window_left, softcap=cap)
        assert (out.double() - want_o).abs().max() <= 1e-5 and (lse.double() - want_l).abs().max() <= 1e-5, impl
        assert (plain.double() - want_o).abs().max() <= 1e-5, impl
    ref = paged_decode_attention_reference(q, k, v, bt, lens, window_left=window_left, softcap=cap)
    assert (ref.double() - want_o).abs().max() <= 1e-5
    uncapped = paged_decode_attention_reference(q, k, v, bt, lens, window_left=window_left)
    assert (uncapped.double() - want_o).abs().max() > 0.1
