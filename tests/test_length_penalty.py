"""Kimi length penalty against hand-computed values."""

import pytest
import torch

from megatron_k15.rl.length_penalty import apply_length_penalty, length_rewards


def _close(a, b):
    assert len(a) == len(b) and all(abs(x - y) < 1e-9 for x, y in zip(a, b)), (a, b)


def test_length_rewards_by_hand():
    # min 100, max 300: lambda = 0.5 - (len - 100) / 200
    lengths = [100, 150, 200, 300, 250]
    correct = [True, True, False, True, False]
    # lambdas: 0.5, 0.25, 0.0, -0.5, -0.25 ; wrong ones -> min(0, lambda)
    _close(length_rewards(lengths, correct), [0.5, 0.25, 0.0, -0.5, -0.25])


def test_wrong_short_answer_is_not_rewarded():
    _close(length_rewards([10, 20], [False, True]), [0.0, -0.5])


def test_all_equal_lengths_give_zero():
    _close(length_rewards([42, 42, 42], [True, False, True]), [0.0, 0.0, 0.0])
    assert length_rewards([], []) == []


def test_tensor_inputs_and_mismatch():
    _close(length_rewards(torch.tensor([3, 5]), torch.tensor([True, True])), [0.5, -0.5])
    with pytest.raises(ValueError):
        length_rewards([1, 2], [True])


def test_apply_length_penalty_per_group_and_warmup():
    rewards = [1.0, 1.0, 0.0, 1.0, 0.0]
    lengths = [10, 30, 20, 5, 5]
    correct = [True, True, False, True, False]
    groups = ["a", "a", "a", "b", "b"]
    # group a: min 10 max 30 -> lambda .5, -.5, 0 (wrong -> 0); group b: equal lengths -> 0
    out = apply_length_penalty(rewards, lengths, correct, groups, weight=0.2, iteration=3, start_iter=3)
    _close(out, [1.1, 0.9, 0.0, 1.0, 0.0])
    # before the start iteration: unchanged
    _close(apply_length_penalty(rewards, lengths, correct, groups, 0.2, iteration=2, start_iter=3), rewards)
    t = apply_length_penalty(torch.tensor(rewards), lengths, correct, [0, 0, 0, 1, 1], 1.0, 0, 0)
    assert isinstance(t, torch.Tensor)
    torch.testing.assert_close(t, torch.tensor([1.5, 0.5, 0.0, 1.0, 0.0]))


def test_dapo_overlong_penalty_by_hand():
    from megatron_k15.rl.length_penalty import overlong_penalty

    # budget 10, buffer 4: free up to 6 tokens, then -0.25 per token down to -1 at 10
    assert overlong_penalty([1, 6, 7, 8, 10], 10, 4) == [0.0, 0.0, -0.25, -0.5, -1.0]
    assert overlong_penalty([9], 10, 4, factor=2.0) == [-1.5]
    assert overlong_penalty([10], 10, 10) == [-1.0]
    for bad in (0, 11):
        with pytest.raises(ValueError):
            overlong_penalty([1], 10, bad)
