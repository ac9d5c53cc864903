"""megatron_k15.testing.run_distributed: the harness every multi-rank test stands on."""

import os
import sys
import time
import uuid

import pytest
import torch

from megatron_k15.testing import run_distributed


def _probe(rank, world_size):
    return {"rank": rank, "world": world_size, "env_rank": os.environ["RANK"],
            "probe": os.environ.get("K15_PROBE"), "sum": _all_reduce_sum(rank),
            # nothing here imports megatron-core: present only if the fork server preloaded it
            "preloaded": "megatron.core.tensor_parallel" in sys.modules}


def _all_reduce_sum(rank):
    t = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(t)
    return t.item()


def _sum_of(rank, world_size, tensors):
    return sum(t.sum() for t in tensors)


def _dies_on_rank_1(rank, world_size):
    # after a barrier: dying during gloo's connection setup would fail rank 0 first, and
    # which rank reports first would then be a race
    torch.distributed.barrier()
    if rank == 1:
        os._exit(7)  # no report, no traceback: as a segfault would
    time.sleep(30)  # rank 0 waits, as it would in a collective


def _fails_on_rank_1(rank, world_size):
    if rank == 1:
        raise ValueError("rank one says no")
    return rank


def test_ranks_see_the_callers_environment_of_the_moment(monkeypatch):
    """Ranks fork from a server started earlier; they must still get the environment the caller
    has now (tests point ranks at files through it)."""
    for _ in range(2):  # the second call reuses the running fork server
        value = uuid.uuid4().hex
        monkeypatch.setenv("K15_PROBE", value)
        got = run_distributed(_probe, 3)
        assert [g["rank"] for g in got] == [0, 1, 2] and all(g["world"] == 3 for g in got)
        assert [g["env_rank"] for g in got] == ["0", "1", "2"]
        assert all(g["probe"] == value for g in got)
        assert all(g["sum"] == 6.0 for g in got)  # gloo all-reduce across the 3 ranks
        if sys.platform.startswith("linux"):
            assert all(g["preloaded"] for g in got)  # a preload that fails would go unnoticed


def test_many_tensor_arguments_reach_the_ranks():
    """300 tensors: as separate objects each would take one of the fork server's 256 file
    descriptors."""
    tensors = [torch.full((2,), float(i)) for i in range(300)]
    assert run_distributed(_sum_of, 2, tensors) == [2.0 * sum(range(300))] * 2


def test_a_rank_that_dies_without_a_report_is_named_at_once():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 exited with code 7"):
        run_distributed(_dies_on_rank_1, 2)
    assert time.monotonic() - t0 < 25  # not the 600 s timeout, nor rank 0's 30 s sleep


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(RuntimeError, match="rank 1 failed") as e:
        run_distributed(_fails_on_rank_1, 2)
    assert "ValueError: rank one says no" in str(e.value)
