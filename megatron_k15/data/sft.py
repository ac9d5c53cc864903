"""Sequence packing for SFT: samples -> fixed-length packed rows with per-sample boundaries.

A sample of n tokens gives n - 1 (input, label) positions; its loss mask is the response mask
shifted by one (a label is trained on when it is a response token). Samples are shuffled per
epoch (seed + epoch) and packed greedily into rows of ``seq_length`` positions; the rest of a
row is one padding segment with mask 0. Each row's ``cu_seqlens`` keeps attention inside its
samples. The stream of rows is endless (epoch after epoch), indexed by a global row number,
so ``consumed_rows`` alone is the exact data position for resuming. Preference pairs (DPO)
are packed two sequences at a time by :class:`PackedPairStream`.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Callable, Optional, Sequence

import numpy as np
import torch


class PackedSFTStream:
    def __init__(self, samples: Sequence, seq_length: int, seed: int, pad_id: int = 0,
                 lengths: Optional[Sequence[int]] = None,
                 epoch_order: Optional[Callable[[int], np.ndarray]] = None):
        """``samples[i]`` has ``.tokens`` and ``.loss_mask`` (as ``data.indexed.SFTSample``);
        ``lengths`` (token counts, e.g. a dataset's index) saves reading every sample;
        ``epoch_order(epoch)``: the units (samples; pairs) of an epoch in order, instead of a
        permutation of all of them (a weighted blend: ``data.blend.blended_epoch``)."""
        self.samples = samples
        self.epoch_order = epoch_order
        self.seq_length = seq_length
        self.seed = seed
        self.pad_id = pad_id
        if lengths is None:
            lengths = [len(s.tokens) for s in samples]
        self.positions = np.minimum(np.asarray(lengths, dtype=np.int64) - 1, seq_length)
        if not (self.positions > 0).any():
            raise ValueError("no SFT sample has at least 2 tokens")
        self._epochs: list[list[list[int]]] = []
        self._starts: list[int] = [0]

    def _order(self, epoch: int, units: int) -> np.ndarray:
        if self.epoch_order is not None:
            return self.epoch_order(epoch)
        return np.random.default_rng(self.seed + epoch).permutation(units)

    def _pack_epoch(self, epoch: int) -> list[list[int]]:
        order = self._order(epoch, len(self.samples))
        return self._pack([[int(i)] for i in order if self.positions[i] > 0])

    def _pack(self, units: list[list[int]]) -> list[list[int]]:
        """Greedy packing of units (lists of sample indices that stay together) into rows."""
        rows, current, used = [], [], 0
        for unit in units:
            n = int(sum(int(self.positions[i]) for i in unit))
            if used + n > self.seq_length and current:
                rows.append(current)
                current, used = [], 0
            current.extend(unit)
            used += n
        if current:
            rows.append(current)
        return rows

    def _row(self, index: int) -> list[int]:
        while index >= self._starts[-1]:
            rows = self._pack_epoch(len(self._epochs))
            if not rows:  # nothing of this epoch can be trained on: the next would be empty too
                raise ValueError(f"epoch {len(self._epochs)} packs no rows: none of its samples fits "
                                 f"--seq-length {self.seq_length} with 2 or more tokens")
            self._epochs.append(rows)
            self._starts.append(self._starts[-1] + len(rows))
        epoch = bisect_right(self._starts, index) - 1
        return self._epochs[epoch][index - self._starts[epoch]]

    def rows_in_epoch(self, epoch: int = 0) -> int:
        """How many rows epoch ``epoch`` packs into."""
        while len(self._epochs) <= epoch:
            self._row(self._starts[-1])
        return len(self._epochs[epoch])

    def rows(self, start: int, count: int) -> list[list[int]]:
        return [self._row(start + i) for i in range(count)]

    def epoch_of(self, row_index: int) -> int:
        self._row(row_index)
        return bisect_right(self._starts, row_index) - 1

    def loss_tokens(self, row: list[int]) -> int:
        return int(sum(int(np.asarray(self.samples[i].loss_mask[1:self.positions[i] + 1]).sum()) for i in row))

    def microbatch(self, rows: list[list[int]], with_seq_ids: bool = False) -> dict:
        """Rows concatenated into one packed (1, len(rows) * seq_length) microbatch;
        ``token_mask`` is 0 on each row's padding tail. With ``with_seq_ids`` also ``seq_ids``
        (1, n): the k-th sample of the microbatch is k on its positions, padding is -1."""
        ids, labels, mask, bounds, seq_ids = [], [], [], [0], []
        count = 0
        for row in rows:
            used = 0
            for i in row:
                n = int(self.positions[i])
                tok = np.asarray(self.samples[i].tokens, dtype=np.int64)[: n + 1]
                msk = np.asarray(self.samples[i].loss_mask, dtype=np.float32)[: n + 1]
                ids.append(tok[:-1])
                labels.append(tok[1:])
                mask.append(msk[1:])
                seq_ids.append(np.full(n, count, dtype=np.int64))
                count += 1
                used += n
                bounds.append(bounds[-1] + n)
            if used < self.seq_length:
                pad = self.seq_length - used
                ids.append(np.full(pad, self.pad_id, dtype=np.int64))
                labels.append(np.zeros(pad, dtype=np.int64))
                mask.append(np.zeros(pad, dtype=np.float32))
                seq_ids.append(np.full(pad, -1, dtype=np.int64))
                bounds.append(bounds[-1] + pad)
        cu = torch.tensor(bounds, dtype=torch.int32)
        seq_ids = torch.from_numpy(np.concatenate(seq_ids))[None]
        out = {
            "input_ids": torch.from_numpy(np.concatenate(ids))[None],
            "labels": torch.from_numpy(np.concatenate(labels))[None],
            "loss_mask": torch.from_numpy(np.concatenate(mask))[None],
            "token_mask": (seq_ids >= 0).to(torch.float32),
            "cu_seqlens": cu,
            "max_seqlen": int((cu[1:] - cu[:-1]).max()),
        }
        if with_seq_ids:
            out["seq_ids"] = seq_ids
        return out


class PackedPairStream(PackedSFTStream):
    """Preference pairs (DPO) packed whole into rows of ``seq_length`` positions (chosen and
    rejected in the same row, so a pair's loss is computed in one microbatch), shuffled per
    epoch (seed + epoch). A pair needs ``(len_c - 1) + (len_r - 1) <= seq_length`` positions;
    longer pairs are never truncated (that would change the sequence log-prob DPO compares)
    but left out and counted (``.dropped``).

    ``sequences`` is interleaved (2p chosen, 2p + 1 rejected; e.g. ``PreferenceDataset.sequences``
    or a list of SFTSamples). A row is a list of sequence indices ``[2p, 2p + 1, 2q, 2q + 1,
    ...]``; ``microbatch`` adds ``seq_ids`` (the sequence number of each position inside the
    microbatch, -1 on padding: chosen of its k-th pair = 2k, rejected = 2k + 1) and
    ``pair_index`` (the dataset index of each of its pairs)."""

    def __init__(self, sequences: Sequence, seq_length: int, seed: int, pad_id: int = 0,
                 lengths: Optional[Sequence[int]] = None,
                 epoch_order: Optional[Callable[[int], np.ndarray]] = None):
        if len(sequences) % 2:
            raise ValueError(f"{len(sequences)} sequences: a preference set holds pairs (an even number)")
        if lengths is None:
            lengths = getattr(sequences, "lengths", None)
        if lengths is None:
            lengths = [len(s.tokens) for s in sequences]
        raw = np.asarray(lengths, dtype=np.int64) - 1
        self.num_pairs = len(sequences) // 2
        need = raw[0::2] + raw[1::2]
        self.keep = (raw[0::2] >= 1) & (raw[1::2] >= 1) & (need <= seq_length)
        self.dropped = int(self.num_pairs - self.keep.sum())
        if not self.keep.any():
            raise ValueError(f"no preference pair fits in --seq-length {seq_length} (a pair needs "
                             f"len(prompt+chosen) + len(prompt+rejected) - 2 positions; the shortest "
                             f"needs {int(need.min()) if len(need) else 0})")
        super().__init__(sequences, seq_length, seed, pad_id, lengths=lengths, epoch_order=epoch_order)

    def _pack_epoch(self, epoch: int) -> list[list[int]]:
        order = self._order(epoch, self.num_pairs)
        return self._pack([[2 * int(p), 2 * int(p) + 1] for p in order if self.keep[p]])

    def reference_rows(self) -> list[list[int]]:
        """Every kept pair once, in dataset order (for the one-off reference pass)."""
        return self._pack([[2 * p, 2 * p + 1] for p in range(self.num_pairs) if self.keep[p]])

    @staticmethod
    def pairs_in(row: list[int]) -> int:
        return len(row) // 2

    def microbatch(self, rows: list[list[int]], with_seq_ids: bool = True) -> dict:
        mb = super().microbatch(rows, with_seq_ids=True)
        mb["pair_index"] = torch.tensor([i // 2 for row in rows for i in row[0::2]], dtype=torch.long)
        return mb
