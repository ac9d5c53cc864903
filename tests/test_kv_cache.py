"""Paged KV cache: block allocation, reuse, K/V write + gather round trips, decode-kernel view."""

import pytest
import torch

from megatron_k15.generation.kv_cache import (
    BlockAllocator,
    OutOfBlocks,
    PagedKVCache,
    blocks_for_memory,
    bytes_per_block,
)
from megatron_k15.kernels.decode_attention import (
    paged_decode_attention,
    paged_decode_attention_reference,
)


def _cache(num_blocks=16, block_size=4, layers=2, kv=2, d=8, dtype=torch.float32):
    return PagedKVCache(layers, num_blocks, block_size, kv, d, dtype=dtype, device="cpu")


def test_allocator_free_list_refcounts():
    a = BlockAllocator(4)
    x = a.allocate(3)
    assert sorted(x) == [0, 1, 2] and a.num_free == 1
    with pytest.raises(OutOfBlocks):
        a.allocate(2)
    assert a.num_free == 1  # a failed allocation takes nothing
    a.share([x[0]])
    a.free([x[0]])
    assert a.num_free == 1 and a.refcount(x[0]) == 1
    a.free(x)
    assert a.num_free == 4 and a.num_used == 0
    with pytest.raises(ValueError):
        a.free([x[1]])  # double free
    assert a.can_allocate(4) and not a.can_allocate(5)


def test_sequences_allocate_free_reuse():
    c = _cache(num_blocks=6, block_size=4)
    c.add_sequence("a")
    assert c.ensure_capacity("a", 9) and c.seq_len("a") == 9  # 3 blocks
    c.add_sequence("b", length=4)
    assert c.num_free_blocks == 2 and len(c.blocks("b")) == 1
    assert c.ensure_capacity("a", 10) == []  # still fits in block 3
    assert c.can_allocate(8) and not c.can_allocate(9)
    assert c.can_allocate(2, seq_id="a") and c.can_allocate(10, seq_id="a")
    assert not c.can_allocate(11, seq_id="a")
    with pytest.raises(OutOfBlocks):
        c.ensure_capacity("b", 4 + 12)  # needs 3 more blocks, 2 free
    assert c.seq_len("b") == 4 and len(c.blocks("b")) == 1 and c.num_free_blocks == 2
    with pytest.raises(OutOfBlocks):
        c.add_sequence("c", length=20)
    assert "c" not in c
    a_blocks = set(c.blocks("a"))
    c.free_sequence("a")
    assert c.num_free_blocks == 5
    c.add_sequence("c", length=12)  # continuous batching: a's blocks are reused
    assert set(c.blocks("c")) <= a_blocks | set(range(6))
    assert len(set(c.blocks("c")) & a_blocks) >= 1
    c.truncate("c", 5)
    assert len(c.blocks("c")) == 2 and c.seq_len("c") == 5 and c.num_free_blocks == 3
    with pytest.raises(KeyError):
        c.add_sequence("c")
    with pytest.raises(KeyError):
        c.seq_len("zzz")
    c.reset()
    assert c.num_free_blocks == 6 and len(c) == 0


def test_no_leak_after_many_requests():
    c = _cache(num_blocks=8, block_size=4)
    g = torch.Generator().manual_seed(0)
    live = []
    for i in range(1000):
        n = int(torch.randint(1, 12, (1,), generator=g))
        while not c.can_allocate(n):
            c.free_sequence(live.pop(0))
        c.add_sequence(i, length=n)
        live.append(i)
    for i in live:
        c.free_sequence(i)
    assert c.num_free_blocks == 8 and c.allocator.num_used == 0


def test_block_table_and_seq_lens():
    c = _cache(num_blocks=8, block_size=4)
    c.add_sequence(1, length=9)
    c.add_sequence(2, length=1)
    bt = c.block_table([2, 1])
    assert bt.dtype == torch.int32 and bt.shape == (2, 3)
    assert bt[0, 0].item() == c.blocks(2)[0] and bt[0, 1:].tolist() == [0, 0]
    assert bt[1].tolist() == c.blocks(1)
    assert c.block_table([1], max_blocks=5).shape == (1, 5)
    with pytest.raises(ValueError):
        c.block_table([1], max_blocks=2)
    lens = c.seq_lens([1, 2])
    assert lens.dtype == torch.int32 and lens.tolist() == [9, 1]


def test_prefill_and_decode_write_gather_roundtrip():
    torch.manual_seed(0)
    c = _cache(num_blocks=12, block_size=4, layers=2, kv=2, d=8)
    lens = {"x": 7, "y": 1, "z": 9}
    ids = list(lens)
    # shuffle the free list so that blocks are non-contiguous
    c.add_sequence("pad", length=8)
    for s in ids:
        c.add_sequence(s, length=lens[s])
    c.free_sequence("pad")
    ref = {(layer, s): (torch.randn(lens[s], 2, 8), torch.randn(lens[s], 2, 8))
           for layer in range(2) for s in ids}
    # ragged prefill, packed rows, one slot mapping for all layers
    slots = c.slot_mapping(ids, [range(lens[s]) for s in ids])
    assert slots.dtype == torch.int64 and slots.numel() == sum(lens.values())
    for layer in range(2):
        k = torch.cat([ref[layer, s][0] for s in ids])
        v = torch.cat([ref[layer, s][1] for s in ids])
        c.write_slots(layer, slots, k, v)
    for layer in range(2):
        for s in ids:
            k, v = c.gather(layer, s)
            assert torch.equal(k, ref[layer, s][0]) and torch.equal(v, ref[layer, s][1])
    # decode: one token per sequence, crossing a block boundary for "z" (9 -> 10 is in-block,
    # "y" 1 -> 2, "x" 7 -> 8 fills block 2)
    for _ in range(3):
        pos = torch.tensor([c.seq_len(s) for s in ids])
        for s in ids:
            c.ensure_capacity(s, c.seq_len(s) + 1)
        for layer in range(2):
            k_new, v_new = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
            c.write(layer, ids, pos, k_new, v_new)
            for i, s in enumerate(ids):
                ref[layer, s] = (torch.cat([ref[layer, s][0], k_new[i:i + 1]]),
                                 torch.cat([ref[layer, s][1], v_new[i:i + 1]]))
    for layer in range(2):
        for s in ids:
            k, v = c.gather(layer, s)
            assert k.shape == (lens[s] + 3, 2, 8)
            assert torch.equal(k, ref[layer, s][0]) and torch.equal(v, ref[layer, s][1])
    # (batch, T) positions with -1 padding rows: padding is not written anywhere
    before = c.kv.clone()
    pos2 = torch.tensor([[c.seq_len("x") - 1, -1]])
    kk = torch.randn(1, 2, 2, 8)
    c.write(0, ["x"], pos2, kk, kk)
    k, _ = c.gather(0, "x")
    assert torch.equal(k[-1], kk[0, 0])
    changed = (c.kv[:, :, :c.num_blocks] != before[:, :, :c.num_blocks]).flatten(3).any(-1)
    assert int(changed.sum()) == 2  # one slot in K and one in V of layer 0
    with pytest.raises(IndexError):
        c.write(0, ["y"], torch.tensor([100]), kk[0, :1], kk[0, :1])


def test_fork_shares_full_blocks_and_copies_partial():
    c = _cache(num_blocks=8, block_size=4, layers=1)
    c.add_sequence("p", length=6)
    k = torch.randn(6, 2, 8)
    c.write(0, ["p"], [range(6)], k, -k)
    c.fork("p", "q")
    assert c.blocks("q")[0] == c.blocks("p")[0] and c.blocks("q")[1] != c.blocks("p")[1]
    assert c.allocator.refcount(c.blocks("p")[0]) == 2
    assert torch.equal(c.gather(0, "q")[0], k)
    c.ensure_capacity("q", 7)
    c.write(0, ["q"], torch.tensor([6]), torch.ones(1, 2, 8), torch.ones(1, 2, 8))
    c.ensure_capacity("p", 7)
    c.write(0, ["p"], torch.tensor([6]), torch.zeros(1, 2, 8), torch.zeros(1, 2, 8))
    assert torch.equal(c.gather(0, "q")[0][6], torch.ones(2, 8))
    assert torch.equal(c.gather(0, "p")[0][6], torch.zeros(2, 8))
    c.free_sequence("p")
    c.free_sequence("q")
    assert c.num_free_blocks == 8


def test_decode_kernel_reads_the_cache():
    """The cache's views and tables feed paged_decode_attention directly."""
    torch.manual_seed(1)
    c = _cache(num_blocks=10, block_size=4, layers=1, kv=2, d=16)
    ids = ["a", "b"]
    lens = [6, 11]
    for s, n in zip(ids, lens):
        c.add_sequence(s, length=n)
        c.write(0, [s], [range(n)], torch.randn(n, 2, 16), torch.randn(n, 2, 16))
    q = torch.randn(2, 4, 16)
    out = paged_decode_attention(q, c.k_cache(0), c.v_cache(0), c.block_table(ids),
                                 c.seq_lens(ids), impl="torch")
    ref = paged_decode_attention_reference(q, c.k_cache(0), c.v_cache(0), c.block_table(ids),
                                           c.seq_lens(ids))
    assert torch.allclose(out, ref, atol=1e-5)
    for i, s in enumerate(ids):  # against attention on the gathered K/V
        k, v = c.gather(0, s)
        k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        p = torch.softmax(torch.einsum("hd,nhd->hn", q[i], k) / 4.0, -1)
        assert torch.allclose(out[i], torch.einsum("hn,nhd->hd", p, v), atol=1e-5)


def test_memory_helpers():
    per = bytes_per_block(32, 16, 8, 128, torch.bfloat16)
    assert per == 2 * 32 * 16 * 8 * 128 * 2
    assert blocks_for_memory(10 * per + 5, 32, 16, 8, 128, torch.bfloat16) == 10
    c = PagedKVCache.from_memory(10 * bytes_per_block(2, 4, 2, 8, torch.float16), 2, 4, 2, 8,
                                 torch.float16)
    assert c.num_blocks == 9 and c.memory_bytes <= 10 * c.bytes_per_block
    assert c.k_cache(1).shape == (9, 4, 2, 8) and "blocks=9x4" in repr(c)
