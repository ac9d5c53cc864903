"""``--manual-gc`` (Megatron-LM's): Python's garbage collector at the same iterations on every rank.

The automatic collector runs when allocation counts cross its thresholds, which happens at a
different moment on each rank; a rank paused in a full collection (hundreds of ms with the
millions of objects a trainer, tokenizer and replay buffer hold) stalls every collective the
others are waiting in. With ``--manual-gc`` automatic collection is off; ``gc.collect()`` runs
every ``--manual-gc-interval`` iterations (0: never in training) and, unless
``--no-manual-gc-eval``, before and after each evaluation. Reference cycles still get freed,
just at points every rank reaches together.
"""

from __future__ import annotations

import contextlib
import gc


def add_manual_gc_args(g) -> None:
    g.add_argument("--manual-gc", action="store_true",
                   help="turn Python's automatic garbage collection off and collect at fixed iterations "
                        "on every rank (no rank stalls the others in a collection of its own)")
    g.add_argument("--manual-gc-interval", type=int, default=0,
                   help="with --manual-gc: gc.collect() every N iterations (0: only around evaluations)")
    g.add_argument("--no-manual-gc-eval", dest="manual_gc_eval", action="store_false",
                   help="with --manual-gc: no collection around evaluations")


def check_manual_gc_args(args):
    interval = getattr(args, "manual_gc_interval", 0)
    if interval < 0:
        return f"--manual-gc-interval must be >= 0, got {interval}"
    if not getattr(args, "manual_gc", False) and (interval or not getattr(args, "manual_gc_eval", True)):
        flag = "--manual-gc-interval" if interval else "--no-manual-gc-eval"
        return f"{flag} applies to --manual-gc; add it or drop the flag"
    return None


class ManualGC:
    """Owns the collector for one training run: ``start`` turns it off (after one full
    collection), ``after_iteration`` / ``around_eval`` collect, ``close`` turns it back on."""

    def __init__(self, args):
        self.enabled = bool(getattr(args, "manual_gc", False))
        self.interval = int(getattr(args, "manual_gc_interval", 0))
        self.at_eval = bool(getattr(args, "manual_gc_eval", True))
        self._was_enabled = gc.isenabled()

    def start(self) -> None:
        if self.enabled:
            gc.disable()
            gc.collect()

    def after_iteration(self, iteration: int) -> None:
        if self.enabled and self.interval and iteration % self.interval == 0:
            gc.collect()

    @contextlib.contextmanager
    def around_eval(self):
        if self.enabled and self.at_eval:
            gc.collect()
        try:
            yield
        finally:
            if self.enabled and self.at_eval:
                gc.collect()

    def close(self) -> None:
        if self.enabled and self._was_enabled:
            gc.enable()
