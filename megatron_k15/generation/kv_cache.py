"""Paged KV cache: allocated once, handed out to sequences in fixed-size blocks.

One long rollout (128K tokens) and many short ones share the same memory: a sequence owns a
list of physical blocks (its *block table*), grown on demand, and returns them to the free
list when it finishes, so a waiting request can join the running batch (continuous batching).

Layout (per layer): ``k_cache(layer)`` and ``v_cache(layer)`` are views of shape
``(num_blocks, block_size, n_kv_heads, head_dim)`` into one tensor allocated at construction,
``(layers_per_block, 2, num_blocks + 1, block_size, n_kv_heads, head_dim)`` (without sliding
windows ``layers_per_block`` is the number of layers); the extra block is a
never-allocated scratch target for padding rows, so writes need no host sync. Token ``t`` of a
sequence lives in *slot* ``block_table[t // block_size] * block_size + t % block_size`` of the
flattened ``(num_blocks * block_size, n_kv_heads, head_dim)`` view, which is what
``megatron_k15.kernels.decode_attention.paged_decode_attention`` reads.

Typical engine step (decode)::

    for sid in running:                                 # may raise OutOfBlocks (preempt then)
        cache.ensure_capacity(sid, cache.seq_len(sid) + 1)
    slots = cache.slot_mapping(running, positions)     # once per step, reused by every layer
    bt, lens = cache.block_table(running), cache.seq_lens(running)
    for layer ...:
        cache.write_slots(layer, slots, k_new, v_new)
        out = paged_decode_attention(q, cache.k_cache(layer), cache.v_cache(layer), bt, lens)
    ...
    cache.free_sequence(sid)                            # when a sequence finishes

Prefill is the same with many positions per sequence (``positions`` ragged, ``k``/``v`` packed
as for ``flash_attn_varlen_func``).

Lengths: ``ensure_capacity(seq_id, new_len)`` reserves blocks for ``new_len`` tokens *and*
sets the sequence's length to ``new_len`` (never shrinks it; use ``truncate``). The caller then
writes those tokens' K/V in every layer before attention reads them, so ``seq_lens`` always
counts the current token, as the decode kernel expects.

Block sharing: blocks are reference counted. ``fork(src, dst)`` makes ``dst`` share all of
``src``'s full blocks (the k samples of one prompt share its prefill) and copies the partial
last block, so the two sequences never write to a shared block (no copy-on-write needed).

Sliding-window layers (Mistral v0.1, OLMo 3, Gemma 3, gpt-oss) read only their last
``window + 1`` tokens, so keeping every token of theirs wastes memory (gpt-oss-20b: half the
layers see 128 tokens; Gemma 3: five layers in six see 512-1024). Given ``layer_windows``,
the layers are cut into groups of ``layers_per_block`` layers of one window each
(``page_layout``); a block then holds one group's layers and every group has its own block
table. A sliding group gives back the blocks wholly before ``attend_from - window`` as the
sequence grows and never takes blocks for positions it will not read (a prefill over fresh
K/V writes those to the scratch block), so a long rollout of such a model holds its full
attention layers' tokens plus a window's worth of the others. With several groups,
``slot_mapping`` and ``block_table`` have a leading group dimension and ``for_layer`` picks a
layer's; all groups share one free list, so memory moves to whichever kind needs it.

Everything here is host-side bookkeeping in Python (cheap: O(blocks touched)); tensors built
for the device (block tables, slot mappings) are created on the CPU and copied with
``non_blocking=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, Iterable, List, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "OutOfBlocks",
    "BlockAllocator",
    "PagedKVCache",
    "blocks_for_memory",
    "bytes_per_block",
    "page_layout",
]


class OutOfBlocks(RuntimeError):
    """Raised when an allocation needs more free blocks than the cache has left."""


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_block(num_layers: int, block_size: int, n_kv_heads: int, head_dim: int,
                    dtype: torch.dtype = torch.bfloat16, keys_only: bool = False) -> int:
    """Bytes one block takes across all layers, K and V together (K alone with ``keys_only``)."""
    return (1 if keys_only else 2) * num_layers * block_size * n_kv_heads * head_dim * _dtype_size(dtype)


def blocks_for_memory(memory_bytes: int, num_layers: int, block_size: int, n_kv_heads: int,
                      head_dim: int, dtype: torch.dtype = torch.bfloat16, keys_only: bool = False) -> int:
    """How many blocks fit in ``memory_bytes`` (e.g. free GPU memory times a utilisation
    fraction, after weights and activations)."""
    per = bytes_per_block(num_layers, block_size, n_kv_heads, head_dim, dtype, keys_only)
    return max(0, int(memory_bytes) // per)


class BlockAllocator:
    """Free list of physical block ids ``0 .. num_blocks-1`` with reference counts.

    ``allocate(n)`` returns n blocks (refcount 1) or raises ``OutOfBlocks`` without allocating
    any; ``free(blocks)`` drops one reference of each and returns blocks that reach 0 to the
    free list; ``share(blocks)`` adds a reference. Freed blocks are reused last-in-first-out
    (recently used blocks are the likeliest still in cache); freeing a block that is not
    allocated raises ``ValueError``.
    """

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = int(num_blocks)
        # pop() from the end: hand out low ids first on a fresh allocator
        self._free: List[int] = list(range(self.num_blocks - 1, -1, -1))
        self._ref = [0] * self.num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block: int) -> int:
        return self._ref[block]

    def can_allocate(self, n: int) -> bool:
        return 0 <= n <= len(self._free)

    def allocate(self, n: int) -> List[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, only {len(self._free)} of {self.num_blocks} free")
        out = [self._free.pop() for _ in range(n)]
        for b in out:
            self._ref[b] = 1
        return out

    def share(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if self._ref[b] <= 0:
                raise ValueError(f"cannot share block {b}: it is not allocated")
            self._ref[b] += 1

    def free(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if not 0 <= b < self.num_blocks or self._ref[b] <= 0:
                raise ValueError(f"block {b} is not allocated (double free?)")
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)


def page_layout(layer_windows: Sequence[int]) -> Tuple[int, List[int], List[Tuple[int, int]]]:
    """How a stage's layers share the cache's blocks, from each layer's sliding window (``left``,
    or -1 for full attention).

    A physical block holds ``block_size`` tokens of ``layers_per_block`` layers. The layers of
    one window (a *kind*) are cut, in order, into groups of that many layers, and every group
    has its own block table: a sliding group gives back the blocks its window has left behind
    while a full-attention group keeps all of its own. Without windows, or with the same
    window everywhere, there is one group of all layers. With several kinds,
    ``layers_per_block`` is a divisor of the full-attention layer count (of the widest
    window's, when every layer slides), so full-attention groups fill their blocks: the one
    giving the fewest groups (each is a block table per decode step) among those that leave
    no sliding kind more unused slots than it has layers (its blocks are few, but not free).
    E.g. gpt-oss-20b (12 full, 12 sliding): two groups of 12; Gemma 3 1B (4 full, 22 sliding):
    one group of the 4 full layers and six of sliding ones (two slots unused); 7 full and 6
    sliding: two groups of 7.

    Returns (layers_per_block, group_windows, place): group g's window and layer i's
    (group, slot in the block).
    """
    windows = [int(w) if w is not None and int(w) >= 0 else -1 for w in layer_windows]
    if not windows:
        raise ValueError("a cache needs at least one layer")
    kinds = sorted(set(windows), key=lambda w: (w >= 0, w))  # full attention first
    counts = {w: windows.count(w) for w in kinds}
    if len(kinds) == 1:
        per_block = len(windows)
    else:
        ref = -1 if -1 in counts else max(kinds)

        def groups(d):
            return sum(-(-n // d) for n in counts.values())

        fits = [d for d in range(1, counts[ref] + 1) if counts[ref] % d == 0
                and all(-(-n // d) * d - n <= n for w, n in counts.items() if w != ref)]
        per_block = min(fits, key=lambda d: (groups(d), -d))  # d = 1 always fits
    group_windows: List[int] = []
    place: List[Tuple[int, int]] = [(0, 0)] * len(windows)
    for w in kinds:
        layers = [i for i, x in enumerate(windows) if x == w]
        for first in range(0, len(layers), per_block):
            for slot, layer in enumerate(layers[first:first + per_block]):
                place[layer] = (len(group_windows), slot)
            group_windows.append(w)
    return per_block, group_windows, place


class _KindBlocks:
    """A sequence's blocks in one kind of layers: per logical block (``block_size`` tokens), its
    physical block in each of the kind's ``m`` groups, or None once released (a sliding window
    has left it behind, or no query will ever read it). Released blocks are always a prefix:
    logical blocks below ``start``."""

    __slots__ = ("m", "blocks", "start", "_table")

    def __init__(self, m: int, blocks: Optional[List[Optional[List[int]]]] = None, start: int = 0):
        self.m = m
        self.blocks = blocks if blocks is not None else []
        self.start = start
        self._table: Optional[torch.Tensor] = None  # int32 (len(blocks), m), -1 where released

    def table(self) -> torch.Tensor:
        n_old = 0 if self._table is None else self._table.shape[0]
        if self._table is None or n_old != len(self.blocks):
            rows = [r if r is not None else [-1] * self.m for r in self.blocks[n_old:]]
            new = torch.tensor(rows, dtype=torch.int32).reshape(-1, self.m)
            # blocks only grow at the end (truncate resets the cached table)
            self._table = new if n_old == 0 else torch.cat([self._table, new])
        return self._table

    def held(self) -> List[int]:
        return [b for row in self.blocks if row is not None for b in row]

    def release(self, upto: int, allocator: BlockAllocator) -> None:
        """Give back logical blocks ``[start, upto)``."""
        end = min(upto, len(self.blocks))
        gone = []
        for i in range(self.start, end):
            if self.blocks[i] is not None:
                gone.extend(self.blocks[i])
                self.blocks[i] = None
        if self._table is not None and end > self.start:
            self._table[self.start:min(end, self._table.shape[0])] = -1
        self.start = max(self.start, upto)
        allocator.free(gone)


@dataclass
class _Seq:
    kinds: List[_KindBlocks]
    length: int = 0


PositionsLike = Union[torch.Tensor, Sequence[Union[torch.Tensor, Sequence[int], range]]]


class PagedKVCache:
    """K/V for ``num_layers`` layers in ``num_blocks`` blocks of ``block_size`` tokens.

    Args:
        num_layers, num_blocks, block_size, n_kv_heads, head_dim: geometry (``n_kv_heads`` is
            the number of kv heads held on this rank, i.e. already divided by tp).
        dtype, device: of the cache tensors.
        layer_windows: each layer's sliding window (``left`` of ``window_size=(left, 0)``, -1
            or None for full attention). Sliding layers then hold only their window's blocks
            (``page_layout``): a block holds ``layers_per_block`` layers, and slot mappings and
            block tables get a leading group dimension when there is more than one group.
        keys_only: one row per token that serves as key and value (``v_cache`` is
            ``k_cache``): MLA's latent cache, whose decode attends over the latent rows with
            queries absorbed into them and keeps the values' channels of the output.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.bfloat16,
                 device: Union[str, torch.device] = "cpu",
                 layer_windows: Optional[Sequence[Optional[int]]] = None, keys_only: bool = False):
        if min(num_layers, block_size, n_kv_heads, head_dim) < 1 or num_blocks < 0:
            raise ValueError("num_layers, block_size, n_kv_heads, head_dim must be >= 1 and "
                             "num_blocks >= 0")
        windows = [-1] * num_layers if layer_windows is None else list(layer_windows)
        if len(windows) != num_layers:
            raise ValueError(f"{len(windows)} layer windows for {num_layers} layers")
        self.num_layers = int(num_layers)
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.n_kv_heads = int(n_kv_heads)
        self.head_dim = int(head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        self.layers_per_block, self.group_windows, self._place = page_layout(windows)
        self.num_groups = len(self.group_windows)
        # kinds: (window, the kind's group ids); group g is kind _group_loc[g][0]'s
        # _group_loc[g][1]-th group
        self._kinds: List[Tuple[int, List[int]]] = []
        self._group_loc: List[Tuple[int, int]] = []
        for g, w in enumerate(self.group_windows):
            if not self._kinds or self._kinds[-1][0] != w:
                self._kinds.append((w, []))
            self._group_loc.append((len(self._kinds) - 1, len(self._kinds[-1][1])))
            self._kinds[-1][1].append(g)
        # one extra, never allocated, scratch block at the end receives padding rows' writes
        self.keys_only = bool(keys_only)
        self._v = 0 if self.keys_only else 1  # where V lives in the second dimension
        self.kv = torch.zeros(self.layers_per_block, 1 if self.keys_only else 2, self.num_blocks + 1,
                              self.block_size, self.n_kv_heads, self.head_dim, dtype=dtype, device=self.device)
        self._scratch_slot = self.num_blocks * self.block_size
        self.allocator = BlockAllocator(self.num_blocks)
        self._seqs: Dict[Hashable, _Seq] = {}

    @classmethod
    def from_memory(cls, memory_bytes: int, num_layers: int, block_size: int, n_kv_heads: int,
                    head_dim: int, dtype: torch.dtype = torch.bfloat16, device="cpu",
                    layer_windows: Optional[Sequence[Optional[int]]] = None, keys_only: bool = False):
        """A cache with as many blocks as fit in ``memory_bytes``."""
        per_block = num_layers if layer_windows is None else page_layout(layer_windows)[0]
        n = blocks_for_memory(memory_bytes, per_block, block_size, n_kv_heads, head_dim, dtype, keys_only)
        n = max(0, n - 1)  # the scratch block
        return cls(num_layers, n, block_size, n_kv_heads, head_dim, dtype, device, layer_windows, keys_only)

    # ------------------------------------------------------------------ tensors
    def k_cache(self, layer: int) -> torch.Tensor:
        """(num_blocks, block_size, n_kv_heads, head_dim) view of layer's K."""
        return self.kv[self._place[layer][1], 0, :self.num_blocks]

    def v_cache(self, layer: int) -> torch.Tensor:
        """(num_blocks, block_size, n_kv_heads, head_dim) view of layer's V."""
        return self.kv[self._place[layer][1], self._v, :self.num_blocks]

    def for_layer(self, t: torch.Tensor, layer: int) -> torch.Tensor:
        """``layer``'s part of a slot mapping or block table: ``t[group]`` when the cache has
        several groups (those have a leading group dimension), ``t`` itself otherwise."""
        return t if self.num_groups == 1 else t[self._place[layer][0]]

    @property
    def bytes_per_block(self) -> int:
        return bytes_per_block(self.layers_per_block, self.block_size, self.n_kv_heads,
                               self.head_dim, self.dtype, self.keys_only)

    @property
    def memory_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    # ------------------------------------------------------------------ accounting
    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.allocator.num_used

    def blocks_needed(self, tokens: int) -> int:
        """Logical blocks (of ``block_size`` tokens) that ``tokens`` tokens span."""
        return -(-int(tokens) // self.block_size)

    def _plan(self, kinds: Optional[List[_KindBlocks]], new_len: int, attend_from: int):
        """Per kind: (first logical block to keep, first to allocate, end) for growing to
        ``new_len`` tokens when no query before position ``attend_from`` runs any more."""
        target = self.blocks_needed(new_len)
        plans = []
        for k, (window, _) in enumerate(self._kinds):
            kb = None if kinds is None else kinds[k]
            have, start = (0, 0) if kb is None else (len(kb.blocks), kb.start)
            keep = start
            if window >= 0:
                keep = max(start, min(max(0, attend_from - window) // self.block_size, target))
            first = max(have, keep)
            plans.append((keep, first, max(first, target)))
        return plans

    def new_blocks(self, seq_id: Optional[Hashable], new_len: int,
                   attend_from: Optional[int] = None) -> int:
        """Free blocks ``ensure_capacity(seq_id, new_len, attend_from)`` would use up: what it
        allocates less what the sliding windows give back (never negative). ``seq_id=None``: a
        new, empty sequence."""
        s = None if seq_id is None else self._seq(seq_id)
        if attend_from is None:
            attend_from = 0 if s is None else s.length
        plans = self._plan(None if s is None else s.kinds, new_len, attend_from)
        alloc = freed = 0
        for k, (keep, first, end) in enumerate(plans):
            alloc += (end - first) * len(self._kinds[k][1])
            if s is not None:
                kb = s.kinds[k]
                freed += sum(1 for row in kb.blocks[kb.start:keep] if row is not None
                             for b in row if self.allocator.refcount(b) == 1)
        return max(0, alloc - freed)

    def can_allocate(self, tokens: int, seq_id: Optional[Hashable] = None) -> bool:
        """Whether ``tokens`` more tokens fit: for a new sequence (``seq_id=None``), or on top
        of ``seq_id``'s current length (its partly filled last block counts)."""
        base = 0 if seq_id is None else self._seq(seq_id).length
        return self.allocator.can_allocate(self.new_blocks(seq_id, base + int(tokens)))

    # ------------------------------------------------------------------ sequences
    def _seq(self, seq_id: Hashable) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def __len__(self) -> int:
        return len(self._seqs)

    @property
    def sequences(self) -> List[Hashable]:
        return list(self._seqs)

    def add_sequence(self, seq_id: Hashable, length: int = 0) -> None:
        """Register a new, empty sequence (optionally reserving ``length`` tokens at once)."""
        if seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id!r} already exists")
        self._seqs[seq_id] = _Seq([_KindBlocks(len(g)) for _, g in self._kinds])
        if length:
            try:
                self.ensure_capacity(seq_id, length)
            except OutOfBlocks:
                del self._seqs[seq_id]
                raise

    def ensure_capacity(self, seq_id: Hashable, new_len: int,
                        attend_from: Optional[int] = None) -> List[int]:
        """Make room for ``new_len`` tokens and set the length to ``max(length, new_len)``.

        ``attend_from``: the first position whose query still reads the cache (default: the
        current length, i.e. the first new token; a prefill that attends over its own fresh
        K/V passes ``new_len``). Sliding layers give back the blocks wholly before
        ``attend_from - window`` and never get blocks for positions before it (their slots map
        to -1, so writes there are dropped).

        Returns the newly allocated block ids. Raises ``OutOfBlocks`` when the free blocks do
        not suffice; then nothing is allocated and the length is unchanged (blocks no query
        will read again are still given back)."""
        s = self._seq(seq_id)
        attend_from = s.length if attend_from is None else int(attend_from)
        plans = self._plan(s.kinds, new_len, attend_from)
        for kb, (keep, _, _) in zip(s.kinds, plans):
            kb.release(keep, self.allocator)
        new = self.allocator.allocate(sum((end - first) * kb.m
                                          for kb, (_, first, end) in zip(s.kinds, plans)))
        it = iter(new)
        for kb, (_, first, end) in zip(s.kinds, plans):
            kb.blocks.extend([None] * (first - len(kb.blocks)))
            for _ in range(first, end):
                kb.blocks.append([next(it) for _ in range(kb.m)])
        s.length = max(s.length, int(new_len))
        return new

    def truncate(self, seq_id: Hashable, new_len: int) -> None:
        """Shrink a sequence to ``new_len`` tokens, freeing blocks it no longer needs."""
        s = self._seq(seq_id)
        if not 0 <= new_len <= s.length:
            raise ValueError(f"new_len {new_len} not in [0, {s.length}]")
        for (window, _), kb in zip(self._kinds, s.kinds):
            if kb.start and kb.start * self.block_size > max(0, new_len - window):
                raise ValueError(
                    f"cannot truncate sequence {seq_id!r} to {new_len} tokens: its sliding layers "
                    f"gave back the blocks before position {kb.start * self.block_size}")
        keep = self.blocks_needed(new_len)
        for kb in s.kinds:
            self.allocator.free([b for row in kb.blocks[keep:] if row is not None for b in row])
            del kb.blocks[keep:]
            kb._table = None
            kb.start = min(kb.start, keep)
        s.length = int(new_len)

    def free_sequence(self, seq_id: Hashable) -> None:
        """Forget a sequence and return its blocks (those not shared with another sequence)."""
        s = self._seqs.pop(seq_id)
        for kb in s.kinds:
            self.allocator.free(kb.held())

    def fork(self, src_id: Hashable, dst_id: Hashable) -> None:
        """New sequence ``dst_id`` with the same cached tokens as ``src_id``.

        Full blocks are shared (reference counted); a partly filled last block is copied in
        every layer, so later writes to either sequence never touch a shared block."""
        s = self._seq(src_id)
        if dst_id in self._seqs:
            raise KeyError(f"sequence {dst_id!r} already exists")
        full = s.length // self.block_size
        partial = [kb.blocks[full] if s.length % self.block_size and len(kb.blocks) > full
                   else None for kb in s.kinds]
        new = iter(self.allocator.allocate(sum(len(p) for p in partial if p is not None)))
        kinds = []
        for kb, last in zip(s.kinds, partial):
            rows = [None if r is None else list(r) for r in kb.blocks[:full]]
            self.allocator.share(b for r in rows if r is not None for b in r)
            if last is not None:
                copy = [next(new) for _ in last]
                for src, dst in zip(last, copy):
                    self.kv[:, :, dst].copy_(self.kv[:, :, src])
                rows.append(copy)
            kinds.append(_KindBlocks(kb.m, rows, min(kb.start, len(rows))))
        self._seqs[dst_id] = _Seq(kinds, s.length)

    def seq_len(self, seq_id: Hashable) -> int:
        return self._seq(seq_id).length

    def blocks(self, seq_id: Hashable) -> List[int]:
        """The physical blocks the sequence holds (every group's)."""
        return [b for kb in self._seq(seq_id).kinds for b in kb.held()]

    def block_table(self, seq_ids: Sequence[Hashable], max_blocks: Optional[int] = None,
                    device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """(batch, max_blocks) int32 block ids, padded with 0 (the kernel never reads padding,
        nor a sliding layer's released blocks); (num_groups, batch, max_blocks) when the cache
        has several groups (``for_layer`` picks a layer's).

        ``max_blocks`` defaults to the longest table in the batch; pass a fixed width to keep
        shapes static (CUDA graphs)."""
        seqs = [self._seq(i) for i in seq_ids]
        width = max((len(s.kinds[0].blocks) for s in seqs), default=0)
        if max_blocks is None:
            max_blocks = max(width, 1)
        elif width > max_blocks:
            raise ValueError(f"a sequence has {width} blocks > max_blocks={max_blocks}")
        parts = []
        for k, (_, groups) in enumerate(self._kinds):
            out = torch.zeros(len(seqs), max_blocks, len(groups), dtype=torch.int32)
            for row, s in enumerate(seqs):
                t = s.kinds[k].table()
                out[row, :t.shape[0]] = t
            parts.append(out.clamp_(min=0).permute(2, 0, 1))
        out = parts[0][0] if self.num_groups == 1 else torch.cat(parts).contiguous()
        return self._to(out, device)

    def seq_lens(self, seq_ids: Sequence[Hashable],
                 device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """(batch,) int32 lengths."""
        out = torch.tensor([self._seq(i).length for i in seq_ids], dtype=torch.int32)
        return self._to(out, device)

    def _to(self, t: torch.Tensor, device) -> torch.Tensor:
        device = self.device if device is None else torch.device(device)
        if device.type == "cpu":
            return t
        return t.pin_memory().to(device, non_blocking=True) if torch.cuda.is_available() \
            else t.to(device)

    # ------------------------------------------------------------------ K/V data
    def slot_mapping(self, seq_ids: Sequence[Hashable], positions: PositionsLike,
                     device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """int64 flat slot of each new token, in the order the K/V rows will be given: (N,), or
        (num_groups, N) when the cache has several groups (``for_layer`` picks a layer's).

        ``positions`` is a (batch,) tensor (decode: one token per sequence), a (batch, T)
        tensor, or a list of per-sequence position lists/tensors/ranges (ragged prefill; rows
        packed in sequence order, as for varlen attention). A negative position marks a padding
        row and maps to slot -1 (skipped by ``write_slots``), and so does a position a sliding
        group holds no block for. Positions must be below the sequence's reserved capacity
        (``ensure_capacity`` first)."""
        bs = self.block_size
        if isinstance(positions, torch.Tensor) and positions.dim() == 1:
            # decode fast path: O(batch) host work, whatever the sequences' lengths
            if positions.shape[0] != len(seq_ids):
                raise ValueError(f"positions must be (batch,) or (batch, T) with batch="
                                 f"{len(seq_ids)}, got {tuple(positions.shape)}")
            out = []
            for sid, p in zip(seq_ids, positions.tolist()):
                if p < 0:
                    out.append([-1] * self.num_groups)
                    continue
                s = self._seq(sid)
                if p >= len(s.kinds[0].blocks) * bs:
                    raise IndexError(f"sequence {sid!r}: position {p} beyond its reserved "
                                     f"capacity {len(s.kinds[0].blocks) * bs} (call ensure_capacity)")
                row = []
                for kb in s.kinds:
                    blocks = kb.blocks[p // bs]
                    row.extend([-1] * kb.m if blocks is None else [b * bs + p % bs for b in blocks])
                out.append(row)
            slots = torch.tensor(out, dtype=torch.int64).reshape(-1, self.num_groups).t()
            return self._to(self._squeeze(slots), device)
        if isinstance(positions, torch.Tensor):
            pos = positions.detach().to("cpu", torch.int64)
            if pos.dim() not in (1, 2) or pos.shape[0] != len(seq_ids):
                raise ValueError(f"positions must be (batch,) or (batch, T) with batch="
                                 f"{len(seq_ids)}, got {tuple(pos.shape)}")
            self._check_positions(seq_ids, pos)
            rows = [pos[i] for i in range(pos.shape[0])]
        else:
            if len(positions) != len(seq_ids):
                raise ValueError(f"got {len(positions)} position lists for {len(seq_ids)} "
                                 "sequences")
            rows = []
            for sid, p in zip(seq_ids, positions):
                p = torch.as_tensor(list(p) if isinstance(p, range) else p,
                                    dtype=torch.int64).reshape(-1).cpu()
                self._check_positions([sid], p[None, :])
                rows.append(p)
        parts = [self._sequence_slots(self._seq(sid), p) for sid, p in zip(seq_ids, rows)]
        slots = torch.cat(parts, dim=1) if parts else torch.zeros(self.num_groups, 0, dtype=torch.int64)
        return self._to(self._squeeze(slots), device)

    def _sequence_slots(self, s: _Seq, p: torch.Tensor) -> torch.Tensor:
        """(num_groups, len(p)) slots of one sequence's positions ``p`` (-1: padding, or no block)."""
        bs = self.block_size
        pc = p.clamp(min=0)
        out = []
        for kb in s.kinds:
            table = kb.table().long()
            if table.shape[0] == 0:
                table = torch.full((1, kb.m), -1, dtype=torch.int64)
            blk = table[(pc // bs).clamp(max=table.shape[0] - 1)].t()  # (m, len(p))
            out.append(torch.where((p >= 0) & (blk >= 0), blk * bs + pc % bs, torch.full_like(blk, -1)))
        return torch.cat(out)

    def _squeeze(self, slots: torch.Tensor) -> torch.Tensor:
        return slots[0] if self.num_groups == 1 else slots

    def _check_positions(self, seq_ids, p2: torch.Tensor) -> None:
        if p2.numel() == 0:
            return
        cap = torch.tensor([len(self._seq(i).kinds[0].blocks) * self.block_size for i in seq_ids])
        p2 = p2 if p2.dim() == 2 else p2[:, None]
        bad = (p2 >= cap[:, None]).any(dim=1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise IndexError(f"sequence {seq_ids[row]!r}: position {int(p2[row].max())} beyond "
                             f"its reserved capacity {int(cap[row])} (call ensure_capacity)")

    def write_slots(self, layer: int, slots: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> None:
        """Scatter rows ``k[i], v[i]`` ((N, n_kv_heads, head_dim), or any shape whose leading
        dims flatten to N) into flat slots ``slots`` (as ``slot_mapping`` gives them); rows
        with slot -1 are skipped."""
        self.write_rows(layer, self.resolve_slots(slots), k, v)

    def resolve_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """``slots`` as ``write_rows`` takes them: int64 on the cache's device, padding (-1) sent
        to the scratch block (no host sync, no clash with real slots). Once per step: every
        layer writes the same slots (its group's)."""
        slots = slots.to(self.device, torch.int64)
        slots = slots.reshape(-1) if self.num_groups == 1 else slots.reshape(self.num_groups, -1)
        return torch.where(slots >= 0, slots, torch.full_like(slots, self._scratch_slot))

    def write_rows(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor]) -> None:
        """``write_slots`` with slots from ``resolve_slots`` (``v`` None for a keys-only cache)."""
        slots = self.for_layer(slots, layer)
        k = k.reshape(-1, self.n_kv_heads, self.head_dim)
        if (v is None) != self.keys_only:
            raise ValueError("a keys-only cache takes no V rows; any other needs them")
        rows = [k] if v is None else [k, v.reshape(-1, self.n_kv_heads, self.head_dim)]
        if any(t.shape[0] != slots.shape[0] for t in rows):
            raise ValueError(f"{slots.shape[0]} slots for {[t.shape[0] for t in rows]} K/V rows")
        j = self._place[layer][1]
        for i, t in enumerate(rows):
            self.kv[j, i].view(-1, self.n_kv_heads, self.head_dim).index_copy_(0, slots, t.to(self.dtype))

    def write(self, layer: int, seq_ids: Sequence[Hashable], positions: PositionsLike,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new K/V of ``seq_ids`` at ``positions`` (see ``slot_mapping``) in ``layer``.

        k, v: (batch, n_kv_heads, head_dim) for one token per sequence, (batch, T, n_kv_heads,
        head_dim) for a (batch, T) positions tensor, or (total_tokens, n_kv_heads, head_dim)
        packed for ragged positions. For many layers compute ``slot_mapping`` once and call
        ``write_slots``."""
        self.write_slots(layer, self.slot_mapping(seq_ids, positions), k, v)

    def gather(self, layer: int, seq_id: Hashable, length: Optional[int] = None, start: int = 0):
        """Contiguous (length - start, n_kv_heads, head_dim) K and V of one sequence's positions
        ``[start, length)`` (default: all of its tokens), e.g. to prefill on top of a cached
        prefix (a sliding layer: its window's part of it), or for tests."""
        s = self._seq(seq_id)
        n = s.length if length is None else int(length)
        group = self._place[layer][0]
        kind, index = self._group_loc[group]
        kb = s.kinds[kind]
        if not 0 <= start <= n <= len(kb.blocks) * self.block_size:
            raise ValueError(f"positions [{start}, {n}) beyond the sequence's capacity")
        first = start // self.block_size
        if first < kb.start:
            raise ValueError(f"layer {layer} of sequence {seq_id!r} gave back the blocks before "
                             f"position {kb.start * self.block_size} (sliding window)")
        rows = kb.blocks[first:self.blocks_needed(n)]
        idx = torch.tensor([r[index] for r in rows], dtype=torch.int64).to(self.device, non_blocking=True)
        j = self._place[layer][1]
        lo, hi = start - first * self.block_size, n - first * self.block_size
        k = self.kv[j, 0].index_select(0, idx).view(-1, self.n_kv_heads, self.head_dim)[lo:hi]
        if self.keys_only:
            return k, k
        v = self.kv[j, 1].index_select(0, idx).view(-1, self.n_kv_heads, self.head_dim)[lo:hi]
        return k, v

    def reset(self) -> None:
        """Free every sequence (the tensors are kept; their contents are stale)."""
        for sid in list(self._seqs):
            self.free_sequence(sid)

    def __repr__(self) -> str:
        groups = "" if self.num_groups == 1 else \
            f", groups={self.num_groups}x{self.layers_per_block} layers (windows {self.group_windows})"
        return (f"PagedKVCache(layers={self.num_layers}, blocks={self.num_blocks}x"
                f"{self.block_size}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype}, device={self.device}, free={self.num_free_blocks}, "
                f"sequences={len(self._seqs)}{groups}{', keys only' if self.keys_only else ''})")
