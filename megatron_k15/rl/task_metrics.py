"""Metrics per task of a mixed prompt set (Kimi k1.5 trains on math, code, ... at once): the
iteration's and the evaluation's means split by each prompt's ``task`` field, so that one
task's progress or collapse is not hidden in the overall mean. Keys are ``{task}/{name}``
(TensorBoard groups them by task); a prompt set of one task gets none (the overall metrics
say it all)."""

from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence


def task_of(record: dict) -> str:
    return str(record.get("task") or "none")


def tasks_of(records: Sequence[dict]) -> list[str]:
    """The distinct tasks of a prompt set, sorted."""
    return sorted({task_of(r) for r in records})


def by_task(tasks: Sequence[str], values: dict[str, Sequence[float]], count_name: str = "samples",
            all_tasks: Optional[Sequence[str]] = None) -> dict[str, float]:
    """``{task}/{name}``: the mean of ``values[name]`` over the items of each task (``tasks[i]``
    is item i's), and ``{task}/{count_name}``: how many items it had. Empty when ``all_tasks``
    (the prompt set's; default: those present) holds fewer than two."""
    if len(all_tasks if all_tasks is not None else set(tasks)) < 2:
        return {}
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(tasks):
        groups[t].append(i)
    out: dict[str, float] = {}
    for t in sorted(groups):
        idx = groups[t]
        for name, vals in values.items():
            out[f"{t}/{name}"] = sum(float(vals[i]) for i in idx) / len(idx)
        out[f"{t}/{count_name}"] = float(len(idx))
    return out
