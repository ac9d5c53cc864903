"""Results of a long job kept as it goes, so that a preempted run resumes where it stopped
(``tools/evaluate.py``, the generate CLI).

``OUTPUT.partial`` holds one JSON line per finished item, carrying its ``index`` in the input.
Lines are appended a chunk at a time and flushed to disk before the next chunk starts. On
``--resume`` the whole lines are read back (a line the interruption cut short is dropped, and
cut off the file before the run appends after it); each must still describe the same input
item, else the input changed and the run refuses to mix the two. The final output is written
atomically from everything and the partial file is removed after it.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

from megatron_k15.data.prompts import DataError, parse_json_line

PARTIAL_SUFFIX = ".partial"


def partial_path(output: str) -> str:
    return output + PARTIAL_SUFFIX


def resume_problem(output: str, resume: bool) -> Optional[str]:
    """Why a run must not start (a partial file it would overwrite), else None."""
    path = partial_path(output)
    if os.path.exists(path) and not resume:
        return (f"{path} holds what an interrupted run finished: pass --resume to continue it, or delete it "
                "to start over")
    return None


def read_partial(path: str, count: int,
                 mismatch: Callable[[int, dict], Optional[tuple[str, str]]]) -> tuple[dict[int, dict], int]:
    """The kept results by index (in ``[0, count)``) and the byte length of the file's whole
    lines. ``mismatch(index, line)`` returns (field, why) when a line no longer describes the
    input's item ``index``; that, a bad index or bad JSON raise :class:`DataError`."""
    done: dict[int, dict] = {}
    if not os.path.exists(path):
        return done, 0
    with open(path, "rb") as f:
        data = f.read()
    whole = data[:data.rfind(b"\n") + 1]
    for line, raw in enumerate(whole.splitlines(), start=1):
        r = parse_json_line(path, line, raw)
        if r is None:
            continue
        i = r.get("index")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < count:
            raise DataError(path, line, "index", f"{i!r} is no item of the input ({count} of them): it changed "
                            "since; delete the file to start over")
        problem = mismatch(i, r)
        if problem is not None:
            raise DataError(path, line, *problem)
        done[i] = r
    return done, len(whole)


def resume_from(output: str, count: int, mismatch: Callable[[int, dict], Optional[tuple[str, str]]],
                writer: bool) -> tuple[str, dict[int, dict]]:
    """(the partial file of ``output``, its kept results by index): :func:`read_partial` on
    every rank (a shared file system, as for checkpoints), and on the ``writer`` rank a line
    the interruption cut short is cut off the file."""
    path = partial_path(output)
    done, whole_bytes = read_partial(path, count, mismatch)
    if writer:
        drop_cut_line(path, whole_bytes)
    return path, done


def drop_cut_line(path: str, whole_bytes: int) -> None:
    """Cut a line the interruption left half-written off the file (call on one rank)."""
    if os.path.exists(path) and os.path.getsize(path) > whole_bytes:
        os.truncate(path, whole_bytes)


def append_lines(path: str, lines) -> None:
    """Append whole lines and make them durable before going on."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def finish(path: str) -> None:
    """After the final output is written: the partial results are no longer needed."""
    if os.path.exists(path):
        os.remove(path)
