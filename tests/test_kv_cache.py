"""Paged KV cache: block allocation, reuse, K/V write + gather round trips, decode-kernel view."""

import pytest
import torch

from megatron_k15.generation.kv_cache import (
    BlockAllocator,
    OutOfBlocks,
    PagedKVCache,
    blocks_for_memory,
    bytes_per_block,
    page_layout,
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


def test_page_layout_groups_layers_by_window():
    assert page_layout([-1] * 5) == (5, [-1], [(0, i) for i in range(5)])
    assert page_layout([7] * 3) == (3, [7], [(0, 0), (0, 1), (0, 2)])  # one window everywhere
    per, groups, place = page_layout([127, -1] * 12)  # gpt-oss-20b
    assert (per, groups) == (12, [-1, 127])
    assert place[:4] == [(1, 0), (0, 0), (1, 1), (0, 1)] and place[-1] == (0, 11)
    per, groups, place = page_layout([-1 if (i + 1) % 6 == 0 else 511 for i in range(26)])  # Gemma 3 1B
    assert (per, groups) == (4, [-1] + [511] * 6)  # the last sliding group has 2 of 4 slots used
    assert place[5] == (0, 0) and place[0] == (1, 0) and place[25] == (6, 1)
    assert page_layout([-1] * 6 + [3] * 4)[:2] == (6, [-1, 3])  # full groups never padded
    assert page_layout([-1] * 21 + [3] * 7)[:2] == (7, [-1, -1, -1, 3])  # not 14 unused sliding slots
    assert page_layout([-1] * 7 + [3] * 6)[:2] == (7, [-1, 3])  # not 13 groups of one layer
    assert page_layout([4, 4, 8, 8, 8])[:2] == (3, [4, 8])  # the widest window is the reference
    with pytest.raises(ValueError):
        page_layout([])


def _write_positions(caches, seq, positions, kv_of):
    for c in caches:
        slots = c.slot_mapping([seq], [positions])
        for layer in range(c.num_layers):
            k, v = kv_of(layer, positions)
            c.write_slots(layer, slots, k, v)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_window_cache_holds_the_window_and_decodes_like_a_full_cache(impl):
    """Layer 0 slides (left 5: six tokens), layer 1 attends to all. The sliding group holds at
    most the window's blocks while the full one grows; prefill over fresh K/V takes no block
    before the window; released blocks (filled with NaN once free) are never read: decode
    equals the reference over a cache that keeps everything."""
    bs, left, n_kv, d = 4, 5, 2, 8
    g = torch.Generator().manual_seed(0)
    table = torch.randn(2, 2, 64, n_kv, d, generator=g)  # (layer, k/v, position, kv, d)

    def kv_of(layer, positions):
        idx = torch.as_tensor(list(positions))
        return table[layer, 0, idx], table[layer, 1, idx]

    win = PagedKVCache(2, 40, bs, n_kv, d, dtype=torch.float32, layer_windows=[left, -1])
    full = PagedKVCache(2, 40, bs, n_kv, d, dtype=torch.float32)
    assert (win.num_groups, win.layers_per_block, win.bytes_per_block * 2) == (2, 1, full.bytes_per_block)
    # packed prefill of 10 tokens: the full group needs 3 blocks, the sliding one 2 (from 10 - 5)
    assert win.new_blocks(None, 10, attend_from=10) == 5 and win.new_blocks(None, 10) == 6
    for c in (win, full):
        c.add_sequence("a")
        c.ensure_capacity("a", 10, attend_from=10)
    assert win.num_used_blocks == 5
    slots = win.slot_mapping(["a"], [range(10)])
    sliding, full_attn = win.for_layer(slots, 0), win.for_layer(slots, 1)
    assert slots.shape == (2, 10) and (sliding[:4] == -1).all() and (sliding[4:] >= 0).all()
    assert (full_attn >= 0).all()
    _write_positions((win, full), "a", range(10), kv_of)
    k, v = win.gather(0, "a", 10, start=4)
    assert torch.equal(k, table[0, 0, 4:10]) and torch.equal(v, table[0, 1, 4:10])
    assert torch.equal(win.gather(1, "a")[0], table[1, 0, :10])
    with pytest.raises(ValueError, match="sliding window"):
        win.gather(0, "a", 10)
    # decode to 40 tokens: the sliding group never holds more than the window's blocks
    for t in range(10, 40):
        for c in (win, full):
            c.ensure_capacity("a", t + 1)
        _write_positions((win, full), "a", [t], kv_of)
        sliding_held = len(win.blocks("a")) - win.blocks_needed(t + 1)  # the full group holds them all
        assert sliding_held <= -(-(left + 1) // bs) + 1
    win.kv[:, :, win.allocator._free] = float("nan")  # what a released block may hold
    q = torch.randn(1, 4, d, generator=g)
    lens = torch.tensor([40], dtype=torch.int32)
    for layer, w in ((0, left), (1, -1)):
        bt = win.for_layer(win.block_table(["a"]), layer)
        out, lse = paged_decode_attention(q, win.k_cache(layer), win.v_cache(layer), bt, lens,
                                          return_lse=True, impl=impl, window_left=w)
        ref, ref_lse = paged_decode_attention_reference(q, full.k_cache(layer), full.v_cache(layer),
                                                        full.block_table(["a"]), lens, return_lse=True,
                                                        window_left=w)
        assert torch.allclose(out, ref, atol=2e-6) and torch.allclose(lse, ref_lse, atol=2e-6)
        if impl == "torch":  # and without the LSE: the SDPA path
            out = paged_decode_attention(q, win.k_cache(layer), win.v_cache(layer), bt, lens,
                                         impl="torch", window_left=w)
            assert torch.allclose(out, ref, atol=2e-6)
    # forks share what is held; truncation cannot go back before the released blocks
    win.fork("a", "b")
    assert win.gather(0, "b", 40, start=34)[0].equal(table[0, 0, 34:40])
    with pytest.raises(ValueError, match="gave back"):
        win.truncate("a", 20)
    win.truncate("a", 38)
    for sid in ("a", "b"):
        win.free_sequence(sid)
    assert win.num_used_blocks == 0
