"""Sequence packing for SFT: samples -> fixed-length packed rows with per-sample boundaries.

A sample of n tokens gives n - 1 (input, label) positions; its loss mask is the response mask
shifted by one (a label is trained on when it is a response token). Samples are shuffled per
epoch (seed + epoch) and packed greedily into rows of ``seq_length`` positions; the rest of a
row is one padding segment with mask 0. Each row's ``cu_seqlens`` keeps attention inside its
samples. The stream of rows is endless (epoch after epoch), indexed by a global row number,
so ``consumed_rows`` alone is the exact data position for resuming.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Sequence

import numpy as np
import torch


class PackedSFTStream:
    def __init__(self, samples: Sequence, seq_length: int, seed: int, pad_id: int = 0):
        """``samples[i]`` has ``.tokens`` and ``.loss_mask`` (as ``data.indexed.SFTSample``)."""
        self.samples = samples
        self.seq_length = seq_length
        self.seed = seed
        self.pad_id = pad_id
        self.positions = np.array([min(len(s.tokens) - 1, seq_length) for s in samples], dtype=np.int64)
        if not (self.positions > 0).any():
            raise ValueError("no SFT sample has at least 2 tokens")
        self._epochs: list[list[list[int]]] = []
        self._starts: list[int] = [0]

    def _pack_epoch(self, epoch: int) -> list[list[int]]:
        order = np.random.default_rng(self.seed + epoch).permutation(len(self.samples))
        rows, current, used = [], [], 0
        for i in order:
            n = int(self.positions[i])
            if n <= 0:
                continue
            if used + n > self.seq_length and current:
                rows.append(current)
                current, used = [], 0
            current.append(int(i))
            used += n
        if current:
            rows.append(current)
        return rows

    def _row(self, index: int) -> list[int]:
        while index >= self._starts[-1]:
            rows = self._pack_epoch(len(self._epochs))
            self._epochs.append(rows)
            self._starts.append(self._starts[-1] + len(rows))
        epoch = bisect_right(self._starts, index) - 1
        return self._epochs[epoch][index - self._starts[epoch]]

    def rows(self, start: int, count: int) -> list[list[int]]:
        return [self._row(start + i) for i in range(count)]

    def epoch_of(self, row_index: int) -> int:
        self._row(row_index)
        return bisect_right(self._starts, row_index) - 1

    def loss_tokens(self, row: list[int]) -> int:
        return int(sum(int(np.asarray(self.samples[i].loss_mask[1:self.positions[i] + 1]).sum()) for i in row))

    def microbatch(self, rows: list[list[int]]) -> dict:
        """Rows concatenated into one packed (1, len(rows) * seq_length) microbatch."""
        ids, labels, mask, bounds = [], [], [], [0]
        for row in rows:
            used = 0
            for i in row:
                n = int(self.positions[i])
                tok = np.asarray(self.samples[i].tokens, dtype=np.int64)[: n + 1]
                msk = np.asarray(self.samples[i].loss_mask, dtype=np.float32)[: n + 1]
                ids.append(tok[:-1])
                labels.append(tok[1:])
                mask.append(msk[1:])
                used += n
                bounds.append(bounds[-1] + n)
            if used < self.seq_length:
                pad = self.seq_length - used
                ids.append(np.full(pad, self.pad_id, dtype=np.int64))
                labels.append(np.zeros(pad, dtype=np.int64))
                mask.append(np.zeros(pad, dtype=np.float32))
                bounds.append(bounds[-1] + pad)
        cu = torch.tensor(bounds, dtype=torch.int32)
        return {
            "input_ids": torch.from_numpy(np.concatenate(ids))[None],
            "labels": torch.from_numpy(np.concatenate(labels))[None],
            "loss_mask": torch.from_numpy(np.concatenate(mask))[None],
            "cu_seqlens": cu,
            "max_seqlen": int((cu[1:] - cu[:-1]).max()),
        }
