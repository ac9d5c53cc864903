"""Reward registry: built-ins, user plug-ins (module:function), errors, batch scoring."""

import sys
import textwrap

import pytest

from megatron_k15.rewards import registry
from megatron_k15.rewards.registry import compute_reward, get_reward_fn, register, score_batch


def test_builtin_math_and_code():
    assert compute_reward("so \\boxed{\\frac12}", {"task": "math", "answer": "0.5"}) == 1.0
    assert compute_reward("so \\boxed{3}", {"task": "math", "answer": "0.5"}) == 0.0
    rec = {"task": "code", "tests": [{"input": "2", "output": "4"}]}
    assert compute_reward("```python\nprint(int(input())*2)\n```", rec) == 1.0
    assert compute_reward("```python\nprint(int(input())+3)\n```", rec) == 0.0
    assert {"math", "code"} <= set(registry.registered_tasks())


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    name = "k15_user_reward_plugin"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        def length_reward(response, record):
            return float(len(response) == record.get("want", 3))

        NOT_CALLABLE = 5

        def broken(response, record):
            raise RuntimeError("boom")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def test_plugin_module_function(plugin_module):
    fn = get_reward_fn(f"{plugin_module}:length_reward")
    assert fn("abc", {}) == 1.0 and fn("ab", {}) == 0.0
    rec = {"task": "custom", "reward_fn": f"{plugin_module}:length_reward", "want": 2}
    assert compute_reward("ab", rec) == 1.0
    # a plug-in registered under a task name
    register("lengthy", f"{plugin_module}:length_reward")
    try:
        assert compute_reward("abc", {"task": "lengthy"}) == 1.0
        assert compute_reward("abcd", {"task": "lengthy"}) == 0.0
    finally:
        registry.unregister("lengthy")


def test_register_callable_and_overwrite():
    register("always_one", lambda r, rec: 1.0)
    try:
        assert compute_reward("x", {"task": "always_one"}) == 1.0
        with pytest.raises(ValueError, match="already registered"):
            register("always_one", lambda r, rec: 0.0)
        register("always_one", lambda r, rec: 0.0, overwrite=True)
        assert compute_reward("x", {"task": "always_one"}) == 0.0
    finally:
        registry.unregister("always_one")
    with pytest.raises(TypeError):
        register("bad", 42)  # type: ignore[arg-type]
    register("not_a_number", lambda r, rec: float("nan"))
    try:  # a NaN reward would turn its group's advantages and every update to NaN
        with pytest.raises(ValueError, match="'not_a_number' returned nan for record 'q7'"):
            compute_reward("x", {"task": "not_a_number", "id": "q7"})
    finally:
        registry.unregister("not_a_number")


def test_errors_name_the_spec(plugin_module):
    with pytest.raises(ImportError, match="no_such_module_k15:fn"):
        get_reward_fn("no_such_module_k15:fn")
    with pytest.raises(ImportError, match=f"{plugin_module}:missing"):
        get_reward_fn(f"{plugin_module}:missing")
    with pytest.raises(TypeError, match="NOT_CALLABLE"):
        get_reward_fn(f"{plugin_module}:NOT_CALLABLE")
    with pytest.raises(ValueError, match="module:function"):
        get_reward_fn(":fn")
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        get_reward_fn("nope")
    with pytest.raises(KeyError, match="unknown task 'chess'"):
        compute_reward("x", {"task": "chess", "id": "p1"})
    with pytest.raises(KeyError, match="no 'task'"):
        compute_reward("x", {"id": "p2"})
    with pytest.raises(RuntimeError, match="boom"):
        compute_reward("x", {"task": "t", "reward_fn": f"{plugin_module}:broken"})


def test_score_batch_serial_and_pool():
    responses = ["\\boxed{2}", "\\boxed{3}", "the answer is 4", "```python\nprint(input())\n```"]
    records = [{"task": "math", "answer": "2"}, {"task": "math", "answer": "2"},
               {"task": "math", "answer": "4"},
               {"task": "code", "tests": [{"input": "hi", "output": "hi"}]}]
    want = [1.0, 0.0, 1.0, 1.0]
    assert score_batch(responses, records) == want
    assert score_batch(responses, records, workers=2) == want
    with pytest.raises(ValueError):
        score_batch(responses, records[:2])
