"""Preference (DPO) data: the JSONL records, the preprocessed dataset, and pair packing.

Records (``tools/build_long2short_data.py --mode dpo`` writes them, ``tools/preprocess_data.py
--mode dpo`` reads them): ``{"id": str (optional), "prompt": str, "chosen": str, "rejected":
str}``. Other fields are ignored.

``preprocess_data.py --mode dpo`` writes the same files as ``--mode sft`` (``PREFIX.bin/.idx``,
``PREFIX.loss_mask.bin/.idx``, ``PREFIX.json`` with ``"mode": "dpo"``) with two sequences per
pair, interleaved: sequence 2p is prompt + chosen of pair p, sequence 2p + 1 prompt + rejected,
each with a response-only loss mask. So the files are an ordinary megatron-core indexed
dataset and every SFT reader works on them; :class:`PreferenceDataset` adds the pairing.

``data.sft.PackedPairStream`` packs the pairs for training. No torch import here, so the
preprocessing CLI stays fast.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

from megatron_k15.data.indexed import (
    LOSS_MASK_SUFFIX,
    SUMMARY_SUFFIX,
    SFTSample,
    TokenMaskSequences,
    load_summary,
)
from megatron_k15.data.prompts import FieldError, _require_str

__all__ = [
    "DPO_MODE",
    "PreferencePair",
    "PreferenceDataset",
    "load_preference_dataset",
    "preference_dataset_files",
    "validate_preference_record",
]

DPO_MODE = "dpo"


def validate_preference_record(obj: Mapping) -> dict:
    """``{"id"?, "prompt", "chosen", "rejected"}`` checked and copied; FieldError if bad.
    ``prompt`` may be empty, ``chosen`` / ``rejected`` may not (nothing to score)."""
    rec = {field: _require_str(obj, field, non_empty=non_empty)
           for field, non_empty in (("prompt", False), ("chosen", True), ("rejected", True))}
    if obj.get("id") is not None:
        v = obj["id"]
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise FieldError("id", f"expected a string, got {type(v).__name__}")
        rec["id"] = str(v)
    return rec


def preference_dataset_files(prefix: str) -> list[str]:
    """The files of a ``--mode dpo`` dataset (the same set as ``--mode sft``)."""
    return [prefix + ".bin", prefix + ".idx", prefix + LOSS_MASK_SUFFIX + ".bin",
            prefix + LOSS_MASK_SUFFIX + ".idx", prefix + SUMMARY_SUFFIX]


class PreferencePair(NamedTuple):
    chosen: SFTSample
    rejected: SFTSample


class PreferenceDataset:
    """A ``--mode dpo`` dataset: ``ds[p]`` is a PreferencePair, ``ds.sequences`` the flat
    interleaved view that ``data.sft.PackedPairStream`` packs."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.summary = load_summary(prefix, DPO_MODE)
        self.sequences = TokenMaskSequences.from_prefix(prefix)
        if len(self.sequences) % 2:
            raise ValueError(f"{prefix}: {len(self.sequences)} sequences; a preference dataset holds "
                             f"pairs (an even number)")

    def __len__(self) -> int:
        return len(self.sequences) // 2

    def __getitem__(self, p: int) -> PreferencePair:
        p = int(p)
        if not 0 <= p < len(self):
            raise IndexError(f"pair {p} out of range for {len(self)} pairs")
        return PreferencePair(self.sequences[2 * p], self.sequences[2 * p + 1])

    def __iter__(self):
        for p in range(len(self)):
            yield self[p]


def load_preference_dataset(prefix: str) -> PreferenceDataset:
    return PreferenceDataset(prefix)
