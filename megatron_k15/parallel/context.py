"""Context parallelism: zigzag sharding of sequences across the cp group (DESIGN.md section 4).

A sequence of length ``S`` is cut into ``2 * cp`` equal chunks of ``c = S / (2 * cp)`` tokens.
Rank ``r`` keeps chunks ``r`` and ``2cp - 1 - r``, concatenated (first chunk first), so under a
causal mask every rank does the same amount of attention work::

    cp = 2, chunks 0 1 2 3:   rank 0 -> [0, 3]   rank 1 -> [1, 2]

Dense (padded) batches
    ``zigzag_split(x, dim, cp_size, cp_rank)``  this rank's two chunks along ``dim``
    ``zigzag_merge(chunks_per_rank, dim)``      pure inverse from every rank's local tensor
    ``zigzag_gather(x, dim, cp_size, group)``   all-gather over the cp group, then the inverse
                                                (autograd: the adjoint, a reduce-scatter)
    ``zigzag_position_ids(seq_len, cp_size, cp_rank)``  original positions of the local tokens
                                                (feed them to RoPE)

Packed variable-length sequences (THD layout, tokens along one dim, ``cu_seqlens`` boundaries)
    Every packed sequence is padded separately to a multiple of ``2 * cp`` and then zigzag split,
    so each rank holds ``2 * c_i`` tokens of sequence ``i`` (``c_i = padded_len_i / (2 cp)``) and
    all ranks share the same local ``cu_seqlens``.

    ``pad_to_multiple(lengths, multiple)``      padded lengths
    ``zigzag_varlen_layout(cu_seqlens, cp_size, cp_rank)``  index / positions / valid mask /
                                                local cu_seqlens / max_seqlen (no data touched)
    ``zigzag_split_varlen(x, cu_seqlens, cp_size, cp_rank, dim=0, pad_value=0)``
                                                -> (x_local, local_cu_seqlens, position_ids)
    ``zigzag_merge_varlen(chunks_per_rank, cu_seqlens, cp_size, dim=0)``  pure inverse
    ``zigzag_gather_varlen(x, cu_seqlens, cp_size, group, dim=0)``        all-gather + inverse
    ``split_packed_microbatch(mb, cp_size, cp_rank, tp_size)``  this rank's shard of a packed
                                                (1, n) training microbatch (every token tensor)

Padding tokens sit at the end of each sequence in the original order, so causal attention never
lets a real token see one; their position ids continue past the sequence length, and
``zigzag_varlen_layout(...).valid`` masks them out of losses.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist

from megatron_k15.parallel.tensor import gather_from_sequence_parallel_region

__all__ = [
    "zigzag_split",
    "zigzag_merge",
    "zigzag_gather",
    "zigzag_position_ids",
    "zigzag_chunk_ids",
    "pad_to_multiple",
    "ZigzagVarlenLayout",
    "zigzag_varlen_layout",
    "zigzag_split_varlen",
    "zigzag_merge_varlen",
    "zigzag_gather_varlen",
    "all_gather_cp",
]


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------


def _check_cp(cp_size: int, cp_rank: Optional[int] = None) -> None:
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size must be a positive int, got {cp_size!r}")
    if cp_rank is not None and not (0 <= int(cp_rank) < cp_size):
        raise ValueError(f"cp_rank must be in [0, {cp_size}), got {cp_rank}")


def _check_len(seq_len: int, cp_size: int, what: str = "sequence length") -> int:
    n_chunks = 2 * cp_size
    if seq_len % n_chunks:
        raise ValueError(
            f"{what} {seq_len} is not a multiple of 2 * context_parallel_size = {n_chunks}; "
            f"pad it to {pad_to_multiple([seq_len], n_chunks)[0]} (packed sequences: use "
            "zigzag_split_varlen, which pads every sequence)")
    return seq_len // n_chunks


def zigzag_chunk_ids(cp_size: int, cp_rank: int) -> tuple[int, int]:
    """The two chunk indices (of ``2 * cp_size``) that rank ``cp_rank`` holds."""
    _check_cp(cp_size, cp_rank)
    return cp_rank, 2 * cp_size - 1 - cp_rank


# ----------------------------------------------------------------------------------------------
# Dense sequences
# ----------------------------------------------------------------------------------------------


def zigzag_split(x: torch.Tensor, dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This rank's zigzag shard of ``x`` along ``dim``: chunks ``cp_rank`` and
    ``2 * cp_size - 1 - cp_rank`` of ``2 * cp_size``, concatenated. Differentiable (a copy)."""
    _check_cp(cp_size, cp_rank)
    if cp_size == 1:
        return x
    c = _check_len(x.shape[dim], cp_size)
    a, b = zigzag_chunk_ids(cp_size, cp_rank)
    return torch.cat([x.narrow(dim, a * c, c), x.narrow(dim, b * c, c)], dim=dim)


def zigzag_merge(chunks_per_rank: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """Inverse of :func:`zigzag_split`: the full tensor from every rank's local tensor, listed
    in cp-rank order. Pure (no communication); differentiable."""
    cp_size = len(chunks_per_rank)
    _check_cp(cp_size)
    if cp_size == 1:
        return chunks_per_rank[0]
    local = chunks_per_rank[0].shape[dim]
    if local % 2:
        raise ValueError(f"local length {local} along dim {dim} is odd; expected two chunks")
    for r, t in enumerate(chunks_per_rank):
        if t.shape[dim] != local:
            raise ValueError(f"rank {r} holds {t.shape[dim]} along dim {dim}, rank 0 {local}")
    c = local // 2
    ordered: list[Optional[torch.Tensor]] = [None] * (2 * cp_size)
    for r, t in enumerate(chunks_per_rank):
        a, b = zigzag_chunk_ids(cp_size, r)
        ordered[a] = t.narrow(dim, 0, c)
        ordered[b] = t.narrow(dim, c, c)
    return torch.cat(ordered, dim=dim)


def zigzag_position_ids(seq_len: int, cp_size: int, cp_rank: int,
                        device: Optional[torch.device | str] = None) -> torch.Tensor:
    """Original positions (int64, ``(seq_len / cp_size,)``) of this rank's zigzag tokens."""
    _check_cp(cp_size, cp_rank)
    c = _check_len(int(seq_len), cp_size)
    a, b = zigzag_chunk_ids(cp_size, cp_rank)
    return torch.cat([torch.arange(a * c, (a + 1) * c, device=device),
                      torch.arange(b * c, (b + 1) * c, device=device)])


# -- autograd-aware all-gather along dim 0 over a process group -------------------------------


def _group_size(group) -> int:
    return dist.get_world_size(group)


def all_gather_cp(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in group-rank order. Differentiable: the
    gradient of rank r's input is the sum over ranks of the gradient of slice r (reduce-scatter)."""
    if group is None or _group_size(group) == 1:
        return x
    gathered = gather_from_sequence_parallel_region(x.movedim(dim, 0).contiguous(), group)
    return gathered.movedim(0, dim)


def zigzag_gather(x: torch.Tensor, dim: int, cp_size: int, group=None) -> torch.Tensor:
    """Inverse of :func:`zigzag_split`.

    With a ``group`` (the cp group, ``cp_size`` ranks), ``x`` is this rank's local shard: it is
    all-gathered and put back in the original order, on every rank. Autograd sends back the
    adjoint (reduce-scatter, summed over ranks), so a loss computed *per rank* on the gathered
    tensor gives each rank the total gradient of its shard.

    Without a group, ``x`` must already be the concatenation of every rank's shard along ``dim``
    in rank order (e.g. gathered elsewhere); only the reordering is done.
    """
    _check_cp(cp_size)
    if cp_size == 1:
        return x
    if group is not None:
        if _group_size(group) != cp_size:
            raise ValueError(f"group has {_group_size(group)} ranks but cp_size is {cp_size}")
        x = all_gather_cp(x, dim, group)
    if x.shape[dim] % cp_size:
        raise ValueError(f"gathered length {x.shape[dim]} is not a multiple of cp_size {cp_size}")
    return zigzag_merge(list(x.chunk(cp_size, dim=dim)), dim)


# ----------------------------------------------------------------------------------------------
# Packed variable-length sequences
# ----------------------------------------------------------------------------------------------


def pad_to_multiple(lengths, multiple: int) -> list[int]:
    """Each length rounded up to a multiple of ``multiple`` (a list of ints; accepts a tensor)."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.tolist()
    out = []
    for n in lengths:
        n = int(n)
        if n < 0:
            raise ValueError(f"negative sequence length {n}")
        out.append(-(-n // multiple) * multiple)
    return out


def _cu_to_lengths(cu_seqlens) -> list[int]:
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must be 1-D with >= 2 entries, got shape "
                             f"{tuple(cu_seqlens.shape)}")
        cu = [int(v) for v in cu_seqlens.tolist()]
    else:
        cu = [int(v) for v in cu_seqlens]
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError("cu_seqlens must be non-decreasing")
    return lengths


class ZigzagVarlenLayout(NamedTuple):
    """Where this rank's packed tokens come from (see :func:`zigzag_varlen_layout`)."""

    index: torch.Tensor         # (T_local,) int64 index into the original packed tokens; -1: pad
    valid: torch.Tensor         # (T_local,) bool, False for padding tokens
    position_ids: torch.Tensor  # (T_local,) int64 position inside the original sequence
    cu_seqlens: torch.Tensor    # (n_seq + 1,) int32 local boundaries (the same on every rank)
    max_seqlen: int             # longest local sequence (2 * max c_i)
    padded_lengths: list        # per-sequence length after padding to a multiple of 2 * cp
    lengths: list               # original per-sequence lengths


def zigzag_varlen_layout(cu_seqlens, cp_size: int, cp_rank: int,
                         device: Optional[torch.device | str] = None) -> ZigzagVarlenLayout:
    """Layout of this rank's zigzag shard of packed sequences delimited by ``cu_seqlens``
    (original, unpadded). Each sequence is padded to a multiple of ``2 * cp_size`` and split
    into ``2 * cp_size`` chunks of ``c_i``; the rank keeps chunks ``r`` and ``2cp-1-r`` of every
    sequence, so local sequence ``i`` has ``2 * c_i`` tokens: ``[chunk r | chunk 2cp-1-r]``."""
    _check_cp(cp_size, cp_rank)
    if device is None and isinstance(cu_seqlens, torch.Tensor):
        device = cu_seqlens.device
    lengths = _cu_to_lengths(cu_seqlens)
    padded = pad_to_multiple(lengths, 2 * cp_size)
    a, b = zigzag_chunk_ids(cp_size, cp_rank)
    index, positions, local_cu = [], [], [0]
    start = 0
    for n, p in zip(lengths, padded):
        c = p // (2 * cp_size)
        pos = torch.cat([torch.arange(a * c, (a + 1) * c), torch.arange(b * c, (b + 1) * c)])
        positions.append(pos)
        index.append(torch.where(pos < n, pos + start, torch.full_like(pos, -1)))
        local_cu.append(local_cu[-1] + 2 * c)
        start += n
    if index:
        index_t = torch.cat(index)
        pos_t = torch.cat(positions)
    else:
        index_t = pos_t = torch.zeros(0, dtype=torch.int64)
    max_seqlen = max((local_cu[i + 1] - local_cu[i] for i in range(len(lengths))), default=0)
    return ZigzagVarlenLayout(
        index=index_t.to(device), valid=(index_t >= 0).to(device), position_ids=pos_t.to(device),
        cu_seqlens=torch.tensor(local_cu, dtype=torch.int32, device=device),
        max_seqlen=int(max_seqlen), padded_lengths=padded, lengths=lengths)


class VarlenShard(NamedTuple):
    x: torch.Tensor             # this rank's tokens (padding filled with pad_value)
    cu_seqlens: torch.Tensor    # local int32 boundaries
    position_ids: torch.Tensor  # original positions (for RoPE)


def zigzag_split_varlen(x: torch.Tensor, cu_seqlens, cp_size: int, cp_rank: int, dim: int = 0,
                        pad_value=0) -> VarlenShard:
    """Zigzag-split every packed sequence of ``x`` (tokens along ``dim``) separately.

    Returns ``(x_local, local_cu_seqlens, position_ids)``; each sequence is padded with
    ``pad_value`` to a multiple of ``2 * cp_size`` first. Differentiable in ``x`` (padding gets
    no gradient). Use :func:`zigzag_varlen_layout` for the valid-token mask and max_seqlen.
    """
    lay = zigzag_varlen_layout(cu_seqlens, cp_size, cp_rank, device=x.device)
    total = sum(lay.lengths)
    if x.shape[dim] != total:
        raise ValueError(f"x has {x.shape[dim]} tokens along dim {dim} but cu_seqlens ends at "
                         f"{total}")
    picked = x.index_select(dim, lay.index.clamp(min=0))
    if not bool(lay.valid.all()):
        shape = [1] * x.dim()
        shape[dim] = -1
        mask = lay.valid.view(shape)
        picked = torch.where(mask, picked, torch.as_tensor(pad_value, dtype=x.dtype,
                                                           device=x.device))
    return VarlenShard(picked, lay.cu_seqlens, lay.position_ids)


def zigzag_merge_varlen(chunks_per_rank: Sequence[torch.Tensor], cu_seqlens, dim: int = 0,
                        keep_padding: bool = False) -> torch.Tensor:
    """Inverse of :func:`zigzag_split_varlen` from every rank's local tensor (cp-rank order):
    the original packed tensor (padding dropped, or kept at each sequence's end with
    ``keep_padding=True``). Pure; differentiable."""
    cp_size = len(chunks_per_rank)
    _check_cp(cp_size)
    lengths = _cu_to_lengths(cu_seqlens)
    padded = pad_to_multiple(lengths, 2 * cp_size)
    local_total = sum(p // cp_size for p in padded)
    for r, t in enumerate(chunks_per_rank):
        if t.shape[dim] != local_total:
            raise ValueError(f"rank {r} holds {t.shape[dim]} tokens along dim {dim}; the layout "
                             f"of cu_seqlens needs {local_total}")
    pieces = []
    offset = 0
    for n, p in zip(lengths, padded):
        loc = p // cp_size
        seq = zigzag_merge([t.narrow(dim, offset, loc) for t in chunks_per_rank], dim)
        pieces.append(seq if keep_padding else seq.narrow(dim, 0, n))
        offset += loc
    if not pieces:
        return chunks_per_rank[0].narrow(dim, 0, 0)
    return torch.cat(pieces, dim=dim)


def zigzag_gather_varlen(x: torch.Tensor, cu_seqlens, cp_size: int, group=None, dim: int = 0,
                         keep_padding: bool = False) -> torch.Tensor:
    """All-gather this rank's packed shard over the cp ``group`` and undo the zigzag split
    (autograd: reduce-scatter, like :func:`zigzag_gather`). Without a group ``x`` must already
    be every rank's shard concatenated along ``dim`` in rank order."""
    _check_cp(cp_size)
    if group is not None:
        if _group_size(group) != cp_size:
            raise ValueError(f"group has {_group_size(group)} ranks but cp_size is {cp_size}")
        x = all_gather_cp(x, dim, group)
    return zigzag_merge_varlen(list(x.chunk(cp_size, dim=dim)), cu_seqlens, dim=dim,
                               keep_padding=keep_padding)


def packed_microbatch_length(cu_seqlens, seq_len: int, cp_size: int, tp_size: int = 1) -> int:
    """Packed length of a microbatch after context-parallel padding: every sample padded to a
    multiple of 2*cp, the total rounded up to a multiple of cp * lcm(2, tp) (the local length is
    then even and divisible by tp for sequence parallelism). It is ``seq_len`` rounded up to that
    multiple unless the per-sample padding needs more, so it is fixed for a given run in the
    common case and always the same on every rank that shares the microbatch (tp, cp, pp)."""
    import math

    padded = sum(pad_to_multiple(_cu_to_lengths(cu_seqlens), 2 * cp_size))
    multiple = cp_size * math.lcm(2, tp_size)
    return -(-max(padded, seq_len) // multiple) * multiple


def split_packed_microbatch(mb: dict, cp_size: int, cp_rank: int, tp_size: int = 1) -> dict:
    """This cp rank's zigzag shard of a packed microbatch: one row of n tokens with
    ``cu_seqlens`` boundaries (SFT's ``PackedSFTStream.microbatch``, RL's packed trajectories).

    Every packed sequence is padded to a multiple of 2*cp (pad entries are 0: token id 0, label
    0, loss mask 0; they sit at the end of their sequence, so causal attention never shows them
    to a real token) and the last one is extended so the row has ``packed_microbatch_length``
    tokens. Every (1, n) tensor of ``mb`` (ids, labels, masks, per-token values) becomes its
    (1, length / cp) shard; adds ``position_ids`` (original positions, for RoPE), the local
    ``cu_seqlens`` (the same on every cp rank) and ``max_seqlen``; anything else travels
    unchanged."""
    if cp_size == 1:
        return mb
    cu = mb["cu_seqlens"].to(torch.int64).cpu()
    n = int(cu[-1])
    if mb["input_ids"].shape != (1, n):
        raise ValueError(f"expected one packed row of {n} tokens, got input_ids "
                         f"{tuple(mb['input_ids'].shape)}")
    target = packed_microbatch_length(cu, n, cp_size, tp_size)
    lengths = (cu[1:] - cu[:-1]).tolist()
    padded = pad_to_multiple(lengths, 2 * cp_size)
    # the last sequence absorbs the rest of the row: its length becomes a multiple of 2*cp
    grow = target - sum(padded) + padded[-1] - lengths[-1]
    cu_ext = cu.clone()
    cu_ext[-1] += grow
    lay = zigzag_varlen_layout(cu_ext, cp_size, cp_rank)
    index, valid = lay.index.clamp(min=0), lay.valid
    out = {}
    for key, x in mb.items():
        if not (isinstance(x, torch.Tensor) and x.shape == (1, n)):
            continue
        if grow:
            x = torch.cat([x, x.new_zeros((1, grow))], dim=1)
        local = x.index_select(1, index.to(x.device))
        out[key] = torch.where(valid.to(x.device)[None], local, torch.zeros_like(local))
    out["position_ids"] = lay.position_ids[None].to(mb["input_ids"].device)
    out["cu_seqlens"] = lay.cu_seqlens.to(mb["cu_seqlens"].device)
    out["max_seqlen"] = lay.max_seqlen
    for k, v in mb.items():  # anything else travels unchanged
        out.setdefault(k, v)
    return out
