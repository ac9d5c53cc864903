"""Repeat detection: hand-made loops, near misses, natural-looking text, and the three
implementations (function, incremental, batched) agreeing token by token."""

import random

import pytest
import torch

from megatron_k15.generation.repetition import (
    STOP_REASON_REPEAT,
    BatchRepeatDetector,
    RepeatDetector,
    default_window,
    detect_repeat,
    required_repeats,
)


def _unit(p, seed=0):
    """p distinct-ish tokens that are not themselves periodic."""
    rng = random.Random(seed)
    return [1000 + p * 10 + i if i % 2 else rng.randrange(10, 900) for i in range(p)]


def _prefix(n=50, seed=1):
    rng = random.Random(seed)
    return [rng.randrange(5000, 6000) for _ in range(n)]


def test_defaults_documented():
    assert STOP_REASON_REPEAT == "repeat"
    assert required_repeats(1) == 64 and required_repeats(2) == 32 and required_repeats(4) == 16
    assert all(required_repeats(p) == 8 for p in range(8, 65))
    assert default_window() == 512


@pytest.mark.parametrize("p", list(range(1, 65)))
def test_every_period_detected_exactly_at_threshold(p):
    unit = _unit(p, seed=p)
    need = required_repeats(p)
    tokens = _prefix() + unit * (need - 1)
    assert detect_repeat(tokens) is None
    tokens_hit = tokens + unit
    period, reps = detect_repeat(tokens_hit)
    assert period == p and reps == need
    # incremental detector fires on exactly the token completing the need-th copy
    det = RepeatDetector()
    fired = [det.push(t) for t in tokens_hit]
    assert fired.index(True) == len(tokens_hit) - 1
    assert det.result == (p, need)


def test_smallest_period_reported_and_partial_copy():
    tokens = _prefix() + [1, 2] * 40 + [1]  # tail ends mid-copy: still period 2
    assert detect_repeat(tokens) == (2, 40)
    assert detect_repeat([7] * 100) == (1, 100)
    assert detect_repeat([7] * 600) == (1, default_window())  # copies counted in the window


def test_near_misses_not_flagged():
    p = 10
    unit = _unit(p)
    need = required_repeats(p)
    broken = unit * need
    broken[-3] = 1  # one changed token in the last copy
    assert detect_repeat(_prefix() + broken) is None
    # a loop that ended: fresh text after it
    assert detect_repeat(_prefix() + unit * (need + 3) + _prefix(5, seed=9)) is None
    # long copies of a period larger than max_period are not flagged
    big = _unit(80)
    assert detect_repeat(_prefix() + big * 10) is None
    assert detect_repeat(_prefix() + big * 10, max_period=80)[0] == 80
    assert detect_repeat([]) is None and detect_repeat([3]) is None


def test_parameters_and_window():
    toks = [5] * 10
    assert detect_repeat(toks) is None
    assert detect_repeat(toks, min_repeats=4, min_span=0) == (1, 10)
    assert detect_repeat(toks, min_repeats=4, min_span=0, window=6) == (1, 6)
    assert detect_repeat(toks, min_repeats=4, min_span=0, window=3) is None
    assert detect_repeat(toks, min_period=2, min_repeats=4, min_span=0) == (2, 5)
    assert detect_repeat(torch.tensor(toks), min_repeats=4, min_span=0) == (1, 10)
    with pytest.raises(ValueError):
        detect_repeat(toks, min_repeats=1)
    with pytest.raises(ValueError):
        detect_repeat(toks, min_period=3, max_period=2)


def test_natural_text_not_flagged():
    text = ("Let x be the number of apples. Then 3x + 5 = 20, so 3x = 15 and x = 5. "
            "Check: 3 * 5 + 5 = 20. The answer is 5. ") * 3
    text += "| a | b | c | d |\n|---|---|---|---|\n" + "0 0 0 0 0 0 0 0 0 0 0 0\n"
    tokens = list(text.encode())
    assert detect_repeat(tokens) is None
    det = RepeatDetector()
    assert not any(det.push(t) for t in tokens)


def _random_stream(seed, n=700):
    """Random text with loops of random periods spliced in."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        if rng.random() < 0.3:
            p = rng.randrange(1, 20)
            unit = [rng.randrange(0, 4) for _ in range(p)]
            out += unit * rng.randrange(2, 40)
        else:
            out += [rng.randrange(0, 4) for _ in range(rng.randrange(1, 30))]
    return out[:n]


def test_incremental_and_batched_agree_with_function():
    kw = dict(max_period=12, min_repeats=3, min_span=8, window=40)
    streams = [_random_stream(s, 300) for s in range(4)]
    singles = [RepeatDetector(**kw) for _ in streams]
    batch = BatchRepeatDetector(len(streams), **kw)
    n_hits = 0
    for i in range(300):
        toks = torch.tensor([s[i] for s in streams])
        hit = batch.push(toks)
        for b, s in enumerate(streams):
            expect = detect_repeat(s[:i + 1], **kw)
            assert singles[b].push(s[i]) == (expect is not None)
            assert singles[b].result == expect
            assert bool(hit[b]) == (expect is not None)
            if expect is not None:
                n_hits += 1
                assert (int(batch.period[b]), int(batch.repeats[b])) == expect
    assert n_hits > 20


def test_batch_reset_and_inactive_rows():
    det = BatchRepeatDetector(3, max_period=4, min_repeats=4, min_span=0)
    for _ in range(3):
        assert not det.push(torch.tensor([1, 1, 1])).any()
    # row 2 paused: its token is ignored
    hit = det.push(torch.tensor([1, 1, 9]), active=torch.tensor([True, True, False]))
    assert hit.tolist() == [True, True, False]
    assert det.period.tolist()[:2] == [1, 1] and det.repeats.tolist()[:2] == [4, 4]
    det.reset([1])
    hit = det.push(torch.tensor([1, 1, 1]))
    assert hit.tolist() == [True, False, True]  # row 2 saw 1,1,1,1 ; row 1 restarted
    det.reset()
    assert not det.push(torch.tensor([1, 1, 1])).any()
