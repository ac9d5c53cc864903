"""When a training run stops before ``--train-iters``: Megatron-LM's exit flags.

A cluster job has a time limit and can be preempted; the run should end on a checkpoint
instead of losing the iterations since the last ``--save-interval``. At the end of every
iteration the trainers ask ``ExitConditions.reason(iteration)``; a non-empty answer makes them
save (``--save``) and exit 0, and ``--load`` on the same directory resumes there.

- ``--exit-signal-handler``: SIGTERM or SIGUSR1 (Slurm's ``--signal``, a preemption) sets a
  flag; the run finishes the iteration it is in.
- ``--exit-duration-in-mins M``: stop once the run has lasted M minutes (from the start of
  ``main``, loading included), measured after each iteration. Set it to the job's time limit
  minus one iteration and one save.
- ``--exit-interval N``: stop after an iteration that is a multiple of N.

Signals arrive at some ranks and not others, and clocks differ, so both are combined in one
all-reduce (MAX) over all ranks per iteration: every rank takes the same decision, and no rank
leaves while another enters a collective.
"""

from __future__ import annotations

import time
from typing import Optional

SIGNALS = ("SIGTERM", "SIGUSR1")


def add_exit_args(g) -> None:
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM or SIGUSR1: finish the iteration, save a checkpoint (--save) and exit 0")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop after the iteration during which the run's wall time passed this many minutes; "
                        "save (--save) and exit 0 (e.g. the job's time limit minus one iteration and a save)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop after an iteration that is a multiple of this; save (--save) and exit 0")


def check_exit_args(args) -> Optional[str]:
    """The problem with the --exit-* flags, or None."""
    duration = getattr(args, "exit_duration_in_mins", None)
    if duration is not None and not duration > 0:
        return f"--exit-duration-in-mins must be > 0, got {duration}"
    interval = getattr(args, "exit_interval", None)
    if interval is not None and interval < 1:
        return f"--exit-interval must be >= 1, got {interval}"
    return None


class ExitConditions:
    """The trainers' early-stop test; build it at the start of ``main`` (the duration counts
    from then) and call ``restore()`` after the final save (a second signal must not interrupt
    it: until then signals only set the flag)."""

    def __init__(self, args, start_time: Optional[float] = None):
        import signal

        self.start_time = time.time() if start_time is None else start_time
        self.duration_s = (args.exit_duration_in_mins * 60.0
                           if getattr(args, "exit_duration_in_mins", None) is not None else None)
        self.interval = getattr(args, "exit_interval", None)
        self.handle_signals = bool(getattr(args, "exit_signal_handler", False))
        self.received: Optional[str] = None
        self._previous = {}
        if self.handle_signals:
            for name in SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        import signal

        self.received = signal.Signals(signum).name

    def reason(self, iteration: int) -> Optional[str]:
        """Why to stop after ``iteration`` (the number of iterations done), or None. Collective
        over all ranks when a signal handler or a duration is set; the same answer everywhere."""
        if self.interval is not None and iteration % self.interval == 0:
            return f"--exit-interval {self.interval}"
        if not self.handle_signals and self.duration_s is None:
            return None
        import torch
        import torch.distributed as dist

        from megatron_k15 import platform

        elapsed = time.time() - self.start_time
        flags = torch.tensor([1 if self.received else 0,
                              1 if self.duration_s is not None and elapsed > self.duration_s else 0],
                             dtype=torch.int64)
        if dist.is_initialized():
            if dist.get_backend() == "nccl":
                flags = flags.to(platform.current_device())
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        signalled, overtime = (bool(v) for v in flags.tolist())
        if signalled:
            return f"{self.received or 'a signal'} received"
        if overtime:
            return f"--exit-duration-in-mins {self.duration_s / 60.0:g} passed"
        return None

    def stop_after(self, iteration: int, train_iters: int, save: Optional[str], name: str) -> bool:
        """``reason`` before the last iteration, announced by rank 0 as ``[name] ...``."""
        stop = self.reason(iteration) if iteration < train_iters else None
        if stop:
            import torch.distributed as dist

            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"[{name}] {stop}: stopping after iteration {iteration}"
                      + (f", checkpoint in {save}" if save else " (no --save: nothing saved)"), flush=True)
        return bool(stop)

    def restore(self) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
