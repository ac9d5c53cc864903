"""Megatron-core indexed datasets (``PREFIX.bin`` / ``PREFIX.idx``): writing and reading.

The on-disk format is megatron-core's ``MMIDIDX`` format, version 1 (the one
``megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`` writes and
``IndexedDataset`` reads). ``PREFIX.idx`` holds::

    b"MMIDIDX\\x00\\x00"  <Q version=1>  <B dtype code>  <Q sequence count>  <Q document count>
    int32[sequence count]   sequence lengths (tokens)
    int64[sequence count]   byte offset of each sequence in PREFIX.bin
    int64[document count]   document boundaries (0, then the end index of each document)

and ``PREFIX.bin`` the tokens back to back. We write one sequence per document, as Megatron's
own preprocessing does for unsplit text. The writer and reader here are small numpy code,
so the preprocessing CLI and light readers do not pay megatron-core's import time (several
seconds: it pulls in all of torch); ``tests/test_preprocess_data.py`` checks that the files
are byte-identical to ``IndexedDatasetBuilder``'s and that ``IndexedDataset`` reads them.
:func:`megatron_indexed_dataset` opens a prefix with megatron-core itself.

What ``tools/preprocess_data.py`` writes, and how to read it back:

- ``--mode sft``: ``PREFIX.bin/.idx`` (token ids) and ``PREFIX.loss_mask.bin/.idx`` (uint8,
  one per token: 0 on prompt/template tokens, 1 on response tokens), plus ``PREFIX.json``.
  :func:`load_sft_dataset` -> :class:`SFTDataset` of ``SFTSample(tokens, loss_mask)``.
- ``--mode prompts``: ``PREFIX.bin/.idx`` (prompt token ids), ``PREFIX.meta.jsonl`` (the
  validated record of each sample, in order: id, prompt, task, answer/tests, difficulty, ...)
  plus ``PREFIX.json``. :func:`load_prompt_dataset` -> :class:`PromptDataset` of
  ``PromptSample(prompt_ids, record)``.

``PREFIX.json`` is the summary (mode, tokenizer, counts, skipped lines); it is renamed into
place last, so its presence means the dataset is complete.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, NamedTuple, Optional

import numpy as np

__all__ = [
    "IndexedDatasetWriter",
    "IndexedTokens",
    "SFTDataset",
    "SFTSample",
    "PromptDataset",
    "PromptSample",
    "load_sft_dataset",
    "load_prompt_dataset",
    "load_summary",
    "megatron_indexed_dataset",
    "token_dtype",
    "dataset_files",
    "LOSS_MASK_SUFFIX",
    "META_SUFFIX",
    "SUMMARY_SUFFIX",
]

_HEADER = b"MMIDIDX\x00\x00"
_VERSION = 1
_CODES = {
    np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
    np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7,
    np.dtype(np.uint16): 8,
}
_DTYPES = {code: dt for dt, code in _CODES.items()}
_FIXED_HEADER = len(_HEADER) + 8 + 1 + 8 + 8  # 34 bytes

LOSS_MASK_SUFFIX = ".loss_mask"
META_SUFFIX = ".meta.jsonl"
SUMMARY_SUFFIX = ".json"


def token_dtype(vocab_size: int) -> np.dtype:
    """megatron-core's choice: uint16 below 65500 tokens, else int32."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def dataset_files(prefix: str, mode: str) -> list[str]:
    """The files a preprocessed dataset of ``mode`` ("sft" | "prompts") consists of."""
    files = [prefix + ".bin", prefix + ".idx"]
    if mode == "sft":
        files += [prefix + LOSS_MASK_SUFFIX + ".bin", prefix + LOSS_MASK_SUFFIX + ".idx"]
    elif mode == "prompts":
        files += [prefix + META_SUFFIX]
    else:
        raise ValueError(f"mode must be 'sft' or 'prompts', got {mode!r}")
    return files + [prefix + SUMMARY_SUFFIX]


class IndexedDatasetWriter:
    """Writes one indexed dataset: ``add(seq)`` per sequence (one document each), then
    ``finalize()``; ``abort()`` closes and deletes what was written."""

    def __init__(self, bin_path: str, idx_path: str, dtype=np.int32):
        self.bin_path = bin_path
        self.idx_path = idx_path
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODES:
            raise ValueError(f"dtype {self.dtype} is not supported by the indexed format")
        self._info = np.iinfo(self.dtype) if self.dtype.kind in "iu" else None
        self._bin = open(bin_path, "wb")
        self.lengths: list[int] = []
        self._closed = False

    def add(self, seq: Iterable[int]) -> None:
        arr = np.asarray(seq)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if self._info is not None and arr.size:
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                raise ValueError(f"value {lo if lo < self._info.min else hi} does not fit {self.dtype}")
        self._bin.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes(order="C"))
        self.lengths.append(int(arr.size))

    def __len__(self) -> int:
        return len(self.lengths)

    def finalize(self) -> None:
        self._bin.close()
        self._closed = True
        n = len(self.lengths)
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        docs = np.arange(n + 1, dtype=np.int64)  # one sequence per document
        with open(self.idx_path, "wb") as f:
            f.write(_HEADER)
            f.write(struct.pack("<Q", _VERSION))
            f.write(struct.pack("<B", _CODES[self.dtype]))
            f.write(struct.pack("<Q", n))
            f.write(struct.pack("<Q", n + 1))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(docs.tobytes(order="C"))

    def abort(self) -> None:
        if not self._closed:
            self._bin.close()
            self._closed = True
        for p in (self.bin_path, self.idx_path):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass


class IndexedTokens:
    """Reads ``PREFIX.bin/.idx`` (memory-mapped); ``ds[i]`` is sequence i as a numpy array."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_path, bin_path = prefix + ".idx", prefix + ".bin"
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: missing (is {prefix!r} a preprocessed dataset prefix?)")
        with open(idx_path, "rb") as f:
            head = f.read(_FIXED_HEADER)
        if len(head) < _FIXED_HEADER or head[:len(_HEADER)] != _HEADER:
            raise ValueError(f"{idx_path}: not a megatron indexed dataset index (bad header)")
        version, code, n, ndocs = struct.unpack("<QBQQ", head[len(_HEADER):])
        if version != _VERSION:
            raise ValueError(f"{idx_path}: unsupported index version {version}")
        if code not in _DTYPES:
            raise ValueError(f"{idx_path}: unknown dtype code {code}")
        self.dtype = _DTYPES[code]
        idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        off = _FIXED_HEADER
        self.lengths = np.frombuffer(idx, dtype=np.int32, count=n, offset=off)
        off += 4 * n
        self.pointers = np.frombuffer(idx, dtype=np.int64, count=n, offset=off)
        off += 8 * n
        self.document_indices = np.frombuffer(idx, dtype=np.int64, count=ndocs, offset=off)
        if os.path.getsize(bin_path) == 0:
            self._bin = np.zeros(0, dtype=self.dtype)
        else:
            self._bin = np.memmap(bin_path, dtype=self.dtype, mode="r")
        total = int(self.lengths.sum(dtype=np.int64))
        if self._bin.size != total:
            raise ValueError(f"{bin_path}: holds {self._bin.size} tokens, the index says {total}")

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {n} sequences")
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.array(self._bin[start:start + int(self.lengths[i])])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def load_summary(prefix: str, mode: Optional[str] = None) -> dict:
    """``PREFIX.json`` (written last by the preprocessing tool); with ``mode``, the dataset
    must have been preprocessed with ``--mode mode``."""
    path = prefix + SUMMARY_SUFFIX
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (dataset not preprocessed, or preprocessing "
                                f"did not finish)")
    with open(path, "r", encoding="utf-8") as f:
        summary = json.load(f)
    if mode is not None and summary.get("mode") != mode:
        raise ValueError(f"{path}: mode is {summary.get('mode')!r}, not {mode!r} (preprocess it with "
                         f"tools/preprocess_data.py --mode {mode})")
    return summary


class SFTSample(NamedTuple):
    tokens: np.ndarray  # int64 (L,)
    loss_mask: np.ndarray  # uint8 (L,): 1 on response tokens


class TokenMaskSequences:
    """Sequences of token ids with their loss masks (two indexed datasets of equal lengths);
    ``ds[i]`` is an SFTSample."""

    def __init__(self, tokens: "IndexedTokens", loss_mask: "IndexedTokens"):
        self.tokens, self.loss_mask = tokens, loss_mask

    @classmethod
    def from_prefix(cls, prefix: str) -> "TokenMaskSequences":
        """``PREFIX`` token ids and ``PREFIX`` + loss-mask suffix, checked to match."""
        tokens, mask = IndexedTokens(prefix), IndexedTokens(prefix + LOSS_MASK_SUFFIX)
        if len(tokens) != len(mask) or not np.array_equal(tokens.lengths, mask.lengths):
            raise ValueError(f"{prefix}: token and loss-mask datasets do not match")
        return TokenMaskSequences(tokens, mask)

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.lengths

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> SFTSample:
        return SFTSample(self.tokens[i].astype(np.int64), self.loss_mask[i].astype(np.uint8))

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class SFTDataset(TokenMaskSequences):
    """Token ids and loss masks of a ``--mode sft`` dataset; ``ds[i]`` is an SFTSample."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.summary = load_summary(prefix, "sft")
        pair = TokenMaskSequences.from_prefix(prefix)
        super().__init__(pair.tokens, pair.loss_mask)


class PromptSample(NamedTuple):
    prompt_ids: np.ndarray  # int64 (L,)
    record: dict  # id, prompt, task, answer/tests, difficulty, ...


class PromptDataset:
    """Prompt token ids with their records; ``ds[i]`` is a PromptSample, ``ds.records`` the
    list of records (what the prompt samplers take)."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.summary = load_summary(prefix, "prompts")
        self.tokens = IndexedTokens(prefix)
        self.records: list[dict] = []
        with open(prefix + META_SUFFIX, "r", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    self.records.append(json.loads(line))
        if len(self.records) != len(self.tokens):
            raise ValueError(f"{prefix}: {len(self.records)} metadata records for "
                             f"{len(self.tokens)} token sequences")

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.lengths

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> PromptSample:
        return PromptSample(self.tokens[i].astype(np.int64), self.records[int(i)])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


def load_sft_dataset(prefix: str) -> SFTDataset:
    return SFTDataset(prefix)


def load_prompt_dataset(prefix: str) -> PromptDataset:
    return PromptDataset(prefix)


def megatron_indexed_dataset(prefix: str, mmap: bool = True):
    """``megatron.core.datasets.indexed_dataset.IndexedDataset`` on ``prefix`` (imports
    megatron-core, which takes seconds)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(prefix, multimodal=False, mmap=mmap)
