"""Paged KV cache: allocated once, handed out to sequences in fixed-size blocks.

One long rollout (128K tokens) and many short ones share the same memory: a sequence owns a
list of physical blocks (its *block table*), grown on demand, and returns them to the free
list when it finishes, so a waiting request can join the running batch (continuous batching).

Layout (per layer): ``k_cache(layer)`` and ``v_cache(layer)`` are views of shape
``(num_blocks, block_size, n_kv_heads, head_dim)`` into one tensor allocated at construction,
``(num_layers, 2, num_blocks + 1, block_size, n_kv_heads, head_dim)``; the extra block is a
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

Everything here is host-side bookkeeping in Python (cheap: O(blocks touched)); tensors built
for the device (block tables, slot mappings) are created on the CPU and copied with
``non_blocking=True``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Hashable, Iterable, List, Optional, Sequence, Union

import torch

__all__ = [
    "OutOfBlocks",
    "BlockAllocator",
    "PagedKVCache",
    "blocks_for_memory",
    "bytes_per_block",
]


class OutOfBlocks(RuntimeError):
    """Raised when an allocation needs more free blocks than the cache has left."""


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def bytes_per_block(num_layers: int, block_size: int, n_kv_heads: int, head_dim: int,
                    dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one block takes across all layers, K and V together."""
    return 2 * num_layers * block_size * n_kv_heads * head_dim * _dtype_size(dtype)


def blocks_for_memory(memory_bytes: int, num_layers: int, block_size: int, n_kv_heads: int,
                      head_dim: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """How many blocks fit in ``memory_bytes`` (e.g. free GPU memory times a utilisation
    fraction, after weights and activations)."""
    per = bytes_per_block(num_layers, block_size, n_kv_heads, head_dim, dtype)
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


@dataclass
class _Seq:
    blocks: List[int] = field(default_factory=list)
    length: int = 0
    _table: Optional[torch.Tensor] = None  # int32 copy of `blocks`, rebuilt when they change

    def table(self) -> torch.Tensor:
        n_old = 0 if self._table is None else self._table.numel()
        if self._table is None or n_old != len(self.blocks):
            new = torch.tensor(self.blocks[n_old:], dtype=torch.int32)
            # blocks only ever grow at the end while the cache is valid (truncate resets it)
            self._table = new if n_old == 0 else torch.cat([self._table, new])
        return self._table


PositionsLike = Union[torch.Tensor, Sequence[Union[torch.Tensor, Sequence[int], range]]]


class PagedKVCache:
    """K/V for ``num_layers`` layers in ``num_blocks`` blocks of ``block_size`` tokens.

    Args:
        num_layers, num_blocks, block_size, n_kv_heads, head_dim: geometry (``n_kv_heads`` is
            the number of kv heads held on this rank, i.e. already divided by tp).
        dtype, device: of the cache tensors.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, n_kv_heads: int,
                 head_dim: int, dtype: torch.dtype = torch.bfloat16,
                 device: Union[str, torch.device] = "cpu"):
        if min(num_layers, block_size, n_kv_heads, head_dim) < 1 or num_blocks < 0:
            raise ValueError("num_layers, block_size, n_kv_heads, head_dim must be >= 1 and "
                             "num_blocks >= 0")
        self.num_layers = int(num_layers)
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.n_kv_heads = int(n_kv_heads)
        self.head_dim = int(head_dim)
        self.dtype = dtype
        self.device = torch.device(device)
        # one extra, never allocated, scratch block at the end receives padding rows' writes
        self.kv = torch.zeros(self.num_layers, 2, self.num_blocks + 1, self.block_size,
                              self.n_kv_heads, self.head_dim, dtype=dtype, device=self.device)
        self._scratch_slot = self.num_blocks * self.block_size
        self.allocator = BlockAllocator(self.num_blocks)
        self._seqs: Dict[Hashable, _Seq] = {}

    @classmethod
    def from_memory(cls, memory_bytes: int, num_layers: int, block_size: int, n_kv_heads: int,
                    head_dim: int, dtype: torch.dtype = torch.bfloat16, device="cpu"):
        """A cache with as many blocks as fit in ``memory_bytes``."""
        n = blocks_for_memory(memory_bytes, num_layers, block_size, n_kv_heads, head_dim, dtype)
        n = max(0, n - 1)  # the scratch block
        return cls(num_layers, n, block_size, n_kv_heads, head_dim, dtype, device)

    # ------------------------------------------------------------------ tensors
    def k_cache(self, layer: int) -> torch.Tensor:
        """(num_blocks, block_size, n_kv_heads, head_dim) view of layer's K."""
        return self.kv[layer, 0, :self.num_blocks]

    def v_cache(self, layer: int) -> torch.Tensor:
        """(num_blocks, block_size, n_kv_heads, head_dim) view of layer's V."""
        return self.kv[layer, 1, :self.num_blocks]

    @property
    def bytes_per_block(self) -> int:
        return bytes_per_block(self.num_layers, self.block_size, self.n_kv_heads, self.head_dim,
                               self.dtype)

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
        return -(-int(tokens) // self.block_size)

    def can_allocate(self, tokens: int, seq_id: Optional[Hashable] = None) -> bool:
        """Whether ``tokens`` more tokens fit: for a new sequence (``seq_id=None``), or on top
        of ``seq_id``'s current length (its partly filled last block counts)."""
        if seq_id is None:
            return self.allocator.can_allocate(self.blocks_needed(tokens))
        s = self._seq(seq_id)
        need = self.blocks_needed(s.length + int(tokens)) - len(s.blocks)
        return self.allocator.can_allocate(max(0, need))

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
        self._seqs[seq_id] = _Seq()
        if length:
            try:
                self.ensure_capacity(seq_id, length)
            except OutOfBlocks:
                del self._seqs[seq_id]
                raise

    def ensure_capacity(self, seq_id: Hashable, new_len: int) -> List[int]:
        """Make room for ``new_len`` tokens and set the length to ``max(length, new_len)``.

        Returns the newly allocated block ids. All or nothing: raises ``OutOfBlocks`` (and
        changes nothing) when the free blocks do not suffice."""
        s = self._seq(seq_id)
        need = self.blocks_needed(new_len) - len(s.blocks)
        new = self.allocator.allocate(need) if need > 0 else []
        s.blocks.extend(new)
        s.length = max(s.length, int(new_len))
        return new

    def truncate(self, seq_id: Hashable, new_len: int) -> None:
        """Shrink a sequence to ``new_len`` tokens, freeing blocks it no longer needs."""
        s = self._seq(seq_id)
        if not 0 <= new_len <= s.length:
            raise ValueError(f"new_len {new_len} not in [0, {s.length}]")
        keep = self.blocks_needed(new_len)
        self.allocator.free(s.blocks[keep:])
        del s.blocks[keep:]
        s._table = None
        s.length = int(new_len)

    def free_sequence(self, seq_id: Hashable) -> None:
        """Forget a sequence and return its blocks (those not shared with another sequence)."""
        s = self._seqs.pop(seq_id)
        self.allocator.free(s.blocks)

    def fork(self, src_id: Hashable, dst_id: Hashable) -> None:
        """New sequence ``dst_id`` with the same cached tokens as ``src_id``.

        Full blocks are shared (reference counted); a partly filled last block is copied in
        every layer, so later writes to either sequence never touch a shared block."""
        s = self._seq(src_id)
        if dst_id in self._seqs:
            raise KeyError(f"sequence {dst_id!r} already exists")
        full = s.length // self.block_size
        partial = len(s.blocks) > full and s.length % self.block_size != 0
        new = self.allocator.allocate(1) if partial else []
        self.allocator.share(s.blocks[:full])
        if partial:
            self.kv[:, :, new[0]].copy_(self.kv[:, :, s.blocks[full]])
        self._seqs[dst_id] = _Seq(blocks=s.blocks[:full] + new, length=s.length)

    def seq_len(self, seq_id: Hashable) -> int:
        return self._seq(seq_id).length

    def blocks(self, seq_id: Hashable) -> List[int]:
        return list(self._seq(seq_id).blocks)

    def block_table(self, seq_ids: Sequence[Hashable], max_blocks: Optional[int] = None,
                    device: Union[str, torch.device, None] = None) -> torch.Tensor:
        """(batch, max_blocks) int32 block ids, padded with 0 (the kernel never reads padding).

        ``max_blocks`` defaults to the longest table in the batch; pass a fixed width to keep
        shapes static (CUDA graphs)."""
        tables = [self._seq(i).table() for i in seq_ids]
        width = max((t.numel() for t in tables), default=0)
        if max_blocks is None:
            max_blocks = max(width, 1)
        elif width > max_blocks:
            raise ValueError(f"a sequence has {width} blocks > max_blocks={max_blocks}")
        out = torch.zeros(len(tables), max_blocks, dtype=torch.int32)
        for row, t in enumerate(tables):
            out[row, :t.numel()] = t
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
        """int64 flat slot of each new token, in the order the K/V rows will be given.

        ``positions`` is a (batch,) tensor (decode: one token per sequence), a (batch, T)
        tensor, or a list of per-sequence position lists/tensors/ranges (ragged prefill; rows
        packed in sequence order, as for varlen attention). A negative position marks a padding
        row and maps to slot -1 (skipped by ``write_slots``). Positions must be below the
        sequence's reserved capacity (``ensure_capacity`` first)."""
        bs = self.block_size
        if isinstance(positions, torch.Tensor) and positions.dim() == 1:
            # decode fast path: O(batch) host work, whatever the sequences' lengths
            if positions.shape[0] != len(seq_ids):
                raise ValueError(f"positions must be (batch,) or (batch, T) with batch="
                                 f"{len(seq_ids)}, got {tuple(positions.shape)}")
            out = []
            for sid, p in zip(seq_ids, positions.tolist()):
                if p < 0:
                    out.append(-1)
                    continue
                blocks = self._seq(sid).blocks
                if p >= len(blocks) * bs:
                    raise IndexError(f"sequence {sid!r}: position {p} beyond its reserved "
                                     f"capacity {len(blocks) * bs} (call ensure_capacity)")
                out.append(blocks[p // bs] * bs + p % bs)
            return self._to(torch.tensor(out, dtype=torch.int64), device)
        if isinstance(positions, torch.Tensor):
            pos = positions.detach().to("cpu", torch.int64)
            if pos.dim() not in (1, 2) or pos.shape[0] != len(seq_ids):
                raise ValueError(f"positions must be (batch,) or (batch, T) with batch="
                                 f"{len(seq_ids)}, got {tuple(pos.shape)}")
            table = self.block_table(seq_ids, device="cpu").long()
            p2 = pos if pos.dim() == 2 else pos[:, None]
            self._check_positions(seq_ids, p2)
            valid = p2 >= 0
            pc = p2.clamp(min=0)
            blk = torch.gather(table, 1, (pc // bs).clamp(max=table.shape[1] - 1))
            slots = torch.where(valid, blk * bs + pc % bs, torch.full_like(pc, -1)).reshape(-1)
        else:
            if len(positions) != len(seq_ids):
                raise ValueError(f"got {len(positions)} position lists for {len(seq_ids)} "
                                 "sequences")
            parts = []
            for sid, p in zip(seq_ids, positions):
                p = torch.as_tensor(list(p) if isinstance(p, range) else p,
                                    dtype=torch.int64).reshape(-1).cpu()
                self._check_positions([sid], p[None, :])
                blocks = self._seq(sid).table().long()
                if blocks.numel() == 0:
                    blocks = torch.zeros(1, dtype=torch.int64)
                pc = p.clamp(min=0)
                s = blocks[(pc // bs).clamp(max=blocks.numel() - 1)] * bs + pc % bs
                parts.append(torch.where(p >= 0, s, torch.full_like(s, -1)))
            slots = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return self._to(slots, device)

    def _check_positions(self, seq_ids, p2: torch.Tensor) -> None:
        if p2.numel() == 0:
            return
        cap = torch.tensor([len(self._seq(i).blocks) * self.block_size for i in seq_ids])
        bad = (p2 >= cap[:, None]).any(dim=1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise IndexError(f"sequence {seq_ids[row]!r}: position {int(p2[row].max())} beyond "
                             f"its reserved capacity {int(cap[row])} (call ensure_capacity)")

    def write_slots(self, layer: int, slots: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> None:
        """Scatter rows ``k[i], v[i]`` ((N, n_kv_heads, head_dim), or any shape whose leading
        dims flatten to N) into flat slots ``slots`` (N,); rows with slot -1 are skipped."""
        self.write_rows(layer, self.resolve_slots(slots), k, v)

    def resolve_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """``slots`` as ``write_rows`` takes them: int64 on the cache's device, padding (-1) sent
        to the scratch block (no host sync, no clash with real slots). Once per step: every
        layer writes the same slots."""
        slots = slots.to(self.device, torch.int64).reshape(-1)
        return torch.where(slots >= 0, slots, torch.full_like(slots, self._scratch_slot))

    def write_rows(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """``write_slots`` with slots from ``resolve_slots``."""
        k = k.reshape(-1, self.n_kv_heads, self.head_dim)
        v = v.reshape(-1, self.n_kv_heads, self.head_dim)
        if not (k.shape[0] == v.shape[0] == slots.shape[0]):
            raise ValueError(f"{slots.shape[0]} slots for {k.shape[0]} K rows and {v.shape[0]} "
                             "V rows")
        kf = self.kv[layer, 0].view(-1, self.n_kv_heads, self.head_dim)
        vf = self.kv[layer, 1].view(-1, self.n_kv_heads, self.head_dim)
        kf.index_copy_(0, slots, k.to(self.dtype))
        vf.index_copy_(0, slots, v.to(self.dtype))

    def write(self, layer: int, seq_ids: Sequence[Hashable], positions: PositionsLike,
              k: torch.Tensor, v: torch.Tensor) -> None:
        """Write new K/V of ``seq_ids`` at ``positions`` (see ``slot_mapping``) in ``layer``.

        k, v: (batch, n_kv_heads, head_dim) for one token per sequence, (batch, T, n_kv_heads,
        head_dim) for a (batch, T) positions tensor, or (total_tokens, n_kv_heads, head_dim)
        packed for ragged positions. For many layers compute ``slot_mapping`` once and call
        ``write_slots``."""
        self.write_slots(layer, self.slot_mapping(seq_ids, positions), k, v)

    def gather(self, layer: int, seq_id: Hashable, length: Optional[int] = None):
        """Contiguous (length, n_kv_heads, head_dim) K and V of one sequence (default: all of
        its tokens), e.g. to prefill on top of a cached prefix, or for tests."""
        s = self._seq(seq_id)
        n = s.length if length is None else int(length)
        if not 0 <= n <= len(s.blocks) * self.block_size:
            raise ValueError(f"length {n} beyond the sequence's capacity")
        nb = self.blocks_needed(n)
        idx = torch.tensor(s.blocks[:nb], dtype=torch.int64).to(self.device, non_blocking=True)
        k = self.kv[layer, 0].index_select(0, idx).view(-1, self.n_kv_heads, self.head_dim)[:n]
        v = self.kv[layer, 1].index_select(0, idx).view(-1, self.n_kv_heads, self.head_dim)[:n]
        return k, v

    def reset(self) -> None:
        """Free every sequence (the tensors are kept; their contents are stale)."""
        for sid in list(self._seqs):
            self.free_sequence(sid)

    def __repr__(self) -> str:
        return (f"PagedKVCache(layers={self.num_layers}, blocks={self.num_blocks}x"
                f"{self.block_size}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={self.dtype}, device={self.device}, free={self.num_free_blocks}, "
                f"sequences={len(self._seqs)})")
