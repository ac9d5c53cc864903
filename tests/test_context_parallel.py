"""Zigzag sharding for context parallelism (megatron_k15.parallel.context)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_k15.parallel.context import (
    pad_to_multiple,
    zigzag_chunk_ids,
    zigzag_gather,
    zigzag_gather_varlen,
    zigzag_merge,
    zigzag_merge_varlen,
    zigzag_position_ids,
    zigzag_split,
    zigzag_split_varlen,
    zigzag_varlen_layout,
)
from megatron_k15.testing import run_distributed


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_zigzag_split_chunks_and_roundtrip(cp):
    seq = 4 * cp
    x = torch.arange(2 * seq * 3).view(2, seq, 3)
    c = seq // (2 * cp)
    shards = [zigzag_split(x, 1, cp, r) for r in range(cp)]
    for r, s in enumerate(shards):
        a, b = zigzag_chunk_ids(cp, r)
        assert (a, b) == (r, 2 * cp - 1 - r)
        assert s.shape == (2, 2 * c, 3)
        assert torch.equal(s[:, :c], x[:, a * c:(a + 1) * c])
        assert torch.equal(s[:, c:], x[:, b * c:(b + 1) * c])
    assert torch.equal(zigzag_merge(shards, 1), x)
    # without a group, zigzag_gather reorders an already gathered (rank-order) tensor
    assert torch.equal(zigzag_gather(torch.cat(shards, 1), 1, cp), x)
    # every token exactly once
    assert sorted(torch.cat([s[0, :, 0] for s in shards]).tolist()) == x[0, :, 0].tolist()


def test_zigzag_split_other_dims_and_autograd():
    x = torch.randn(8, 3, 12, requires_grad=True)
    for dim in (0, -1):
        shards = [zigzag_split(x, dim, 2, r) for r in range(2)]
        assert torch.equal(zigzag_merge(shards, dim), x)
    shards = [zigzag_split(x, 0, 2, r) for r in range(2)]
    (shards[0].sum() * 2 + shards[1].sum()).backward()
    # rank 0 holds chunks 0 and 3 (rows 0-1, 6-7), rank 1 chunks 1 and 2
    expect = torch.tensor([2, 2, 1, 1, 1, 1, 2, 2.0]).view(8, 1, 1).expand(8, 3, 12)
    assert torch.equal(x.grad, expect)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_position_ids(cp):
    seq = 8 * cp
    for r in range(cp):
        pos = zigzag_position_ids(seq, cp, r)
        assert pos.dtype == torch.int64
        assert torch.equal(pos, zigzag_split(torch.arange(seq), 0, cp, r))
    assert torch.equal(torch.cat([zigzag_position_ids(seq, cp, r) for r in range(cp)]).sort()[0],
                       torch.arange(seq))


def test_errors():
    with pytest.raises(ValueError, match="not a multiple of 2 \\* context_parallel_size = 4"):
        zigzag_split(torch.zeros(1, 10), 1, 2, 0)
    with pytest.raises(ValueError, match="not a multiple"):
        zigzag_position_ids(6, 2, 1)
    with pytest.raises(ValueError, match="cp_rank"):
        zigzag_split(torch.zeros(1, 8), 1, 2, 2)
    with pytest.raises(ValueError, match="cp_size"):
        zigzag_split(torch.zeros(1, 8), 1, 0, 0)
    with pytest.raises(ValueError, match="holds"):
        zigzag_merge([torch.zeros(4), torch.zeros(6)], 0)
    with pytest.raises(ValueError, match="cu_seqlens ends at"):
        zigzag_split_varlen(torch.zeros(9), torch.tensor([0, 4, 8]), 2, 0)
    with pytest.raises(ValueError, match="start at 0"):
        zigzag_varlen_layout(torch.tensor([1, 4]), 2, 0)


def test_pad_to_multiple():
    assert pad_to_multiple([0, 1, 4, 5, 8], 4) == [0, 4, 4, 8, 8]
    assert pad_to_multiple(torch.tensor([3, 7]), 8) == [8, 8]
    with pytest.raises(ValueError):
        pad_to_multiple([-1], 4)


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_zigzag_split_varlen(cp):
    lengths = [5, 12, 1, 0, 9]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total = sum(lengths)
    x = torch.arange(1, total + 1, dtype=torch.float32).view(total, 1).repeat(1, 2)
    padded = pad_to_multiple(lengths, 2 * cp)
    shards = []
    for r in range(cp):
        xs, cu_local, pos = zigzag_split_varlen(x, cu, cp, r, pad_value=-1)
        lay = zigzag_varlen_layout(cu, cp, r)
        assert cu_local.dtype == torch.int32
        assert cu_local.tolist() == [0] + torch.tensor([p // cp for p in padded]).cumsum(0).tolist()
        assert torch.equal(cu_local, lay.cu_seqlens)  # the same on every rank
        assert lay.max_seqlen == max(p // cp for p in padded)
        for i, (n, p) in enumerate(zip(lengths, padded)):
            s, e = int(cu_local[i]), int(cu_local[i + 1])
            # positions: this rank's two chunks of the padded sequence
            ref_pos = zigzag_split(torch.arange(p), 0, cp, r)
            assert torch.equal(pos[s:e], ref_pos)
            ref = torch.where(ref_pos < n, ref_pos + int(cu[i]) + 1, torch.tensor(-1)).float()
            assert torch.equal(xs[s:e, 0], ref)
            assert torch.equal(lay.valid[s:e], ref_pos < n)
        shards.append(xs)
    assert torch.equal(zigzag_merge_varlen(shards, cu), x)
    assert torch.equal(zigzag_gather_varlen(torch.cat(shards), cu, cp), x)
    full = zigzag_merge_varlen(shards, cu, keep_padding=True)
    assert full.shape[0] == sum(padded)


def test_zigzag_split_varlen_autograd():
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    x = torch.randn(10, 4, requires_grad=True)
    xs = [zigzag_split_varlen(x, cu, 2, r).x for r in range(2)]
    zigzag_merge_varlen(xs, cu).mul(3).sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))


# -- with a process group -------------------------------------------------------------------


def _gather_worker(rank, world_size):
    group = dist.new_group(list(range(world_size)))
    torch.manual_seed(0)
    x = torch.randn(2, 8 * world_size, 3)
    w = torch.randn_like(x)
    local = zigzag_split(x, 1, world_size, rank).clone().requires_grad_()
    full = zigzag_gather(local, 1, world_size, group)
    (full * w).sum().backward()  # every rank computes the same loss on the gathered tensor
    cu = torch.tensor([0, 3, 8 * world_size], dtype=torch.int32)
    xv = x[0]
    lv = zigzag_split_varlen(xv, cu, world_size, rank).x
    fullv = zigzag_gather_varlen(lv, cu, world_size, group)
    out = {"full": full.detach(), "grad": local.grad, "x": x, "w": w, "fullv": fullv, "xv": xv}
    # numpy, not tensors: torch's queue passes tensors as file descriptors that can vanish when
    # the worker exits first
    return {key: val.numpy() for key, val in out.items()}


@pytest.mark.slow
def test_zigzag_gather_with_group():
    world = 2
    res = [{k: torch.from_numpy(v) for k, v in r.items()}
           for r in run_distributed(_gather_worker, world)]
    x, w = res[0]["x"], res[0]["w"]
    for r, out in enumerate(res):
        assert torch.equal(out["full"], x)
        assert torch.equal(out["fullv"], out["xv"])
        # adjoint of the all-gather: the sum over ranks of each rank's gradient of its slice
        assert torch.allclose(out["grad"], world * zigzag_split(w, 1, world, r))
