"""Early exits (--exit-signal-handler, --exit-duration-in-mins, --exit-interval): when each
fires, that every rank takes the same decision when only one rank got the signal or ran out
of time, and that the flags are checked before any work."""

import argparse
import os
import signal
import time

import pytest

from megatron_k15.arguments import parse_args
from megatron_k15.exit_conditions import ExitConditions
from megatron_k15.testing import run_distributed


def _args(signals=False, minutes=None, interval=None):
    return argparse.Namespace(exit_signal_handler=signals, exit_duration_in_mins=minutes, exit_interval=interval)


def test_interval_fires_on_multiples_only():
    exits = ExitConditions(_args(interval=3))
    assert [it for it in range(1, 10) if exits.reason(it)] == [3, 6, 9]
    assert exits.reason(3) == "--exit-interval 3"


def test_duration_counts_from_the_given_start():
    assert ExitConditions(_args(minutes=1.0), start_time=time.time() - 61).reason(1) == \
        "--exit-duration-in-mins 1 passed"
    assert ExitConditions(_args(minutes=1.0), start_time=time.time() - 50).reason(1) is None
    assert ExitConditions(_args()).reason(10 ** 6) is None


def test_signal_sets_the_flag_and_restore_puts_the_old_handler_back():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        exits = ExitConditions(_args(signals=True))
        assert exits.reason(1) is None
        os.kill(os.getpid(), signal.SIGUSR1)  # delivered to the main thread before kill returns
        assert exits.reason(1) == "SIGUSR1 received" and seen == []
        exits.restore()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _agreement_worker(rank, world_size):
    exits = ExitConditions(_args(signals=True, minutes=1.0),
                           start_time=time.time() - (120 if rank == 0 else 0))  # only rank 0 is late
    overtime = exits.reason(1)
    exits.duration_s = None
    before = exits.reason(1)
    if rank == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # only rank 1 is signalled
    signalled = exits.reason(1)
    exits.restore()
    return overtime, before, signalled


@pytest.mark.slow
def test_every_rank_stops_when_one_rank_must():
    results = run_distributed(_agreement_worker, 2)
    assert results[0][0] == results[1][0] == "--exit-duration-in-mins 1 passed"
    assert results[0][1] is None and results[1][1] is None
    assert results[1][2] == "SIGTERM received"
    assert results[0][2] == "a signal received"  # rank 0 stops too, without having seen it


@pytest.mark.parametrize("flags, message", [
    (["--exit-duration-in-mins", "0"], "--exit-duration-in-mins must be > 0"),
    (["--exit-interval", "0"], "--exit-interval must be >= 1"),
])
def test_bad_values_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--num-layers", "2", *flags], world_size=1)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
