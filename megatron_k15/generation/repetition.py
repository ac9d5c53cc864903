"""Repeat detection: stop a generation whose tail loops (DESIGN.md section 3, stop reason "repeat").

Criterion. The tail of a token sequence *repeats with period p* when its last ``c * p`` tokens
are ``c`` consecutive copies of the same ``p`` tokens. A generation is flagged when, for some
``p`` in ``[min_period, max_period]``, the number of whole copies ``c`` reaches

    need(p) = max(min_repeats, ceil(min_span / p))

i.e. at least ``min_repeats`` copies *and* at least ``min_span`` repeated tokens in total. The
reported period is the smallest one that qualifies (the loop's fundamental period), with its
number of whole copies. Only the last ``window`` tokens are examined (default: the longest span
any period can need, ``max_p need(p) * p``), so copies are counted up to that window.

Defaults (chosen for long reasoning traces, where a false stop costs a whole sample and a late
stop costs only a few hundred tokens out of a budget of thousands):
``min_period=1, max_period=64, min_repeats=8, min_span=64``:

    period 1: 64 identical tokens        period 2: 32 copies      period 4: 16 copies
    period 8..64: 8 copies (64..512 tokens)

Natural text almost never repeats a token n-gram that many times back to back (a 32-column
row of identical table cells would be flagged; raise ``min_span`` if that matters).

Use ``detect_repeat(tokens)`` for a one-off check, ``RepeatDetector`` in a per-sequence decode
loop (``push(token) -> bool``, O(max_period) per token), or ``BatchRepeatDetector`` for a batch of
sequences on the device (one vectorised update per decode step, no host sync; rows are reset
individually for continuous batching). All three give the same answer for the same tokens.
Pass only the *response* tokens (not the prompt).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = [
    "STOP_REASON_REPEAT",
    "DEFAULT_MIN_PERIOD",
    "DEFAULT_MAX_PERIOD",
    "DEFAULT_MIN_REPEATS",
    "DEFAULT_MIN_SPAN",
    "required_repeats",
    "default_window",
    "detect_repeat",
    "RepeatDetector",
    "BatchRepeatDetector",
]

STOP_REASON_REPEAT = "repeat"
DEFAULT_MIN_PERIOD = 1
DEFAULT_MAX_PERIOD = 64
DEFAULT_MIN_REPEATS = 8
DEFAULT_MIN_SPAN = 64


def _validate(min_period: int, max_period: int, min_repeats: int, min_span: int) -> None:
    if min_period < 1 or max_period < min_period:
        raise ValueError(f"need 1 <= min_period <= max_period, got {min_period}, {max_period}")
    if min_repeats < 2:
        raise ValueError(f"min_repeats must be >= 2, got {min_repeats}")
    if min_span < 0:
        raise ValueError(f"min_span must be >= 0, got {min_span}")


def required_repeats(period: int, min_repeats: int = DEFAULT_MIN_REPEATS,
                     min_span: int = DEFAULT_MIN_SPAN) -> int:
    """Whole copies of a period-``period`` unit needed to flag a repeat."""
    return max(min_repeats, -(-min_span // period))


def default_window(min_period: int = DEFAULT_MIN_PERIOD, max_period: int = DEFAULT_MAX_PERIOD,
                   min_repeats: int = DEFAULT_MIN_REPEATS,
                   min_span: int = DEFAULT_MIN_SPAN) -> int:
    """The longest tail any period in range needs: ``max_p required_repeats(p) * p``."""
    return max(required_repeats(p, min_repeats, min_span) * p
               for p in range(min_period, max_period + 1))


def detect_repeat(tokens: Sequence[int], min_period: int = DEFAULT_MIN_PERIOD,
                  max_period: int = DEFAULT_MAX_PERIOD, min_repeats: int = DEFAULT_MIN_REPEATS,
                  window: Optional[int] = None,
                  min_span: int = DEFAULT_MIN_SPAN) -> Optional[Tuple[int, int]]:
    """``(period, repeats)`` if the tail of ``tokens`` loops (module docstring), else None.

    ``repeats`` counts the whole copies of the period within the last ``window`` tokens.
    Cost: O(window * (max_period - min_period + 1)) at worst, vectorised with numpy."""
    _validate(min_period, max_period, min_repeats, min_span)
    if window is None:
        window = default_window(min_period, max_period, min_repeats, min_span)
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().reshape(-1).numpy()
    t = np.asarray(tokens[-window:] if window > 0 else tokens[:0], dtype=np.int64).reshape(-1)
    n = t.size
    for p in range(min_period, min(max_period, n // 2) + 1):
        need = required_repeats(p, min_repeats, min_span)
        span = need * p
        if span > n:
            continue
        # the last `span` tokens are periodic with period p
        if not np.array_equal(t[n - span + p:], t[n - span:n - p]):
            continue
        eq = t[p:] == t[:-p]
        mism = np.flatnonzero(~eq)
        run = eq.size if mism.size == 0 else eq.size - 1 - int(mism[-1])
        return p, (run + p) // p
    return None


class RepeatDetector:
    """Incremental ``detect_repeat`` for one sequence: ``push(token)`` is O(max_period).

    For every period p it keeps ``run[p]``, the number of trailing positions i with
    ``t[i] == t[i - p]``; the tail then holds ``(min(run[p], window - p) + p) // p`` whole copies.
    After ``push`` returns True, ``result`` holds ``(period, repeats)``.
    """

    def __init__(self, min_period: int = DEFAULT_MIN_PERIOD, max_period: int = DEFAULT_MAX_PERIOD,
                 min_repeats: int = DEFAULT_MIN_REPEATS, window: Optional[int] = None,
                 min_span: int = DEFAULT_MIN_SPAN):
        _validate(min_period, max_period, min_repeats, min_span)
        self.min_period, self.max_period = min_period, max_period
        self.min_repeats, self.min_span = min_repeats, min_span
        self.window = default_window(min_period, max_period, min_repeats, min_span) \
            if window is None else int(window)
        self._need = [0] + [required_repeats(p, min_repeats, min_span)
                            for p in range(1, max_period + 1)]
        self.reset()

    def reset(self) -> None:
        self._hist: List[int] = [0] * self.max_period  # ring of the last max_period tokens
        self._ptr = 0
        self._count = 0
        self._run = [0] * (self.max_period + 1)
        self.result: Optional[Tuple[int, int]] = None

    @property
    def num_tokens(self) -> int:
        return self._count

    def push(self, token: int) -> bool:
        token = int(token)
        P, hist, ptr, run, need = self.max_period, self._hist, self._ptr, self._run, self._need
        w, lo, seen = self.window, self.min_period, self._count
        found = None
        for p in range(1, P + 1):
            if p <= seen and hist[(ptr - p) % P] == token:
                r = run[p] + 1
                run[p] = r
                if found is None and p >= lo:
                    r = min(r, w - p)
                    if r > 0 and (r + p) // p >= need[p]:
                        found = (p, (r + p) // p)
            else:
                run[p] = 0
        hist[ptr] = token
        self._ptr = (ptr + 1) % P
        self._count = seen + 1
        self.result = found
        return found is not None

    def extend(self, tokens: Sequence[int]) -> bool:
        """Push several tokens; True if the tail after the last one repeats."""
        hit = False
        for tok in tokens:
            hit = self.push(tok)
        return hit


class BatchRepeatDetector:
    """``RepeatDetector`` for a batch of sequences held as tensors (e.g. on the GPU).

    ``push(tokens, active=None)`` takes the new token of every row ((batch,) integer tensor),
    updates the rows where ``active`` is True (default: all) and returns a (batch,) bool
    tensor: the row's tail now repeats. ``period`` / ``repeats`` give, per row, the smallest
    qualifying period and its copies (0 where none). ``reset(rows)`` clears rows that get a new
    sequence (continuous batching). No host synchronisation anywhere.
    """

    def __init__(self, batch_size: int, min_period: int = DEFAULT_MIN_PERIOD,
                 max_period: int = DEFAULT_MAX_PERIOD, min_repeats: int = DEFAULT_MIN_REPEATS,
                 window: Optional[int] = None, min_span: int = DEFAULT_MIN_SPAN,
                 device=None):
        _validate(min_period, max_period, min_repeats, min_span)
        self.batch_size = int(batch_size)
        self.min_period, self.max_period = min_period, max_period
        self.window = default_window(min_period, max_period, min_repeats, min_span) \
            if window is None else int(window)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        P = max_period
        self._p = torch.arange(1, P + 1, device=self.device)  # (P,)
        need = torch.tensor([required_repeats(p, min_repeats, min_span) for p in range(1, P + 1)],
                            device=self.device)
        # a period outside [min_period, max_period] never qualifies
        self._need = torch.where(self._p >= min_period, need, torch.full_like(need, 1 << 30))
        self._cap = (self.window - self._p).clamp(min=0)
        B = self.batch_size
        self._hist = torch.zeros(B, P, dtype=torch.int64, device=self.device)
        self._ptr = torch.zeros(B, dtype=torch.int64, device=self.device)
        self._count = torch.zeros(B, dtype=torch.int64, device=self.device)
        self._run = torch.zeros(B, P, dtype=torch.int64, device=self.device)
        self.period = torch.zeros(B, dtype=torch.int64, device=self.device)
        self.repeats = torch.zeros(B, dtype=torch.int64, device=self.device)

    def reset(self, rows=None) -> None:
        """Clear the given rows (an index list/tensor or bool mask; default: all)."""
        if rows is None:
            rows = slice(None)
        elif not isinstance(rows, torch.Tensor):
            rows = torch.as_tensor(rows, device=self.device)
        for t in (self._hist, self._ptr, self._count, self._run, self.period, self.repeats):
            t[rows] = 0

    def push(self, tokens: torch.Tensor, active: Optional[torch.Tensor] = None) -> torch.Tensor:
        tokens = tokens.to(self.device, torch.int64).reshape(self.batch_size)
        P = self.max_period
        idx = (self._ptr[:, None] - self._p[None, :]) % P  # (B, P) ring index of t[i - p]
        prev = torch.gather(self._hist, 1, idx)
        eq = (prev == tokens[:, None]) & (self._p[None, :] <= self._count[:, None])
        run = torch.where(eq, self._run + 1, torch.zeros_like(self._run))
        hist = self._hist.scatter(1, self._ptr[:, None], tokens[:, None])
        if active is None:
            act = torch.ones(self.batch_size, dtype=torch.bool, device=self.device)
        else:
            act = active.to(self.device, torch.bool).reshape(self.batch_size)
        self._run = torch.where(act[:, None], run, self._run)
        self._hist = torch.where(act[:, None], hist, self._hist)
        self._ptr = torch.where(act, (self._ptr + 1) % P, self._ptr)
        self._count = self._count + act.long()

        r = torch.minimum(self._run, self._cap[None, :])
        copies = (r + self._p[None, :]) // self._p[None, :]
        ok = (r > 0) & (copies >= self._need[None, :])  # (B, P)
        hit = ok.any(dim=1)
        first = torch.argmax(ok.to(torch.int8), dim=1)  # smallest qualifying period index
        self.period = torch.where(hit, first + 1, torch.zeros_like(first))
        self.repeats = torch.where(hit, torch.gather(copies, 1, first[:, None])[:, 0],
                                   torch.zeros_like(first))
        return hit & act
