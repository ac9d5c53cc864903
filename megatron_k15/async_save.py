"""``--async-save``: write checkpoint shards in the background while training goes on.

A synchronous save stalls every rank for as long as the slowest rank takes to serialise its
model and optimizer shard (tens of seconds for a 7B shard on a parallel file system, every
``--save-interval``). Here a save costs training only the time to copy the shard to host
memory (``snapshot_to_cpu``); a writer thread serialises the copy, and the checkpoint is made
current (renamed, ``latest`` rewritten) only once every rank's thread has finished.

That last step is collective: each iteration the trainer calls ``maybe_finalize()`` on every
rank, which agrees over the world (one tiny all-reduce, only while a save is in flight) on
whether all writes are done. Until then the checkpoint lives under its temporary name, so a
crash or ``kill -9`` at any moment leaves the previous checkpoint current, exactly as with a
synchronous save. At most one save is in flight: a new one first finishes the old.

Cost: a second host copy of this rank's shard while it is being written."""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron_k15.checkpointing import CheckpointError


def snapshot_to_cpu(obj):
    """A deep copy of a tree of dicts/lists/tuples whose tensors are copied to CPU memory, so
    training can go on updating the originals in place while the copy is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot_to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(snapshot_to_cpu(v) for v in obj)
    return obj


class AsyncCheckpointSaver:
    """One background checkpoint write at a time, finalised collectively (see module doc)."""

    def __init__(self) -> None:
        self._thread: Optional[threading.Thread] = None
        self._finalize: Optional[Callable[[], None]] = None
        self._error: Optional[BaseException] = None
        self._label = ""
        self._started = 0.0
        self._stalled = 0.0
        self.write_seconds = 0.0  # of the last finished write, on this rank

    @property
    def pending(self) -> bool:
        return self._finalize is not None

    def submit(self, write: Callable[[], None], finalize: Callable[[], None], label: str,
               stalled_s: float = 0.0) -> None:
        """Run ``write`` (this rank's files) on a thread; ``finalize`` (rank 0 makes the
        checkpoint current) runs once every rank's write is done. Collective: call on every
        rank, each with its own ``write``. ``stalled_s``: what the save cost training (reported)."""
        self.maybe_finalize(blocking=True)
        self._error, self._label, self._started, self._stalled = None, label, time.time(), stalled_s

        def run() -> None:
            try:
                write()
            except BaseException as e:  # reported to every rank by maybe_finalize
                self._error = e
            self.write_seconds = time.time() - self._started

        self._finalize = finalize
        self._thread = threading.Thread(target=run, name=f"async-save-{label}", daemon=True)
        self._thread.start()

    def maybe_finalize(self, blocking: bool = False) -> bool:
        """Make the pending checkpoint current if every rank has written its part (with
        ``blocking``, wait for that). Collective. Returns whether a checkpoint was finalised;
        raises on every rank if a write failed (the previous checkpoint stays current)."""
        if self._finalize is None:
            return False
        from megatron_k15.training import group_reduce

        if blocking:
            self._thread.join()
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.group.WORLD if distributed else None

        def least(value: int) -> int:  # over every rank: one MIN all-reduce
            return int(group_reduce(value, world, dist.ReduceOp.MIN, torch.int64))

        # 0: still writing somewhere; 1: all written, some failed; 2: all written
        state = least(0 if self._thread.is_alive() else 1 if self._error is not None else 2)
        if state == 0:
            return False
        self._thread.join()
        finalize, self._finalize, self._thread = self._finalize, None, None
        if state == 1:
            reason = f": {self._error!r}" if self._error is not None else " on another rank"
            raise CheckpointError(f"--async-save: writing checkpoint {self._label} failed{reason}; the previous "
                                  "checkpoint stays current") from self._error
        failure = None
        try:
            finalize()
        except OSError as e:  # rank 0's rename failed: every rank must hear it, not wait in a barrier
            failure = e
        # every rank hears of a failure, and sees the checkpoint current when this returns
        if not least(1 if failure is None else 0):
            where = f": {failure!r}" if failure is not None else " on rank 0"
            raise CheckpointError(f"--async-save: making checkpoint {self._label} current failed{where}") from failure
        if not distributed or dist.get_rank() == 0:
            print(f"[checkpointing] {self._label} written in the background in {self.write_seconds:.2f} s "
                  f"(training stalled {self._stalled:.2f} s for it)", flush=True)
        return True
