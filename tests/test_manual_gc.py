"""--manual-gc: automatic collection off for the run, gc.collect() at the iterations and
evaluations the flags name, the collector restored at the end; the flags' checks. (That it
changes no number: tests/test_checkpointing.py and tests/test_rl_trainer.py run the trainers
with it against runs without.)"""

import argparse
import gc

import pytest

from megatron_k15.arguments import ArgumentError, build_parser, parse_args, validate_args
from megatron_k15.manual_gc import ManualGC


@pytest.fixture
def collections(monkeypatch):
    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or 0)
    yield calls
    gc.enable()


def test_collects_at_the_interval_and_around_evaluations(collections):
    m = ManualGC(argparse.Namespace(manual_gc=True, manual_gc_interval=3, manual_gc_eval=True))
    assert gc.isenabled()
    m.start()
    assert not gc.isenabled() and len(collections) == 1
    per_iteration = []
    for it in range(1, 8):
        m.after_iteration(it)
        per_iteration.append(len(collections))
    assert per_iteration == [1, 1, 2, 2, 2, 3, 3]  # after iterations 3 and 6
    with m.around_eval():
        assert len(collections) == 4
    assert len(collections) == 5
    m.close()
    assert gc.isenabled()


@pytest.mark.parametrize("ns", [argparse.Namespace(manual_gc=False, manual_gc_interval=0, manual_gc_eval=True),
                                argparse.Namespace(manual_gc=True, manual_gc_interval=0, manual_gc_eval=False)])
def test_off_or_without_interval_and_eval_it_never_collects(collections, ns):
    m = ManualGC(ns)
    m.start()
    start = len(collections)  # the one full collection when it takes over
    assert gc.isenabled() != ns.manual_gc and start == int(ns.manual_gc)
    for it in range(1, 10):
        m.after_iteration(it)
    with m.around_eval():
        pass
    m.close()
    assert len(collections) == start and gc.isenabled()


@pytest.mark.parametrize("flags, message", [
    (["--manual-gc", "--manual-gc-interval", "-1"], "--manual-gc-interval must be >= 0"),
    (["--manual-gc-interval", "10"], "--manual-gc-interval applies to --manual-gc"),
    (["--no-manual-gc-eval"], "--no-manual-gc-eval applies to --manual-gc"),
])
def test_flags_are_checked(flags, message):
    args = build_parser().parse_args(["--num-layers", "2", *flags])
    with pytest.raises(ArgumentError, match=message):
        validate_args(args, world_size=1)
    ok = parse_args(["--num-layers", "2", "--manual-gc", "--manual-gc-interval", "5"], world_size=1)
    assert ok.manual_gc and ok.manual_gc_interval == 5
