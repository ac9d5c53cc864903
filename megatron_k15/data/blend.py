"""Several preprocessed datasets trained as one: Megatron-LM's data-blend syntax.

``--train-data A B C`` concatenates: one epoch is every sample of every dataset once, in one
shuffled order. ``--train-data 0.7 A 0.3 B`` blends: an epoch holds as many units (samples;
pairs for DPO) as the datasets together, of which dataset k contributes

    c_k = round(w_k / sum(w) * sum_j n_j)     (largest remainders, so they add up)

taken from k's own endless stream: its samples in a fresh shuffled order every pass
(numpy's generator seeded by (seed, k, pass)), continuing in the next epoch where this one
stopped. A dataset whose weight is above its share of the samples is repeated, one below it
is subsampled, and over enough epochs every sample is seen. The epoch's units are then
shuffled together (seeded by (seed, epoch)); everything is a function of the seed, so a
resumed run sees the same order.

Units that cannot be trained on (a sample under 2 tokens, a pair longer than --seq-length) are
dropped after the blend is drawn, so a dataset that loses more of them than the others gets a
little less than its weight. The datasets must have been tokenized alike (tokenizer,
vocabulary) and preprocessed in the same mode; ``check_compatible`` says which flag and prefix
differ.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple, Optional, Sequence

import numpy as np


class BlendError(ValueError):
    """A malformed blend or datasets that cannot be trained together; names the flag."""


class Blend(NamedTuple):
    prefixes: list[str]
    weights: Optional[list[float]]  # normalised to sum 1; None: concatenate

    def describe(self, sizes: Sequence[int], unit: str = "samples") -> str:
        if len(self.prefixes) == 1:
            return f"{sizes[0]} {unit}"
        if self.weights is None:
            return " + ".join(f"{n} {unit} of {p}" for p, n in zip(self.prefixes, sizes))
        return ", ".join(f"{100 * w:.1f}% {p} ({n} {unit})" for p, w, n in zip(self.prefixes, self.weights, sizes))


def _number(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def parse_blend(values: Sequence[str], flag: str, allow_weights: bool = True) -> Blend:
    """``PREFIX [PREFIX ...]`` or ``WEIGHT PREFIX [WEIGHT PREFIX ...]`` (Megatron-LM's
    ``--data-path``)."""
    values = list(values)
    if not values:
        raise BlendError(f"{flag} needs at least one dataset prefix")
    if _number(values[0]) is None:
        numeric = [v for v in values if _number(v) is not None]
        if numeric:
            raise BlendError(f"{flag}: {numeric[0]!r} looks like a weight but the first value is a prefix; give "
                             "either prefixes only or WEIGHT PREFIX pairs for every dataset")
        prefixes, weights = values, None
    else:
        if not allow_weights:
            raise BlendError(f"{flag} takes dataset prefixes only, no weights")
        if len(values) % 2:
            raise BlendError(f"{flag}: {len(values)} values; weights and prefixes come in pairs "
                             "(WEIGHT PREFIX WEIGHT PREFIX ...)")
        weights = [_number(v) for v in values[0::2]]
        prefixes = values[1::2]
        for w, p, raw in zip(weights, prefixes, values[0::2]):
            if w is None:
                raise BlendError(f"{flag}: {raw!r} before {p} is not a weight (WEIGHT PREFIX pairs)")
            if not (np.isfinite(w) and w > 0):
                raise BlendError(f"{flag}: the weight of {p} must be a finite number > 0, got {raw} (leave a "
                                 "dataset out of the blend to not train on it)")
            if _number(p) is not None:
                raise BlendError(f"{flag}: {p!r} after weight {raw} is a number, not a dataset prefix")
        total = sum(weights)
        weights = [w / total for w in weights]
    duplicates = sorted({p for p in prefixes if prefixes.count(p) > 1})
    if duplicates:
        raise BlendError(f"{flag}: {duplicates[0]} is given twice; give it once (with the summed weight)")
    return Blend(list(prefixes), weights)


def check_compatible(summaries: Sequence[dict], prefixes: Sequence[str], flag: str) -> None:
    """The datasets were preprocessed in one mode with one tokenizer."""
    first = summaries[0]
    for summary, prefix in zip(summaries[1:], prefixes[1:]):
        for key in ("mode", "tokenizer_name", "vocab_size", "eos_id"):
            if summary.get(key) != first.get(key):
                raise BlendError(f"{flag}: {prefix} has {key} {summary.get(key)!r} but {prefixes[0]} has "
                                 f"{first.get(key)!r}; preprocess every dataset of a blend with the same "
                                 "--mode and --tokenizer")


class ConcatSequences:
    """Datasets end to end: ``ds[i]`` is item ``i - offset_k`` of the dataset k that holds it;
    ``lengths`` (token counts) concatenated."""

    def __init__(self, parts: Sequence):
        self.parts = list(parts)
        self.offsets = [0]
        for part in self.parts:
            self.offsets.append(self.offsets[-1] + len(part))
        self.lengths = np.concatenate([np.asarray(part.lengths, dtype=np.int64) for part in self.parts])

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)}")
        k = bisect.bisect_right(self.offsets, i) - 1
        return self.parts[k][i - self.offsets[k]]


def blend_counts(sizes: Sequence[int], weights: Sequence[float]) -> list[int]:
    """Units per epoch of each dataset: its share of sum(sizes), rounded by largest remainders."""
    return largest_remainders(int(sum(sizes)), weights)


def largest_remainders(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` split by ``weights`` (summing to 1) into integers: floors, and one more each for
    the largest fractional parts until they add up (ties to the lower index)."""
    exact = [w * total for w in weights]
    counts = [int(np.floor(x)) for x in exact]
    order = sorted(range(len(exact)), key=lambda k: (-(exact[k] - counts[k]), k))
    for k in order[:total - sum(counts)]:
        counts[k] += 1
    return counts


def _stream(size: int, seed: int, k: int, start: int, count: int) -> np.ndarray:
    """Items start .. start + count of dataset k's endless stream of shuffled passes."""
    out, pos = [], start
    while pos < start + count:
        p, offset = divmod(pos, size)
        perm = np.random.default_rng([seed, k, p]).permutation(size)
        take = min(size - offset, start + count - pos)
        out.append(perm[offset:offset + take])
        pos += take
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def blended_epoch(sizes: Sequence[int], weights: Sequence[float], seed: int, epoch: int) -> np.ndarray:
    """Global unit indices (dataset k's item i is offset_k + i) of blend epoch ``epoch``."""
    counts = blend_counts(sizes, weights)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    picks = [offsets[k] + _stream(int(n), seed, k, epoch * c, c) for k, (n, c) in enumerate(zip(sizes, counts))
             if c > 0]
    units = np.concatenate(picks)
    return units[np.random.default_rng([seed, epoch]).permutation(len(units))]


SPLIT_PARTS = ("train", "valid", "test")


def parse_split(text: str, flag: str = "--split") -> tuple[float, float, float]:
    """Megatron-LM's ``--split 969,30,1`` (or ``969/30/1``; missing shares are 0): the train,
    validation and test shares of every dataset, normalised to sum 1."""
    raw = [t.strip() for t in text.replace("/", ",").split(",")]
    values = [_number(t) for t in raw]
    if not 1 <= len(raw) <= 3 or any(v is None or not np.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise BlendError(f"{flag} {text!r}: give up to three non-negative shares TRAIN,VALID,TEST (e.g. 98,2,0)")
    values += [0.0] * (3 - len(values))
    if values[0] <= 0:
        raise BlendError(f"{flag} {text!r}: the train share must be > 0")
    total = sum(values)
    return tuple(v / total for v in values)


class SliceSequences:
    """Items ``[start, stop)`` of a dataset, re-indexed from 0 (one part of a ``--split``)."""

    def __init__(self, base, start: int, stop: int):
        self.base, self.start, self.stop = base, int(start), int(stop)
        self.lengths = np.asarray(base.lengths, dtype=np.int64)[self.start:self.stop]

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)}")
        return self.base[self.start + i]


def split_range(n: int, shares: Sequence[float], part: str) -> range:
    """Indices of the ``part`` (train, valid, test) of ``n`` items under ``--split`` shares:
    contiguous ranges in dataset order with Megatron-LM's boundaries (each share's
    round(share * n), accumulated, then all shifted so the last is n)."""
    bounds = [0]
    for share in shares:
        bounds.append(bounds[-1] + int(round(share * n)))
    shift = bounds[-1] - n
    bounds = [0] + [min(max(b - shift, 0), n) for b in bounds[1:]]
    k = SPLIT_PARTS.index(part)
    return range(bounds[k], max(bounds[k], bounds[k + 1]))


def split_part(dataset, shares: Sequence[float], part: str) -> SliceSequences:
    """``split_range`` of a dataset, as a dataset."""
    r = split_range(len(dataset), shares, part)
    return SliceSequences(dataset, r.start, r.stop)


def open_packed_stream(blend: Blend, seq_length: int, seed: int, pairs: bool = False, flag: str = "--train-data",
                       split: Optional[Sequence[float]] = None, part: str = "train"):
    """The packed training stream over a blend of ``--mode sft`` datasets (``pairs``: ``--mode
    dpo``, blended by pairs). ``split``: only each dataset's ``part`` of those shares (a
    held-out ``valid`` part leaves out datasets too small to have one). Returns (stream, units
    per dataset)."""
    from megatron_k15.data.indexed import load_sft_dataset
    from megatron_k15.data.preference import load_preference_dataset
    from megatron_k15.data.sft import PackedPairStream, PackedSFTStream

    datasets = [(load_preference_dataset if pairs else load_sft_dataset)(p) for p in blend.prefixes]
    check_compatible([d.summary for d in datasets], blend.prefixes, flag)
    if split is not None:
        datasets = [split_part(d, split, part) for d in datasets]
        if part != "train":
            if not any(len(d) for d in datasets):
                raise BlendError(f"--split: no dataset of {flag} has a sample in its {part} share "
                                 f"({', '.join(str(len(d.base)) for d in datasets)} samples); raise the share")
            kept = [(d, p) for d, p in zip(datasets, blend.prefixes) if len(d)]
            datasets, blend = [d for d, _ in kept], Blend([p for _, p in kept], None)
    for d, prefix in zip(datasets, blend.prefixes):
        if len(d) == 0:
            where = f" in its {part} share of --split" if split is not None else ""
            raise BlendError(f"{flag}: {prefix} holds no {'pairs' if pairs else 'samples'}{where}")
    parts = [d.sequences for d in datasets] if pairs else datasets
    sizes = [len(d) for d in datasets]
    sequences = parts[0] if len(parts) == 1 else ConcatSequences(parts)
    order = None
    if blend.weights is not None and len(parts) > 1:
        weights = list(blend.weights)
        order = lambda epoch: blended_epoch(sizes, weights, seed, epoch)  # noqa: E731
    stream_cls = PackedPairStream if pairs else PackedSFTStream
    return stream_cls(sequences, seq_length, seed=seed, lengths=sequences.lengths, epoch_order=order), sizes


class ConcatPrompts(ConcatSequences):
    """Prompt datasets end to end, with their records (ids unique across them)."""

    def __init__(self, parts: Sequence, prefixes: Sequence[str], flag: str):
        super().__init__(parts)
        self.records = [r for part in parts for r in part.records]
        where: dict = {}
        for part, prefix in zip(parts, prefixes):
            for r in part.records:
                rid = r.get("id")
                if rid in where:
                    raise BlendError(f"{flag}: prompt id {rid!r} is in {where[rid]} and in {prefix}; ids must be "
                                     "unique across the datasets (they key rewards, groups and the samplers)")
                where[rid] = prefix


def open_prompt_data(prefixes: Sequence[str], flag: str):
    """One prompt dataset or several concatenated (``ds[i]``, ``ds.lengths``, ``ds.records``)."""
    from megatron_k15.data.indexed import load_prompt_dataset

    datasets = [load_prompt_dataset(p) for p in prefixes]
    if len(datasets) == 1:
        return datasets[0]
    check_compatible([d.summary for d in datasets], prefixes, flag)
    return ConcatPrompts(datasets, prefixes, flag)
