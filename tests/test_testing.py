"""megatron_k15.testing.run_distributed: the harness every multi-rank test stands on."""

import os
import uuid

import pytest
import torch

from megatron_k15.testing import run_distributed


def _probe(rank, world_size):
    return {"rank": rank, "world": world_size, "env_rank": os.environ["RANK"],
            "probe": os.environ.get("K15_PROBE"), "sum": _all_reduce_sum(rank)}


def _all_reduce_sum(rank):
    t = torch.tensor([rank + 1.0])
    torch.distributed.all_reduce(t)
    return t.item()


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


def test_a_failing_rank_raises_with_its_traceback():
    with pytest.raises(RuntimeError, match="rank 1 failed") as e:
        run_distributed(_fails_on_rank_1, 2)
    assert "ValueError: rank one says no" in str(e.value)
