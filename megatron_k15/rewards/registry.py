"""Reward registry: picks a reward function by a prompt's ``task`` field.

A reward function has the signature ``fn(response: str, record: dict) -> float``. Built-ins:
``math`` (:func:`megatron_k15.rewards.math.math_reward`) and ``code``
(:func:`megatron_k15.rewards.code.code_reward`). Users add their own with :func:`register` or
name a plug-in as ``"package.module:function"`` (in a record's ``reward_fn`` field, as a
task's registered spec, or directly in :func:`get_reward_fn`).
"""

from __future__ import annotations

import importlib
import math
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Optional, Sequence, Union

__all__ = ["RewardFn", "register", "unregister", "get_reward_fn", "compute_reward",
           "score_batch", "registered_tasks"]

RewardFn = Callable[[str, dict], float]


def _math(response: str, record: dict) -> float:
    from megatron_k15.rewards.math import math_reward

    return math_reward(response, record)


def _code(response: str, record: dict) -> float:
    from megatron_k15.rewards.code import code_reward

    return code_reward(response, record)


_REGISTRY: dict[str, Union[RewardFn, str]] = {"math": _math, "code": _code}


def register(name: str, fn: Union[RewardFn, str], *, overwrite: bool = False) -> None:
    """Register ``fn`` (a callable or a ``module:function`` spec) for task ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    if not (callable(fn) or (isinstance(fn, str) and ":" in fn)):
        raise TypeError(f"reward for {name!r} must be callable or a 'module:function' string")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"reward {name!r} is already registered (pass overwrite=True)")
    _REGISTRY[name] = fn


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def registered_tasks() -> list[str]:
    return sorted(_REGISTRY)


def _load_plugin(spec: str) -> RewardFn:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward plug-in {spec!r} must look like 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001
        raise ImportError(f"cannot import reward plug-in {spec!r}: {type(e).__name__}: {e}") from e
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise ImportError(f"reward plug-in {spec!r}: module {module_name!r} has no "
                              f"attribute {attr!r}") from e
    if not callable(obj):
        raise TypeError(f"reward plug-in {spec!r} is not callable")
    return obj


def get_reward_fn(spec: Union[str, RewardFn]) -> RewardFn:
    """A registered name, a ``module:function`` plug-in, or a callable -> reward function."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"reward spec must be a string or callable, got {type(spec).__name__}")
    if spec in _REGISTRY:
        fn = _REGISTRY[spec]
        return _load_plugin(fn) if isinstance(fn, str) else fn
    if ":" in spec:
        return _load_plugin(spec)
    raise KeyError(f"unknown reward {spec!r}; registered: {', '.join(registered_tasks())}; "
                   "or give a plug-in as 'module:function'")


def compute_reward(response: str, record: dict) -> float:
    """Score one response with the reward for ``record["task"]`` (or ``record["reward_fn"]``)."""
    if not isinstance(record, dict):
        raise TypeError(f"record must be a dict, got {type(record).__name__}")
    spec = record.get("reward_fn") or record.get("task")
    if spec is None:
        raise KeyError(f"record {record.get('id', '?')!r} has no 'task' field")
    if isinstance(spec, str) and spec not in _REGISTRY and ":" not in spec:
        raise KeyError(f"unknown task {spec!r} in record {record.get('id', '?')!r}; "
                       f"registered: {', '.join(registered_tasks())}")
    value = float(get_reward_fn(spec)(response, record))
    if not math.isfinite(value):  # it would turn its group's advantages, and every update, to NaN
        raise ValueError(f"reward {spec!r} returned {value} for record {record.get('id', '?')!r}; a reward "
                         f"must be a finite number")
    return value


def _score_one(args):
    response, record = args
    return compute_reward(response, record)


def score_batch(responses: Sequence[str], records: Sequence[dict], workers: Optional[int] = None
                ) -> list[float]:
    """Rewards for ``responses[i]`` against ``records[i]``; with ``workers > 1`` in a process
    pool (rewards run there must be importable: built-ins, plug-ins and module-level
    functions registered before the pool starts)."""
    if len(responses) != len(records):
        raise ValueError(f"{len(responses)} responses but {len(records)} records")
    pairs = list(zip(responses, records))
    if not workers or workers <= 1 or len(pairs) <= 1:
        return [_score_one(p) for p in pairs]
    import multiprocessing as mp

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(max_workers=min(workers, len(pairs)), mp_context=ctx) as pool:
        return list(pool.map(_score_one, pairs))
