"""Ring attention (context parallelism) against full attention on the gathered sequence.

Multi-rank tests run on CPU/gloo with the Triton kernels under TRITON_INTERPRET=1 (set by
conftest.py). One 4-rank launch covers cp=4 (megatron-core's cp group) and cp=2 (groups {0, 2}
and {1, 3}, so ring peers are not adjacent global ranks), each with both comm types, causal and
not, GQA/MQA, lse output with a gradient on it, and packed sequences of uneven lengths padded
per sequence. Everything is compared in fp32 against a float64 reference: <= 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_k15.kernels.flash_attention import attention_reference, varlen_attention_reference
from megatron_k15.kernels.ring_attention import (
    merge_attn_outputs,
    merge_inplace,
    ring_attn_func,
    ring_step_plan,
    simulate_ring_attn,
)
from megatron_k15.parallel.context import (
    zigzag_merge,
    zigzag_merge_varlen,
    zigzag_split,
    zigzag_split_varlen,
)
from megatron_k15.testing import run_distributed

TOL = 1e-5
D = 16
VARLEN_LENGTHS = [5, 16, 11]  # uneven; padded per sequence to multiples of 2 * cp

# name: (varlen, causal, batch, seqlen (dense), heads, kv_heads, comm_type, with lse[, window left])
# Windows: dense 32 tokens have chunks of 4 (cp=4) / 8 (cp=2), so left 3 takes the neighbour
# exchange under "ring"; packed chunks are 1-2 (cp=4) / 2-4 (cp=2): left 1 exchanges, left 3
# falls back to gathering everything.
CASES = {
    "dense_causal_gqa_ring": (False, True, 1, 32, 4, 2, "ring", True),
    "dense_causal_gqa_allgather": (False, True, 1, 32, 4, 2, "allgather", True),
    "dense_full_mqa_ring": (False, False, 2, 16, 2, 1, "ring", False),
    "dense_full_mqa_allgather": (False, False, 2, 16, 2, 1, "allgather", False),
    "varlen_causal_gqa_ring": (True, True, 1, None, 2, 1, "ring", True),
    "varlen_causal_gqa_allgather": (True, True, 1, None, 2, 1, "allgather", False),
    "dense_window3_gqa_ring": (False, True, 2, 32, 4, 2, "ring", True, 3),
    "dense_window3_gqa_allgather": (False, True, 1, 32, 4, 2, "allgather", True, 3),
    "varlen_window1_ring": (True, True, 1, None, 2, 1, "ring", True, 1),
    "varlen_window3_ring": (True, True, 1, None, 2, 1, "ring", False, 3),
    "varlen_window3_allgather": (True, True, 1, None, 2, 1, "allgather", True, 3),
}


def _window(name):
    left = CASES[name][8] if len(CASES[name]) > 8 else -1
    return (left, 0) if left >= 0 else (-1, -1)


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _full_inputs(name):
    varlen, causal, b, s, h, hkv, comm, with_lse = CASES[name][:8]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    if varlen:
        t = sum(VARLEN_LENGTHS)
        shapes = [(t, h, D), (t, hkv, D), (t, hkv, D), (t, h, D), (h, t)]
    else:
        shapes = [(b, s, h, D), (b, s, hkv, D), (b, s, hkv, D), (b, s, h, D), (b, h, s)]
    return [torch.randn(*sh, generator=g) for sh in shapes]  # q, k, v, dout, dlse


def _shard(name, tensors, cp, r):
    varlen = CASES[name][0]
    q, k, v, do, dl = tensors
    if varlen:
        cu = _cu(VARLEN_LENGTHS)
        shards = [zigzag_split_varlen(x, cu, cp, r) for x in (q, k, v, do)]
        dl_local = zigzag_split_varlen(dl.t(), cu, cp, r).x.t().contiguous()
        return [s.x for s in shards] + [dl_local], shards[0].cu_seqlens
    return [zigzag_split(x, 1, cp, r) for x in (q, k, v, do)] + [zigzag_split(dl, 2, cp, r)], None


def _merge(name, per_rank, what):
    """Gathered (original order, padding dropped) tensor from per-rank local tensors."""
    if CASES[name][0]:
        cu = _cu(VARLEN_LENGTHS)
        if what == "lse":
            return zigzag_merge_varlen([x.t() for x in per_rank], cu).t()
        return zigzag_merge_varlen(per_rank, cu)
    return zigzag_merge(per_rank, 2 if what == "lse" else 1)


def _reference(name):
    varlen, causal, *_rest, with_lse = CASES[name][:8]
    q, k, v, do, dl = _full_inputs(name)
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    if varlen:
        out, lse = varlen_attention_reference(q, k, v, _cu(VARLEN_LENGTHS), causal=causal,
                                              return_lse=True, window_size=_window(name))
    else:
        out, lse = attention_reference(q, k, v, causal=causal, return_lse=True, window_size=_window(name))
    loss = (out * do.double()).sum()
    if with_lse:
        loss = loss + (lse * dl.double()).sum()
    loss.backward()
    return {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}


def _run_case(name, group):
    varlen, causal, b, s, h, hkv, comm, with_lse = CASES[name][:8]
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    (q, k, v, do, dl), cu_local = _shard(name, _full_inputs(name), cp, r)
    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    import megatron_k15.kernels.ring_attention as ra

    halo_calls, halo = [], ra._halo_attn
    ra._halo_attn = lambda *a: halo_calls.append(1) or halo(*a)  # which path the window took
    try:
        out, lse = ring_attn_func(q, k, v, group, causal=causal, comm_type=comm,
                                  cu_seqlens=cu_local, return_lse=True, window_size=_window(name))
    finally:
        ra._halo_attn = halo
    loss = (out * do).sum()
    if with_lse:
        loss = loss + (lse * dl).sum()
    loss.backward()
    # numpy, not tensors: torch's queue shares tensors through file descriptors that can vanish
    # when the worker exits before the parent reads them
    return {"out": out.detach().numpy(), "lse": lse.detach().numpy(), "dq": q.grad.numpy(),
            "dk": k.grad.numpy(), "dv": v.grad.numpy(), "halo": bool(halo_calls)}


# the window cases that exchange only the neighbours' chunks (the others gather everything)
HALO = {"dense_window3_gqa_ring", "varlen_window1_ring"}


def _ring_worker(rank, world_size):
    from megatron.core import parallel_state

    from megatron_k15.initialize import initialize_model_parallel

    initialize_model_parallel(tp=1, pp=1, cp=world_size)
    groups = {"cp4": parallel_state.get_context_parallel_group()}
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # every rank creates every group
    groups["cp2"] = pairs[rank % 2]
    results = {}
    for gname, group in groups.items():
        for name in CASES:
            results[f"{gname}/{name}"] = _run_case(name, group)
    return results


@pytest.fixture(scope="module")
def ring_results():
    return run_distributed(_ring_worker, 4)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("gname,members", [("cp4", [0, 1, 2, 3]), ("cp2", [0, 2]),
                                           ("cp2", [1, 3])])
def test_ring_attention_matches_full(ring_results, name, gname, members):
    ref = _reference(name)
    per_rank = [ring_results[m][f"{gname}/{name}"] for m in members]
    assert [p["halo"] for p in per_rank] == [name in HALO] * len(members)
    for what in ("out", "lse", "dq", "dk", "dv"):
        got = _merge(name, [torch.from_numpy(p[what]) for p in per_rank], what)
        assert got.shape == ref[what].shape, what
        err = (got.double() - ref[what]).abs().max().item()
        assert err <= TOL, f"{gname} {members} {name}: {what} max error {err:.2e}"


# -- single-process checks (no communication) -------------------------------------------------


def test_step_plan_balanced():
    """Every rank does the same work per step: after step 0, half a block of 2c x 2c."""
    for cp in (2, 3, 4, 8):
        for r in range(cp):
            assert ring_step_plan(0, r, cp, True) == [("all", "all", True)]
            for step in range(1, cp):
                (qs, ks, causal), = ring_step_plan(step, r, cp, True)
                assert not causal and "all" in (qs, ks) and {qs, ks} & {0, 1}
                src = (r - step) % cp
                assert (qs, ks) == (("all", 0) if src < r else (1, "all"))
            assert ring_step_plan(1, r, cp, False) == [("all", "all", False)]
            # packed: half x half blocks with the same work (2 c x c blocks after step 0)
            assert len(ring_step_plan(0, r, cp, True, varlen=True)) == 3
            for step in range(1, cp):
                plan = ring_step_plan(step, r, cp, True, varlen=True)
                assert len(plan) == 2 and all(qs in (0, 1) and ks in (0, 1) and not c
                                              for qs, ks, c in plan)


def test_merge_handles_empty_rows():
    out_a = torch.randn(1, 3, 2, 16)
    out_b = torch.randn(1, 3, 2, 16)
    lse_a = torch.tensor([[[0.5, float("-inf"), float("-inf")]] * 2])
    lse_b = torch.tensor([[[float("-inf"), 1.0, float("-inf")]] * 2])
    out, lse = merge_attn_outputs(out_a, lse_a, out_b, lse_b)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 0], out_a[:, 0]) and torch.equal(out[:, 1], out_b[:, 1])
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))
    assert torch.equal(lse, torch.tensor([[[0.5, 1.0, float("-inf")]] * 2]))
    # the fused Triton merge (used by the ring) on strided views of a bigger accumulator
    acc = torch.zeros(1, 5, 2, 16)
    acc_lse = torch.full((1, 2, 5), float("-inf"))
    acc[:, 2:] = out_a
    acc_lse[:, :, 2:] = lse_a
    merge_inplace(acc[:, 2:], acc_lse[:, :, 2:], out_b, lse_b)
    assert torch.allclose(acc[:, 2:], out, atol=1e-6)
    assert torch.equal(acc[:, :2], torch.zeros(1, 2, 2, 16))
    assert torch.allclose(acc_lse[:, :, 2:], lse) and torch.isinf(acc_lse[:, :, :2]).all()
    # packed layout, bf16 block output, general values
    g = torch.Generator().manual_seed(1)
    oa, ob = torch.randn(7, 2, 16, generator=g), torch.randn(7, 2, 16, generator=g).bfloat16()
    la, lb = torch.randn(2, 7, generator=g), torch.randn(2, 7, generator=g)
    lb[0, 3] = float("-inf")
    ref_o, ref_l = merge_attn_outputs(oa, la, ob, lb, varlen=True)
    merge_inplace(oa, la, ob, lb, varlen=True)
    assert torch.allclose(oa, ref_o, atol=1e-6) and torch.allclose(la, ref_l, atol=1e-6)


def test_simulated_ring_cp3_bf16():
    """The in-process schedule (used by the benchmark) at an odd cp, in bf16."""
    cp, s, h, hkv = 3, 24, 2, 1
    g = torch.Generator().manual_seed(3)
    q, do = (torch.randn(1, s, h, D, generator=g) for _ in range(2))
    k, v = (torch.randn(1, s, hkv, D, generator=g) for _ in range(2))

    def split(x):
        return [zigzag_split(x.bfloat16(), 1, cp, r) for r in range(cp)]

    (outs, lses), (dqs, dks, dvs) = simulate_ring_attn(split(q), split(k), split(v), causal=True,
                                                       douts=split(do))
    qr, kr, vr = (x.bfloat16().double().requires_grad_() for x in (q, k, v))
    out, lse = attention_reference(qr, kr, vr, causal=True, return_lse=True)
    out.backward(do.bfloat16().double())
    for got, ref, tol in ((zigzag_merge(outs, 1), out, 2e-2), (zigzag_merge(lses, 2), lse, 1e-2),
                          (zigzag_merge(dqs, 1), qr.grad, 5e-2),
                          (zigzag_merge(dks, 1), kr.grad, 5e-2),
                          (zigzag_merge(dvs, 1), vr.grad, 5e-2)):
        assert got.dtype in (torch.bfloat16, torch.float32)
        assert (got.double() - ref).abs().max().item() <= tol


def test_simulated_ring_varlen_noncausal():
    """Packed, not causal (lengths already multiples of 2 * cp, so no pad keys)."""
    cp, lengths, h, hkv = 2, [4, 8], 2, 1
    cu, t = _cu(lengths), sum(lengths)
    g = torch.Generator().manual_seed(5)
    q, do = (torch.randn(t, h, D, generator=g) for _ in range(2))
    k, v = (torch.randn(t, hkv, D, generator=g) for _ in range(2))
    shards = [[zigzag_split_varlen(x, cu, cp, r) for r in range(cp)] for x in (q, k, v, do)]
    qs, ks, vs, dos = ([s.x for s in sh] for sh in shards)
    (outs, lses), (dqs, dks, dvs) = simulate_ring_attn(
        qs, ks, vs, causal=False, cu_seqlens=shards[0][0].cu_seqlens, douts=dos)
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    out, lse = varlen_attention_reference(qr, kr, vr, cu, causal=False, return_lse=True)
    out.backward(do.double())
    for got, ref in ((zigzag_merge_varlen(outs, cu), out),
                     (zigzag_merge_varlen([x.t() for x in lses], cu).t(), lse),
                     (zigzag_merge_varlen(dqs, cu), qr.grad),
                     (zigzag_merge_varlen(dks, cu), kr.grad),
                     (zigzag_merge_varlen(dvs, cu), vr.grad)):
        assert (got.double() - ref).abs().max().item() <= TOL


def test_single_rank_and_errors():
    torch.manual_seed(0)
    q = torch.randn(1, 8, 2, D)
    k = torch.randn(1, 8, 1, D)
    out = ring_attn_func(q, k, k, None)  # no process group: plain causal flash attention
    assert (out - attention_reference(q, k, k)).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="comm_type"):
        ring_attn_func(q, k, k, None, comm_type="p2p")
    with pytest.raises(ValueError, match="odd"):
        simulate_ring_attn([q[:, :7]] * 2, [k[:, :7]] * 2, [k[:, :7]] * 2)
    with pytest.raises(ValueError, match="odd length"):
        simulate_ring_attn([q[0]] * 2, [k[0]] * 2, [k[0]] * 2,
                           cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32))
