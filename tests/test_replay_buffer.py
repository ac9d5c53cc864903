"""Partial-rollout trajectories and the replay buffer: ordering, eviction, checkpoint state,
loss masks."""

import json

import pytest
import torch

from megatron_k15.generation.replay_buffer import ReplayBuffer, Trajectory, loss_mask


def _traj(pid, start, n=3, sample=0):
    t = Trajectory(prompt_id=pid, prompt_ids=[1, 2, 3], sample_index=sample)
    t.append_segment(list(range(10, 10 + n)), [-0.5] * n, iteration=start, stop_reason="partial")
    return t


def test_trajectory_segments_and_validation():
    t = Trajectory("p0", [5, 6], extra={"task": "math"})
    t.append_segment([1, 2, 3], [-0.1, -0.2, -0.3], iteration=4, stop_reason="partial")
    t.append_segment([4, 5], [-1.0, -2.0], iteration=6, stop_reason="eos")
    assert t.start_iteration == 4 and t.last_iteration == 6
    assert t.segment_ids == [4, 4, 4, 6, 6] and t.num_segments == 2
    assert t.segments() == [(4, 0, 3), (6, 3, 5)]
    assert t.finished and t.response_len == 5 and t.token_ids == [5, 6, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError):
        t.append_segment([1], [0.0, 0.0], iteration=7)
    with pytest.raises(ValueError):
        t.append_segment([1], [0.0], iteration=5)  # goes back in time
    with pytest.raises(ValueError):
        Trajectory("p", [1], response_ids=[1], segment_ids=[], logprobs=[])
    with pytest.raises(ValueError):
        Trajectory("p", [1], stop_reason="bogus")


def test_loss_mask_current_segment_only():
    t = Trajectory("p", [1])
    t.append_segment([1, 2], [0.0, 0.0], iteration=1, stop_reason="partial")
    t.append_segment([3, 4, 5], [0.0] * 3, iteration=2, stop_reason="partial")
    t.append_segment([6], [0.0], iteration=3, stop_reason="length")
    assert loss_mask(t, 3).tolist() == [0, 0, 0, 0, 0, 1]
    assert t.loss_mask(3, include_old_segments=True).tolist() == [1] * 6
    assert loss_mask(t, 4).sum() == 0  # nothing generated at iteration 4
    assert loss_mask(t, 3, dtype=torch.bool).dtype == torch.bool
    with pytest.raises(ValueError):
        loss_mask(t, 2)  # tokens from the future


def test_buffer_order_oldest_first():
    buf = ReplayBuffer()
    buf.add(_traj("b", start=2))
    buf.add(_traj("a", start=1))
    buf.add(_traj("c", start=2, sample=1))
    buf.add(_traj("d", start=0))
    assert len(buf) == 4
    assert [t.prompt_id for t in buf.peek()] == ["d", "a", "b", "c"]
    got = buf.pop_for_resume(3)
    assert [t.prompt_id for t in got] == ["d", "a", "b"] and len(buf) == 1
    assert all(t.stop_reason == "partial" for t in got)
    assert [t.prompt_id for t in buf.pop_for_resume(10)] == ["c"]
    assert buf.pop_for_resume(5) == [] and len(buf) == 0
    with pytest.raises(ValueError):
        buf.add(_traj("x", 0).append_segment([1], [0.0], 1, stop_reason="eos"))


def test_eviction_by_size_and_age():
    buf = ReplayBuffer(max_size=2, max_age=2)
    assert buf.add(_traj("a", 1)) == []
    assert buf.add(_traj("b", 2)) == []
    ev = buf.add(_traj("c", 3))
    assert [t.prompt_id for t in ev] == ["a"] and ev[0].stop_reason == "evicted"
    # at iteration 5, "b" (started at 2) is 3 iterations old > max_age 2
    got = buf.pop_for_resume(10, iteration=5)
    assert [t.prompt_id for t in got] == ["c"]
    assert [t.prompt_id for t in buf.last_evicted] == ["b"]
    assert buf.stats()["evicted"] == 2 and buf.stats()["resumed"] == 1
    buf.add(_traj("d", 5))
    assert buf.evict_stale(7) == [] and len(buf.evict_stale(8)) == 1


def test_state_dict_json_round_trip():
    buf = ReplayBuffer(max_size=10, max_age=5)
    for i in range(4):
        t = _traj(f"p{i}", start=i % 2, n=i + 1, sample=i)
        t.logprobs = [-0.1 * (j + 1) / 3 for j in range(i + 1)]  # non-trivial floats
        t.extra = {"answer": str(i), "seed": [i, i + 1]}
        buf.add(t)
    buf.pop_for_resume(1)
    state = json.loads(json.dumps(buf.state_dict()))
    other = ReplayBuffer()
    other.load_state_dict(state)
    assert other.max_size == 10 and other.max_age == 5
    assert other.stats() == buf.stats()
    assert [t.to_dict() for t in other.peek()] == [t.to_dict() for t in buf.peek()]
    assert [t.prompt_id for t in other.pop_for_resume(10)] == \
        [t.prompt_id for t in buf.pop_for_resume(10)]
    with pytest.raises(ValueError):
        other.load_state_dict({"version": 99})
