"""How the model's parameters split across tensor- and pipeline-parallel ranks.

The *full* state dict is the tp=1, pp=1 one, keyed with global layer numbers
(``layers.{i}.…``). Each tp rank's shard of a parameter follows from one rule per name:

    embedding.weight, output_layer.weight, linear_qkv.*   rows split in tp contiguous chunks
    linear_q_proj, linear_q_up_proj, linear_kv_up_proj    (MLA) rows split: a rank's heads
    linear_fc1.weight                                     [gate; up]: each rank gets [gate_r; up_r]
                                                          (the dense MLP's and the shared expert's)
    linear_proj.weight, linear_fc2.weight                 columns split in tp chunks
    mlp.experts.linear_fc1.weight (E, 2f, h)              per expert [gate_r; up_r] (dim 1)
    mlp.experts.linear_fc2.weight (E, h, f)               per expert columns (dim 2)
    q_norm_all_heads / k_norm_all_heads.weight (OLMo)     split in tp chunks (a rank's heads)
    self_attention.sinks (gpt-oss)                        split in tp chunks (a rank's heads)
    mlp.experts.linear_fc1.bias (E, 2f)                   per expert [gate_r; up_r] (dim 1)
    other norms, mlp.router.* (with DeepSeek's expert_bias), linear_proj.bias,
    MLA's down projections and their norms,
    mlp.experts.linear_fc2.bias                           replicated

Pipeline stage p owns a contiguous range of layers; the first stage also owns the embedding,
the last the final norm and the output layer. Checkpoint conversion and resharding use only
``split_tensor`` / ``split_for_rank``, ``merge_tensor`` / ``merge_shards`` and ``reshard_tensor``
(a rank's part straight from another layout's shards), so any (tp, pp) layout reshards to any other.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

_LAYER = re.compile(r"^layers\.(\d+)\.")


def shard_rule(name: str) -> tuple[Optional[int], int]:
    """(dim split across tp or None if replicated, number of fused parts interleaved)."""
    if name.endswith(".experts.linear_fc1.weight") or name.endswith(".experts.linear_fc1.bias"):
        return 1, 2
    if name.endswith(".experts.linear_fc2.weight"):
        return 2, 1
    if name.endswith("linear_fc1.weight"):
        return 0, 2
    if name in ("embedding.weight", "output_layer.weight") or ".linear_qkv." in name:
        return 0, 1
    if name.endswith((".linear_q_proj.weight", ".linear_q_up_proj.weight", ".linear_kv_up_proj.weight")):
        return 0, 1  # MLA: rows by head
    if name.endswith("_norm_all_heads.weight") or name.endswith("self_attention.sinks"):
        return 0, 1
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        return 1, 1
    return None, 1


def split_tensor(t: torch.Tensor, name: str, tp_size: int, tp_rank: int) -> torch.Tensor:
    dim, parts = shard_rule(name)
    if dim is None or tp_size == 1:
        return t
    if t.shape[dim] % (tp_size * parts):
        raise ValueError(f"{name}: dim {dim} of size {t.shape[dim]} does not split into {tp_size} tp shards")
    pieces = [p.chunk(tp_size, dim=dim)[tp_rank] for p in t.chunk(parts, dim=dim)]
    return torch.cat(pieces, dim=dim).contiguous()


def merge_tensor(shards: list[torch.Tensor], name: str) -> torch.Tensor:
    dim, parts = shard_rule(name)
    if dim is None or len(shards) == 1:
        return shards[0]
    per_part = [s.chunk(parts, dim=dim) for s in shards]
    return torch.cat([torch.cat([p[i] for p in per_part], dim=dim) for i in range(parts)], dim=dim)


def pipeline_layer_ranges(num_layers: int, pp_size: int,
                          first_stage_layers: Optional[int] = None,
                          last_stage_layers: Optional[int] = None) -> list[range]:
    """Global layer numbers owned by each pipeline stage (even split unless told otherwise)."""
    if pp_size == 1:
        return [range(num_layers)]
    first = first_stage_layers
    last = last_stage_layers
    middle_stages = pp_size - (first is not None) - (last is not None)
    remaining = num_layers - (first or 0) - (last or 0)
    if remaining < 0 or (middle_stages == 0 and remaining != 0) or (
        middle_stages > 0 and remaining < middle_stages
    ):
        raise ValueError(
            f"cannot split {num_layers} layers into {pp_size} pipeline stages with "
            f"first={first} last={last} layers; every stage needs at least one layer"
        )
    sizes = []
    if middle_stages:
        base, extra = divmod(remaining, middle_stages)
        sizes = [base + (1 if i < extra else 0) for i in range(middle_stages)]
    if first is not None:
        sizes.insert(0, first)
    if last is not None:
        sizes.append(last)
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges


def layer_number(name: str) -> Optional[int]:
    """The global layer of a ``layers.{i}.…`` name; None for the embedding, final norm, head."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def stage_owns(name: str, pp_rank: int, pp_size: int, layers: range, tied: bool) -> bool:
    layer = layer_number(name)
    if layer is not None:
        return layer in layers
    if name == "embedding.weight":
        return pp_rank == 0 or (tied and pp_rank == pp_size - 1)
    if name in ("final_layernorm.weight", "output_layer.weight"):
        return pp_rank == pp_size - 1
    raise KeyError(f"unknown parameter name {name!r}")


VOCAB_PARAMS = ("embedding.weight", "output_layer.weight")


def pad_vocab(t: torch.Tensor, padded_size: int) -> torch.Tensor:
    """Append zero rows up to the padded vocabulary (the model masks their logits to -inf)."""
    if t.shape[0] == padded_size:
        return t
    return torch.cat([t, t.new_zeros((padded_size - t.shape[0],) + tuple(t.shape[1:]))], dim=0)


def split_for_rank(full: dict[str, torch.Tensor], tp_size: int, tp_rank: int, pp_size: int,
                   pp_rank: int, num_layers: int, tied: bool, padded_vocab_size: int,
                   layer_ranges: Optional[list[range]] = None) -> dict[str, torch.Tensor]:
    """The parameters one (tp_rank, pp_rank) holds, from the full (unpadded) state dict."""
    ranges = layer_ranges or pipeline_layer_ranges(num_layers, pp_size)
    out = {}
    for name, tensor in full.items():
        if stage_owns(name, pp_rank, pp_size, ranges[pp_rank], tied):
            if name in VOCAB_PARAMS:
                tensor = pad_vocab(tensor, padded_vocab_size)
            out[name] = split_tensor(tensor, name, tp_size, tp_rank)
    return out


def merge_shards(shards: dict[tuple[int, int], dict[str, torch.Tensor]],
                 vocab_size: int) -> dict[str, torch.Tensor]:
    """Inverse of ``split_for_rank``: {(tp_rank, pp_rank): state} -> the full state dict with
    the vocabulary padding removed."""
    tp_size = 1 + max(t for t, _ in shards)
    pp_size = 1 + max(p for _, p in shards)
    full: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp_size):
        names = list(shards[(0, pp_rank)])
        for name in names:
            if name in full:  # tied embedding also held by the last stage
                continue
            full[name] = merge_unpadded([shards[(t, pp_rank)][name] for t in range(tp_size)], name, vocab_size)
    return full


def merge_unpadded(shards: list[torch.Tensor], name: str, vocab_size: int) -> torch.Tensor:
    """``merge_tensor``, with the vocabulary padding of the embedding and head removed."""
    full = merge_tensor(shards, name)
    return full[:vocab_size].contiguous() if name in VOCAB_PARAMS else full


def reshard_tensor(shards: list[torch.Tensor], name: str, tp_size: int, tp_rank: int,
                   vocab_size: int, padded_vocab_size: int) -> torch.Tensor:
    """``split_tensor(pad(merge_tensor(shards)[:vocab]), tp_size, tp_rank)`` without building
    the merged tensor: rank ``tp_rank``'s rows (or columns) are cut out of the saved shards
    where they lie (a new tensor; the shards may be memory-mapped files). Only the vocabulary
    tensors, whose padding depends on the tp size, are merged first."""
    dim, parts = shard_rule(name)
    if name in VOCAB_PARAMS:
        full = pad_vocab(merge_unpadded(shards, name, vocab_size), padded_vocab_size)
        # tp > 1 splits into a new tensor; tp = 1 may hand back a saved (memory-mapped) one
        return split_tensor(full, name, tp_size, tp_rank) if tp_size > 1 else full.clone()
    if dim is None:
        return shards[0].clone()
    per_shard = shards[0].shape[dim] // parts  # one fused part's rows in one saved shard
    part_size = per_shard * len(shards)
    if part_size % tp_size:
        raise ValueError(f"{name}: dim {dim} of size {part_size * parts} does not split into {tp_size} tp shards")
    want = part_size // tp_size
    lo, hi = tp_rank * want, (tp_rank + 1) * want
    pieces = []
    for part in range(parts):
        for s, shard in enumerate(shards):
            a, b = max(lo, s * per_shard), min(hi, (s + 1) * per_shard)
            if a < b:
                pieces.append(shard.narrow(dim, part * per_shard + a - s * per_shard, b - a))
    return torch.cat(pieces, dim=dim)
