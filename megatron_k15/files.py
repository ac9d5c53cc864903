"""Files written so that a crash leaves either the old file or the complete new one, never a
half-written one: the tools' outputs, checkpoints' ``latest`` pointer, whole directories."""

from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from typing import IO, Iterator


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary sibling of ``path`` for a writer that takes a file name (a profiler's
    trace export, a memory snapshot); rename it to ``path`` when the block ends without an
    exception, else delete it (``path`` keeps what it held). Creates the parent directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise


@contextmanager
def atomic_file(path: str, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it to ``path`` when the block
    ends without an exception, else delete it (``path`` keeps what it held). Creates the
    parent directory."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def write_text_atomic(path: str, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


@contextmanager
def atomic_directory(final_path: str) -> Iterator[str]:
    """Yield a temporary sibling directory; rename it to ``final_path`` only on success."""
    parent = os.path.dirname(os.path.abspath(final_path)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{os.path.basename(final_path)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(final_path):
            old = f"{tmp}-old"
            os.replace(final_path, old)
            os.replace(tmp, final_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
