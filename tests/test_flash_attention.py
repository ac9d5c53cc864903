"""Triton flash attention against a float64 PyTorch reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py), so sizes stay small:
batch 1-2, at most 8 heads, lengths up to 300. The interpreter uses 64x32 / 32x64 blocks, so
lengths 127 and 300 cover several blocks, ragged edges and the causal band.

Tolerances (max abs error; inputs are randn, scores O(1), so outputs and grads are O(1)):
  fp32: 1e-5 for out, lse, dq, dk, dv.
  fp16 / bf16: our error against the float64 reference must be at most 2x that of the same
  computation done by PyTorch in fp16 / bf16 (flash-attn's criterion), plus 2e-3 (fp16) /
  2e-2 (bf16) of slack for the different rounding points; lse (fp32 output) within 1e-2.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_k15.kernels.flash_attention import (
    INTERPRET,
    attention_reference,
    flash_attn_func,
    flash_attn_varlen_func,
    varlen_attention_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_TOL = 1e-5

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=DEVICE, dtype=dtype)


def _make(b, sq, sk, h, hkv, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = _randn(b, sq, h, d, dtype=dtype, gen=g).requires_grad_()
    k = _randn(b, sk, hkv, d, dtype=dtype, gen=g).requires_grad_()
    v = _randn(b, sk, hkv, d, dtype=dtype, gen=g).requires_grad_()
    do = _randn(b, sq, h, d, dtype=dtype, gen=g)
    dlse = _randn(b, h, sq, gen=g)
    return q, k, v, do, dlse


def _max_err(got, ref):
    """Max abs error; infinities (lse of rows without keys) must sit at the same places."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    inf_g, inf_r = torch.isinf(got), torch.isinf(ref)
    assert torch.equal(inf_g, inf_r), "infinities differ"
    assert torch.equal(got[inf_g], ref[inf_r]), "signs of infinities differ"
    assert not torch.isnan(got).any(), "NaN in result"
    fin = ~inf_r
    return (got[fin] - ref[fin]).abs().max().item() if fin.any() else 0.0


def _fwd_bwd(fn, q, k, v, do, dlse, **kw):
    """Run fn(q, k, v, return_lse=True), backprop (do, dlse); return out, lse, dq, dk, dv."""
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(qq, kk, vv, return_lse=True, **kw)
    # a gradient on lse is meaningless where lse = -inf (no keys); give it 0 there
    dlse = torch.where(torch.isfinite(lse.detach()), dlse.to(lse.dtype), torch.zeros_like(dlse,
                       dtype=lse.dtype))
    torch.autograd.backward([out, lse], [do.to(out.dtype), dlse])
    return out, lse, qq.grad, kk.grad, vv.grad


def _reference(q, k, v, do, dlse, dtype=torch.float64, **kw):
    def fn(q, k, v, return_lse, **kw):
        return attention_reference(q, k, v, return_lse=return_lse, upcast=dtype, **kw)

    return _fwd_bwd(fn, q, k, v, do, dlse, **kw)


NAMES = ("out", "lse", "dq", "dk", "dv")


def _check_fp32(ours, ref, tol=FP32_TOL):
    errs = {n: _max_err(a, b) for n, a, b in zip(NAMES, ours, ref)}
    bad = {n: e for n, e in errs.items() if not e <= tol}
    assert not bad, f"errors above {tol}: {bad} (all: {errs})"


# (batch, seqlen_q, seqlen_k, n_heads, n_kv_heads, head_dim, causal): lengths 1, 17, 127, 300,
# GQA ratios 1, 2, 4, 8, causal and not, head_dims 16..256, chosen to cover each value without
# the full cross product.
CASES = [
    (2, 1, 1, 2, 2, 16, True),
    (1, 1, 1, 4, 1, 64, False),
    (2, 17, 17, 4, 1, 64, True),
    (1, 17, 17, 8, 1, 16, False),
    (1, 127, 127, 2, 2, 128, True),
    (1, 127, 127, 4, 1, 16, False),
    (1, 300, 300, 2, 1, 64, True),
    (1, 300, 300, 8, 1, 16, True),
    (1, 300, 300, 2, 2, 32, False),
    (1, 70, 70, 1, 1, 256, True),
    # seqlen_q != seqlen_k: causal is bottom-right aligned
    (1, 17, 300, 4, 1, 64, True),
    (1, 300, 17, 2, 1, 16, True),  # the first 283 query rows see no key: out 0, lse -inf
    (2, 127, 300, 2, 2, 16, False),
    (1, 1, 127, 4, 1, 64, True),
]


@pytest.mark.parametrize("b,sq,sk,h,hkv,d,causal", CASES)
def test_matches_float64_reference(b, sq, sk, h, hkv, d, causal):
    q, k, v, do, dlse = _make(b, sq, sk, h, hkv, d, seed=sq * 7 + sk + h + d)
    ours = _fwd_bwd(flash_attn_func, q, k, v, do, dlse, causal=causal)
    ref = _reference(q, k, v, do, dlse, causal=causal)
    assert ours[0].dtype == q.dtype and ours[0].shape == q.shape
    assert ours[1].dtype == torch.float32 and ours[1].shape == (b, h, sq)
    _check_fp32(ours, ref)


def _check_packed_causal(q, k, v, do, dlse, bounds):
    """Batch row 0 of ``_make``'s tensors packed into sequences at ``bounds`` (cu_seqlens):
    ours against the float64 reference, causal, forward and backward."""
    cu = torch.tensor(bounds, dtype=torch.int32, device=DEVICE)
    longest = max(b - a for a, b in zip(bounds[:-1], bounds[1:]))
    flat = [t[0] for t in (q, k, v, do)]

    def ours(q, k, v, return_lse):
        return flash_attn_varlen_func(q, k, v, cu, longest, causal=True, return_lse=return_lse)

    def ref(q, k, v, return_lse):
        return varlen_attention_reference(q, k, v, cu, causal=True, return_lse=return_lse,
                                          upcast=torch.float64)

    _check_fp32(_fwd_bwd(ours, *flat, dlse[0]), _fwd_bwd(ref, *flat, dlse[0]))


@pytest.mark.parametrize("varlen", [False, True])
def test_int64_offset_path(monkeypatch, varlen):
    """Tensors past 2**31 elements switch the kernels to 64-bit offsets (LARGE); forcing the
    switch at a tiny threshold runs that code path here and it must give the same results."""
    import megatron_k15.kernels.flash_attention as fa

    monkeypatch.setattr(fa, "_INT32_MAX", 100)
    assert fa._needs_int64(300, torch.empty(1, 300, 2, 16), varlen=False)
    q, k, v, do, dlse = _make(1, 150, 150, 4, 2, 32, seed=11)
    if not varlen:
        _check_fp32(_fwd_bwd(flash_attn_func, q, k, v, do, dlse, causal=True),
                    _reference(q, k, v, do, dlse, causal=True))
        return
    _check_packed_causal(q, k, v, do, dlse, [0, 70, 71, 150])


@pytest.mark.parametrize("varlen", [False, True])
def test_launches_split_over_sequences_past_the_grid_limit(monkeypatch, varlen):
    """CUDA's grid dimension 1 holds at most 65535 (sequence, head) pairs; past that the
    launches are split over the sequences. A limit of 5 here (2 heads: two sequences per
    launch, the dK/dV kernel's one kv head: five) must give the reference's results."""
    import megatron_k15.kernels.flash_attention as fa

    monkeypatch.setattr(fa, "MAX_GRID_Y", 5)
    assert fa._batch_chunks(5, 2) == [(0, 2), (2, 4), (4, 5)]
    plans, chunks = [], fa._batch_chunks
    monkeypatch.setattr(fa, "_batch_chunks", lambda *a: plans.append(chunks(*a)) or plans[-1])
    if not varlen:
        q, k, v, do, dlse = _make(5, 20, 20, 2, 1, 16, seed=12)
        _check_fp32(_fwd_bwd(flash_attn_func, q, k, v, do, dlse, causal=True),
                    _reference(q, k, v, do, dlse, causal=True))
    else:
        q, k, v, do, dlse = _make(1, 60, 60, 2, 1, 16, seed=13)
        _check_packed_causal(q, k, v, do, dlse, [0, 9, 10, 31, 31, 60])
    assert plans == [[(0, 2), (2, 4), (4, 5)]] * 2  # forward and backward each launched in 3 parts


def test_bottom_right_causal_semantics():
    """Query i sees keys j <= i + seqlen_k - seqlen_q; rows that see none give 0 and -inf."""
    q, k, v, _, _ = _make(1, 5, 3, 1, 1, 16, seed=3)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert torch.all(out[0, :2] == 0) and torch.all(torch.isneginf(lse[0, 0, :2]))
    # the last query row sees every key: same as non-causal for that row
    full = flash_attn_func(q, k, v, causal=False)
    assert (out[0, -1] - full[0, -1]).abs().max().item() < FP32_TOL
    # query 2 sees only key 0, so its output is v[0]
    assert (out[0, 2] - v[0, 0]).abs().max().item() < FP32_TOL


def test_softmax_scale_and_noncontiguous_inputs():
    """q, k, v as strided views of one packed qkv tensor; a custom softmax_scale."""
    g = torch.Generator().manual_seed(11)
    b, s, h, d = 2, 45, 4, 32
    qkv = _randn(b, s, 3, h, d, gen=g).requires_grad_()
    q, k, v = qkv[:, :, 0], qkv[:, :, 1, :2], qkv[:, :, 2, 2:]  # GQA 2 on strided views
    assert not q.is_contiguous()
    do = _randn(b, s, h, d, gen=g)
    out = flash_attn_func(q, k, v, causal=True, softmax_scale=0.3)
    (gq,) = torch.autograd.grad(out, qkv, do)
    q64 = qkv.detach().double().requires_grad_()
    ref = attention_reference(q64[:, :, 0], q64[:, :, 1, :2], q64[:, :, 2, 2:], causal=True,
                              softmax_scale=0.3)
    (gr,) = torch.autograd.grad(ref, q64, do.double())
    assert _max_err(out, ref) < FP32_TOL
    assert _max_err(gq, gr) < FP32_TOL


def test_gradient_paths_without_lse_grad_and_lse_only():
    q, k, v, do, dlse = _make(1, 40, 40, 4, 2, 16, seed=5)
    # return_lse=False: only out is differentiated (dlse is None inside)
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = flash_attn_func(qq, kk, vv, causal=True)
    assert isinstance(out, torch.Tensor)
    out.backward(do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    attention_reference(q64, k64, v64, causal=True).backward(do.double())
    for a, r in ((qq.grad, q64.grad), (kk.grad, k64.grad), (vv.grad, v64.grad)):
        assert _max_err(a, r) < FP32_TOL
    # only lse is differentiated (dout is None inside): d lse / d s = softmax
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    _, lse = flash_attn_func(qq, kk, vv, causal=False, return_lse=True)
    lse.backward(dlse)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    _, lse_r = attention_reference(q64, k64, v64, causal=False, return_lse=True)
    lse_r.backward(dlse.double())
    for a, r in ((qq.grad, q64.grad), (kk.grad, k64.grad)):
        assert _max_err(a, r) < FP32_TOL
    assert vv.grad is None or vv.grad.abs().max().item() == 0.0


# ---------------------------------------------------------------------------------------------
# sliding window (Mistral v0.1, Qwen2 with use_sliding_window, OLMo 3, Gemma's local layers)
# ---------------------------------------------------------------------------------------------

# (b, seqlen_q, seqlen_k, n_heads, n_kv_heads, head_dim, left): windows inside one block, over
# several blocks (the unmasked middle loop runs), of the whole sequence and beyond it (== plain
# causal), and seqlen_q != seqlen_k (a chunk over a cached prefix; rows seeing no key)
WINDOW_CASES = [
    (1, 17, 17, 4, 2, 16, 0),  # each row sees only itself
    (1, 127, 127, 4, 1, 64, 5),
    (1, 300, 300, 2, 1, 16, 100),
    (2, 300, 300, 4, 2, 32, 64),
    (1, 300, 300, 2, 2, 16, 299),
    (1, 50, 130, 4, 1, 16, 20),
    (1, 130, 50, 2, 1, 16, 7),
]


@pytest.mark.parametrize("b,sq,sk,h,hkv,d,left", WINDOW_CASES)
def test_sliding_window_matches_float64_reference(b, sq, sk, h, hkv, d, left):
    q, k, v, do, dlse = _make(b, sq, sk, h, hkv, d, seed=sq + sk + left)
    ours = _fwd_bwd(flash_attn_func, q, k, v, do, dlse, causal=True, window_size=(left, 0))
    ref = _reference(q, k, v, do, dlse, causal=True, window_size=(left, 0))
    _check_fp32(ours, ref)
    if left + 1 < sk:  # the window changes the result (the test would catch it being ignored)
        plain = _reference(q, k, v, do, dlse, causal=True)
        assert _max_err(plain[0], ref[0]) > 1e-2


def test_sliding_window_reference_by_hand():
    """The reference's window, checked on its definition: with left = 2, row i averages the
    values of keys i-2..i when all scores are equal."""
    v = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1).expand(1, 6, 1, 16)
    q = torch.zeros(1, 6, 1, 16, dtype=torch.float64)
    out = attention_reference(q, q.clone(), v.contiguous(), causal=True, window_size=(2, 0))
    want = torch.tensor([0.0, 0.5, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert torch.allclose(out[0, :, 0, 0], want, atol=1e-12, rtol=0)


def test_sliding_window_varlen():
    lengths = [1, 17, 130, 64, 3]
    g = torch.Generator().manual_seed(5)
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)
    q, do = _randn(total, 4, 32, gen=g), _randn(total, 4, 32, gen=g)
    k, v = _randn(total, 2, 32, gen=g), _randn(total, 2, 32, gen=g)
    dlse = _randn(4, total, gen=g)

    def ours(q, k, v, return_lse):
        return flash_attn_varlen_func(q, k, v, cu, max(lengths), return_lse=return_lse,
                                      window_size=(9, 0))

    def ref(q, k, v, return_lse):
        return varlen_attention_reference(q, k, v, cu, return_lse=return_lse, upcast=torch.float64,
                                          window_size=(9, 0))

    _check_fp32(_fwd_bwd(ours, q, k, v, do, dlse), _fwd_bwd(ref, q, k, v, do, dlse))


@pytest.mark.parametrize("window_size,exc,match", [
    ((4, 0), NotImplementedError, "causal=True"),  # called with causal=False below
    ((4, 2), ValueError, "-1 or 0"),
    ((-2, 0), ValueError, ">= -1"),
    (4, ValueError, "pair"),
])
def test_sliding_window_validation(window_size, exc, match):
    causal = match != "causal=True"
    with pytest.raises(exc, match=match):
        flash_attn_func(*_qkv(), causal=causal, window_size=window_size)


# ---------------------------------------------------------------------------------------------
# varlen
# ---------------------------------------------------------------------------------------------

VARLEN_CASES = [
    # (lengths, n_heads, n_kv_heads, head_dim, causal)
    ([1, 17, 127, 1, 70], 4, 1, 64, True),
    ([300, 1, 17], 2, 2, 16, False),
    ([5, 0, 40, 1], 8, 1, 32, True),  # an empty sequence, GQA 8
]


@pytest.mark.parametrize("lengths,h,hkv,d,causal", VARLEN_CASES)
def test_varlen_matches_float64_reference(lengths, h, hkv, d, causal):
    g = torch.Generator().manual_seed(sum(lengths) + h)
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)
    q = _randn(total, h, d, gen=g)
    k = _randn(total, hkv, d, gen=g)
    v = _randn(total, hkv, d, gen=g)
    do = _randn(total, h, d, gen=g)
    dlse = _randn(h, total, gen=g)

    def ours(q, k, v, return_lse):
        return flash_attn_varlen_func(q, k, v, cu, max(lengths), causal=causal,
                                      return_lse=return_lse)

    def ref(q, k, v, return_lse):
        return varlen_attention_reference(q, k, v, cu, causal=causal, return_lse=return_lse,
                                          upcast=torch.float64)

    got = _fwd_bwd(ours, q, k, v, do, dlse)
    want = _fwd_bwd(ref, q, k, v, do, dlse)
    assert got[1].shape == (h, total)
    _check_fp32(got, want)


def test_varlen_equals_batched_per_sequence():
    """Packing must not leak attention across sequence boundaries."""
    g = torch.Generator().manual_seed(2)
    lengths = [33, 1, 64]
    cu = torch.tensor([0, 33, 34, 98], dtype=torch.int32, device=DEVICE)
    q, k, v = (_randn(98, 2, 16, gen=g) for _ in range(3))
    out = flash_attn_varlen_func(q, k, v, cu, max(lengths), causal=True)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        one = flash_attn_func(q[None, s:e], k[None, s:e], v[None, s:e], causal=True)[0]
        assert (out[s:e] - one).abs().max().item() < FP32_TOL


# ---------------------------------------------------------------------------------------------
# low precision
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,slack,b,s,h,hkv,d,causal,softcap",
    [
        (torch.float16, 2e-3, 1, 127, 4, 2, 64, True, 0.0),
        (torch.bfloat16, 2e-2, 1, 127, 4, 2, 64, True, 0.0),
        (torch.bfloat16, 2e-2, 2, 33, 2, 1, 128, False, 0.0),
        (torch.bfloat16, 2e-2, 1, 127, 4, 2, 64, True, 1.0),  # Gemma 2's cap, binding on O(1) scores
        (torch.float16, 2e-3, 2, 33, 2, 1, 128, False, 1.0),
    ],
)
def test_low_precision(dtype, slack, b, s, h, hkv, d, causal, softcap):
    q, k, v, do, dlse = _make(b, s, s, h, hkv, d, dtype=dtype, seed=7)
    kw = dict(causal=causal, softcap=softcap)
    ours = _fwd_bwd(flash_attn_func, q, k, v, do, dlse, **kw)
    ref = _reference(q, k, v, do, dlse, **kw)  # float64
    low = _reference(q, k, v, do, dlse, dtype=dtype, **kw)  # PyTorch in fp16/bf16
    assert ours[0].dtype == dtype and ours[2].dtype == dtype
    for name, o, r, lo in zip(NAMES, ours, ref, low):
        err = _max_err(o, r)
        if name == "lse":
            assert err < 1e-2, f"lse error {err}"
            continue
        bound = 2 * _max_err(lo, r) + slack
        assert err <= bound, f"{name}: error {err} > {bound}"


# ---------------------------------------------------------------------------------------------
# the reference itself, and input validation
# ---------------------------------------------------------------------------------------------


def test_reference_matches_torch_sdpa():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 19, 4, 16, generator=g, dtype=torch.float64)
    k = torch.randn(2, 19, 2, 16, generator=g, dtype=torch.float64)
    v = torch.randn(2, 19, 2, 16, generator=g, dtype=torch.float64)
    for causal in (True, False):
        ref = attention_reference(q, k, v, causal=causal)
        sdpa = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.repeat_interleave(2, 2).transpose(1, 2),
            v.repeat_interleave(2, 2).transpose(1, 2), is_causal=causal).transpose(1, 2)
        assert (ref - sdpa).abs().max().item() < 1e-12


def _qkv(sq=8, sk=8, h=2, hkv=2, d=16, dtype=torch.float32):
    return (torch.zeros(1, sq, h, d, dtype=dtype, device=DEVICE),
            torch.zeros(1, sk, hkv, d, dtype=dtype, device=DEVICE),
            torch.zeros(1, sk, hkv, d, dtype=dtype, device=DEVICE))


@pytest.mark.parametrize(
    "make_call,exc,match",
    [
        (lambda: flash_attn_func(*_qkv(d=24)), ValueError, "power of two"),
        (lambda: flash_attn_func(*_qkv(d=8)), ValueError, "power of two"),
        (lambda: flash_attn_func(*_qkv(d=512)), ValueError, "power of two"),
        (lambda: flash_attn_func(*_qkv(h=3, hkv=2)), ValueError, "multiple of n_kv_heads"),
        (lambda: flash_attn_func(*_qkv(dtype=torch.float64)), TypeError, "dtype"),
        (lambda: flash_attn_func(_qkv()[0].half(), *_qkv()[1:]), TypeError, "share a dtype"),
        (lambda: flash_attn_func(_qkv()[0][0], *_qkv()[1:]), ValueError, "4-D"),
        (lambda: flash_attn_func(_qkv()[0], _qkv()[1], _qkv(sk=9)[2]), ValueError, "same shape"),
        (lambda: flash_attn_func(_qkv()[0], *[t.repeat(2, 1, 1, 1) for t in _qkv()[1:]]),
         ValueError, "batch"),
        (lambda: flash_attn_varlen_func(*[t[0] for t in _qkv()],
                                        torch.tensor([0, 8], dtype=torch.int64, device=DEVICE), 8),
         TypeError, "int32"),
        (lambda: flash_attn_varlen_func(*[t[0] for t in _qkv()], torch.tensor(
            [[0, 8]], dtype=torch.int32, device=DEVICE), 8),
         ValueError, "1-D"),
        (lambda: flash_attn_varlen_func(*_qkv(), torch.tensor([0, 8], dtype=torch.int32,
                                                               device=DEVICE), 8),
         ValueError, "3-D"),
    ],
)
def test_input_validation(make_call, exc, match):
    with pytest.raises(exc, match=match):
        make_call()


@pytest.mark.skipif(DEVICE != "cpu", reason="checks on cu_seqlens contents are CPU-only")
def test_varlen_cu_seqlens_content_checks():
    q, k, v = (t[0] for t in _qkv())
    with pytest.raises(ValueError, match="end at total_tokens"):
        flash_attn_varlen_func(q, k, v, torch.tensor([0, 5], dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="max_seqlen"):
        flash_attn_varlen_func(q, k, v, torch.tensor([0, 8], dtype=torch.int32), 4)


def test_interpreter_is_used_on_cpu():
    if not torch.cuda.is_available():
        assert INTERPRET, "CPU tests must run the kernels under TRITON_INTERPRET=1"


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_autotuning_tables(kernel):
    """Every (kind of dot, head_dim) has candidates; none is dead (dropped by the shared-memory
    guard, which would mean the table and the guard disagree); the prune hands the autotuner
    exactly the table's configs, preferred first, whatever order the union is in."""
    import triton

    import megatron_k15.kernels.flash_attention as fa

    union = fa._all_candidates(kernel)
    prune = fa._make_prune(kernel)
    for prec in ("tf32", "ieee"):
        for d in (16, 32, 64, 128, 256):
            table = fa._HOPPER[kernel][("ieee" if prec == "ieee" else "tc", fa._head_dim_class(d))]
            assert table and fa._candidates(kernel, prec, d) == table, (kernel, prec, d)
            for configs in (union, union[::-1]):
                got = prune(configs, {}, HEAD_DIM=d, DOT_PREC=prec)
                assert all(isinstance(c, triton.Config) for c in got)
                assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                        for c in got] == table
    # the guard does drop a tile that cannot fit: 4 stages of 2 x 128 x d256 bf16 rows
    fa._HOPPER[kernel][("tc", 256)].insert(0, (128, 128, 8, 4))
    try:
        assert (128, 128, 8, 4) not in fa._candidates(kernel, "tf32", 256)
    finally:
        fa._HOPPER[kernel][("tc", 256)].pop(0)


# ---------------------------------------------------------------------------------------------
# GPU only: real sizes, real bf16 dots, autotuned configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s,h,hkv,d", [(2048, 8, 2, 128), (1000, 4, 4, 64), (513, 8, 1, 256)])
def test_gpu_low_precision_large(dtype, causal, s, h, hkv, d):
    q, k, v, do, dlse = _make(2, s, s, h, hkv, d, dtype=dtype, seed=s)
    ours = _fwd_bwd(flash_attn_func, q, k, v, do, dlse, causal=causal)
    ref = _reference(q, k, v, do, dlse, dtype=torch.float32, causal=causal)
    low = _reference(q, k, v, do, dlse, dtype=dtype, causal=causal)
    for name, o, r, lo in zip(NAMES, ours, ref, low):
        err = _max_err(o, r)
        bound = 1e-2 if name == "lse" else 2 * _max_err(lo, r) + 1e-2
        assert err <= bound, f"{name}: error {err} > {bound}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s,left,d", [(4096, 1023, 128), (3000, 127, 64), (1000, 4095, 128)])
def test_gpu_sliding_window_low_precision(dtype, s, left, d):
    q, k, v, do, dlse = _make(1, s, s, 8, 2, d, dtype=dtype, seed=left)
    kw = dict(causal=True, window_size=(left, 0))
    ours = _fwd_bwd(flash_attn_func, q, k, v, do, dlse, **kw)
    ref = _reference(q, k, v, do, dlse, dtype=torch.float32, **kw)
    low = _reference(q, k, v, do, dlse, dtype=dtype, **kw)
    for name, o, r, lo in zip(NAMES, ours, ref, low):
        err = _max_err(o, r)
        bound = 1e-2 if name == "lse" else 2 * _max_err(lo, r) + 1e-2
        assert err <= bound, f"{name}: error {err} > {bound}"


@pytest.mark.gpu
@gpu
def test_gpu_fp32_exact_and_varlen():
    q, k, v, do, dlse = _make(1, 1031, 1031, 4, 1, 128, seed=1)
    _check_fp32(_fwd_bwd(flash_attn_func, q, k, v, do, dlse, causal=True),
                _reference(q, k, v, do, dlse, causal=True), tol=2e-5)
    lengths = [1, 700, 64, 3000]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=DEVICE)
    t = sum(lengths)
    qv, kv, vv = (torch.randn(t, 8, 64, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    out = flash_attn_varlen_func(qv, kv, vv, cu, max(lengths))
    ref = varlen_attention_reference(qv, kv, vv, cu, upcast=torch.float32)
    assert (out.float() - ref).abs().max().item() < 2e-2
    assert math.isfinite(out.float().abs().max().item())


@pytest.mark.parametrize("causal,h,hkv,s,window", [(True, 4, 2, 77, (-1, -1)), (False, 2, 2, 40, (-1, -1)),
                                                  (True, 4, 1, 70, (9, 0))])
def test_score_softcap_matches_float64_reference(causal, h, hkv, s, window):
    """Gemma 2's attention logit soft-capping (cap * tanh(score / cap) before the softmax):
    out, lse and all gradients against the float64 reference, dense and packed. Inputs are
    scaled so many scores saturate the cap (the cap changes the output by O(1))."""
    g = torch.Generator().manual_seed(7)
    q = (torch.randn(2, s, h, 32, generator=g) * 3).to(DEVICE).requires_grad_()
    k = (torch.randn(2, s, hkv, 32, generator=g) * 3).to(DEVICE).requires_grad_()
    v = torch.randn(2, s, hkv, 32, generator=g).to(DEVICE).requires_grad_()
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True, window_size=window, softcap=5.0)
    ref, ref_lse = attention_reference(q.double(), k.double(), v.double(), causal=causal, return_lse=True,
                                       window_size=window, softcap=5.0)
    assert (ref - attention_reference(q.double(), k.double(), v.double(), causal=causal,
                                      window_size=window)).abs().max() > 0.5
    go, gl = torch.randn_like(out), torch.randn_like(lse)
    grads = torch.autograd.grad((out * go).sum() + (lse * gl).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * go.double()).sum() + (ref_lse * gl.double()).sum(), (q, k, v))
    assert (out - ref).abs().max() <= FP32_TOL and (lse - ref_lse).abs().max() <= FP32_TOL
    for a, b in zip(grads, ref_grads):
        assert (a - b).abs().max() <= 1e-5 * 5  # |score| up to ~30: the tanh's derivative amplifies rounding
    cu = torch.tensor([0, s // 3, s], dtype=torch.int32, device=DEVICE)
    vq, vk, vv = (t[0].detach() for t in (q, k, v))
    got = flash_attn_varlen_func(vq, vk, vv, cu, s, causal=causal, window_size=window, softcap=5.0)
    want = varlen_attention_reference(vq.double(), vk.double(), vv.double(), cu, causal=causal,
                                      window_size=window, softcap=5.0)
    assert (got - want).abs().max() <= FP32_TOL
    with pytest.raises(ValueError, match="softcap"):
        flash_attn_func(q, k, v, softcap=-1.0)
