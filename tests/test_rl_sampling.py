"""Prompt samplers: determinism, exact resume from state, curriculum pools, prioritisation."""

import json

import numpy as np
import pytest

from megatron_k15.rl.sampling import (CurriculumSampler, MixtureSampler, PrioritizedSampler, UniformSampler,
                                      build_sampler)

RECORDS = [{"id": str(i), "difficulty": d} for i, d in enumerate([3, 1, 2, 5, 1, 4, 2, 3, 5, 1])]


def _draw(s, iters, n=4, feedback=False):
    out = []
    for it in iters:
        ids = s.sample(n, it)
        out.append(ids)
        if feedback:
            s.update(ids, [float(i % 3 == 0) for i in ids])
    return out


MIX = {"sizes": [6, 4], "weights": [0.7, 0.3]}  # RECORDS as two weighted prompt sets


@pytest.mark.parametrize("name,kw", [("uniform", {}), ("curriculum", {"switch_iter": 3}),
                                     ("prioritized", {"floor": 0.1}), ("uniform", MIX),
                                     ("curriculum", {"switch_iter": 3, **MIX}), ("prioritized", {"floor": 0.1, **MIX})])
def test_seeded_determinism_and_exact_resume(name, kw):
    a = build_sampler(name, RECORDS, seed=11, **kw)
    b = build_sampler(name, RECORDS, seed=11, **kw)
    assert _draw(a, range(6), feedback=True) == _draw(b, range(6), feedback=True)
    c = build_sampler(name, RECORDS, seed=12, **kw)
    d = build_sampler(name, RECORDS, seed=11, **kw)
    assert _draw(c, range(6), feedback=True) != _draw(d, range(6), feedback=True)

    s = build_sampler(name, RECORDS, seed=5, **kw)
    _draw(s, range(2), feedback=True)
    state = json.loads(json.dumps(s.state_dict()))  # must survive a JSON round trip
    cont = _draw(s, range(2, 8), feedback=True)
    fresh = build_sampler(name, RECORDS, seed=999, **kw)  # seed comes from the state
    fresh.load_state_dict(state)
    assert _draw(fresh, range(2, 8), feedback=True) == cont


def test_uniform_covers_each_prompt_once_per_epoch():
    s = UniformSampler(RECORDS, seed=0)
    first = s.sample(10)
    assert sorted(first) == list(range(10))
    two = s.sample(7) + s.sample(3)
    assert sorted(two) == list(range(10))


def test_curriculum_threshold_and_switch():
    s = CurriculumSampler(RECORDS, seed=0, switch_iter=2, threshold=2)
    easy = {i for i, r in enumerate(RECORDS) if r["difficulty"] <= 2}
    seen = set()
    for it in range(2):
        seen |= set(s.sample(5, it))
    assert seen == easy
    later = set()
    for it in range(2, 6):
        later |= set(s.sample(5, it))
    assert later == set(range(10))


def test_curriculum_fraction_and_hard_after():
    s = CurriculumSampler(RECORDS, seed=0, switch_iter=1, easy_fraction=0.3, after="hard")
    # three easiest: difficulty 1 at indices 1, 4, 9
    assert s.easy_pool == [1, 4, 9]
    assert set(s.sample(6, 0)) == {1, 4, 9}
    assert set(s.sample(20, 1)).isdisjoint({1, 4, 9})
    with pytest.raises(ValueError):
        CurriculumSampler(RECORDS, threshold=0)


def test_prioritized_favours_unsolved_prompts():
    s = PrioritizedSampler(20, seed=0, floor=0.05, alpha=1.0)
    solved = list(range(10))
    s.update(solved + list(range(10, 20)), [1.0] * 10 + [0.0] * 10)
    p = s.probabilities()
    assert np.isclose(p[0], 0.05 / (10 * 0.05 + 10 * 1.05))
    counts = np.zeros(20)
    for it in range(300):
        for i in s.sample(1, it):
            counts[i] += 1
    frac_solved = counts[:10].sum() / counts.sum()
    assert 0.0 < frac_solved < 0.15  # expected 0.5/11 ~ 0.045; floor keeps solved ones alive
    # without replacement inside a draw
    ids = s.sample(15, 0)
    assert len(set(ids)) == 15


def test_prioritized_ema_and_running_mean():
    ema = PrioritizedSampler(3, alpha=0.5, initial_success=0.0)
    ema.update([0, 0, 1], [1.0, 0.0, 1.0])  # prompt 0 mean .5, prompt 1 mean 1
    ema.update([0], [1.0])
    np.testing.assert_allclose(ema.success, [0.5 * 0.25 + 0.5, 0.5, 0.0])
    run = PrioritizedSampler(3, alpha=None)
    run.update([0, 0, 1], [1.0, 0.0, 1.0])
    run.update([0, 0], [1.0, 1.0])
    np.testing.assert_allclose(run.success, [0.75, 1.0, 0.0])
    np.testing.assert_array_equal(run.counts, [4, 1, 0])


def test_factory_and_state_checks():
    with pytest.raises(ValueError):
        build_sampler("random", RECORDS)
    with pytest.raises(TypeError):
        build_sampler("uniform", RECORDS, not_an_option=1)
    # options meant for another sampler are ignored
    assert isinstance(build_sampler("uniform", RECORDS, switch_iter=3, floor=0.1), UniformSampler)
    with pytest.raises(ValueError):
        UniformSampler(RECORDS).load_state_dict(PrioritizedSampler(RECORDS).state_dict())
    with pytest.raises(ValueError):
        UniformSampler(5).load_state_dict(UniformSampler(RECORDS).state_dict())


def test_mixture_shares_are_exact_at_every_draw():
    """0.7 / 0.3 over sets of 6 and 4 prompts, 3 prompts a draw: after T prompts each set has
    had within one prompt of T * w, and exactly 42 / 18 after 60."""
    s = build_sampler("uniform", RECORDS, seed=3, **MIX)
    assert isinstance(s, MixtureSampler)
    got = [0, 0]
    for t in range(1, 21):
        for i in s.sample(3, t):
            got[i >= 6] += 1
        assert all(abs(got[k] - 3 * t * w) < 1 for k, w in enumerate(MIX["weights"])), (t, got)
    assert got == [42, 18]


def test_mixture_keeps_each_sets_sampler_and_shuffles_the_draw():
    s = build_sampler("uniform", RECORDS, seed=0, sizes=[6, 4], weights=[1, 1])
    draws = [s.sample(4, t) for t in range(6)]  # 12 of each set: two epochs of set 1, three of set 2
    first, second = [i for d in draws for i in d if i < 6], [i for d in draws for i in d if i >= 6]
    assert sorted(first[:6]) == list(range(6)) and sorted(first[6:]) == list(range(6))
    for e in range(3):
        assert sorted(second[4 * e:4 * e + 4]) == [6, 7, 8, 9]
    assert len({tuple(i >= 6 for i in d) for d in draws}) > 1  # the sets' order varies


def test_mixture_routes_feedback_to_the_prompts_set():
    s = build_sampler("prioritized", RECORDS, seed=0, floor=0.0, sizes=[6, 4], weights=[0.5, 0.5])
    s.update([7, 7, 2], [1.0, 1.0, 0.0])
    assert s.parts[1].success.tolist() == [0.0, 0.5, 0.0, 0.0]  # global 7 = set 2's prompt 1 (ema 0.5)
    assert s.parts[0].success.tolist() == [0.0] * 6 and s.parts[0].counts[2] == 1
    # floor 0: a set's solved prompt is no longer drawn by it; the other set draws as before
    s.update([6, 8, 9], [1.0, 1.0, 1.0])
    s.update([6, 7, 8, 9], [1.0] * 4)
    assert s.parts[1].success.tolist() == [0.75, 0.75, 0.75, 0.75]
    s.update([6], [1.0] * 1)
    s.update([6], [1.0] * 1)
    assert s.parts[1].probabilities()[0] < s.parts[1].probabilities()[1] / 3
    assert s.parts[0].probabilities().tolist() == [1 / 6] * 6


def test_mixture_errors_name_the_set_and_the_state():
    with pytest.raises(ValueError, match="prompt set 2 of 2: no prompt has difficulty <= 1"):
        build_sampler("curriculum", RECORDS[:4] + [{"difficulty": 9}] * 3, threshold=1, sizes=[4, 3], weights=[1, 1])
    mixed, plain = build_sampler("uniform", RECORDS, **MIX), build_sampler("uniform", RECORDS)
    with pytest.raises(ValueError, match="not a weighted mixture"):
        mixed.load_state_dict(plain.state_dict())
    with pytest.raises(ValueError, match=r"prompt sets of \[5, 5\] prompts, these have \[6, 4\]"):
        mixed.load_state_dict(build_sampler("uniform", RECORDS, sizes=[5, 5], weights=[1, 1]).state_dict())
    with pytest.raises(ValueError, match="sizes of its prompt sets"):
        build_sampler("uniform", RECORDS, sizes=[6, 3], weights=[1, 1])


def test_mixture_resumed_with_new_weights_uses_them_at_once():
    """A resume with changed weights does not first make up the old draws' 'shortfall' (which
    would starve a set for hundreds of iterations): the next draw already has the new shares."""
    old = build_sampler("uniform", RECORDS, seed=1, sizes=[6, 4], weights=[0.5, 0.5])
    for t in range(30):
        old.sample(64, t)
    new = build_sampler("uniform", RECORDS, seed=1, sizes=[6, 4], weights=[0.9, 0.1])
    new.load_state_dict(old.state_dict())
    draw = new.sample(64, 30)
    second = sum(i >= 6 for i in draw)
    assert abs(second - 6.4) < 1 and sum(new.drawn) == 30 * 64 + 64
    same = build_sampler("uniform", RECORDS, seed=1, sizes=[6, 4], weights=[0.5, 0.5])
    same.load_state_dict(old.state_dict())
    assert same.drawn == old.drawn  # unchanged weights: the running totals carry on


def test_state_names_its_prompts():
    """A resume with other prompts of the same count is refused (the prioritized success rates
    would land on the wrong prompts); states without a fingerprint (older checkpoints) load."""
    saved = build_sampler("prioritized", RECORDS, seed=0)
    saved.update([1, 2], [1.0, 0.0])
    other = [dict(r, id=f"x{r['id']}") for r in RECORDS]
    with pytest.raises(ValueError, match="other prompts .* --finetune"):
        build_sampler("prioritized", other).load_state_dict(saved.state_dict())
    reordered = RECORDS[1:] + RECORDS[:1]
    with pytest.raises(ValueError, match="other prompts"):
        build_sampler("prioritized", reordered).load_state_dict(saved.state_dict())
    old_format = {k: v for k, v in saved.state_dict().items() if k != "fingerprint"}
    build_sampler("prioritized", other).load_state_dict(old_format)
    with pytest.raises(ValueError, match="prompt set 2 of 2: sampler state is for other prompts"):
        build_sampler("uniform", RECORDS[:6] + other[6:], **MIX).load_state_dict(
            build_sampler("uniform", RECORDS, **MIX).state_dict())


def test_mixture_sets_given_in_another_order_keep_their_own_state():
    """Two sets of 5 given in swapped order (their weights with them): each set's sampler
    resumes from its own saved state (its success rates and its share), not the other's."""
    a, b = RECORDS[:5], RECORDS[5:]
    saved = build_sampler("prioritized", a + b, seed=0, sizes=[5, 5], weights=[0.8, 0.2])
    for t in range(5):
        ids = saved.sample(5, t)
        saved.update(ids, [float(i < 5) for i in ids])  # set a's prompts all solved
    swapped = build_sampler("prioritized", b + a, seed=0, sizes=[5, 5], weights=[0.2, 0.8])
    swapped.load_state_dict(json.loads(json.dumps(saved.state_dict())))
    assert swapped.parts[0].success.tolist() == saved.parts[1].success.tolist()
    assert swapped.parts[1].success.tolist() == saved.parts[0].success.tolist() != [0.0] * 5
    assert swapped.drawn == saved.drawn[::-1]
    got = [0, 0]
    for t in range(5, 25):
        for i in swapped.sample(5, t):
            got[i >= 5] += 1
    assert got == [20, 80]  # the weights followed their sets: b 0.2, a 0.8
