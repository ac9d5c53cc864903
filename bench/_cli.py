"""Helpers shared by the bench scripts (run as ``python bench/<name>.py``): arguments, the
no-GPU message, and a per-op profile of one run."""

from __future__ import annotations

import argparse
from typing import Optional


def size_arg(text: str) -> int:
    """A positive integer, ``32k`` style allowed (k = 1024): argparse ``type=``."""
    t = text.lower()
    try:
        value = int(t[:-1]) * 1024 if t.endswith("k") else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def cuda_or_explain(script: str, smoke: Optional[bool] = None) -> bool:
    """Whether ``script`` has a CUDA GPU to benchmark on (or runs its CPU ``--smoke`` check;
    ``smoke`` is None for scripts without one).
    Otherwise it says so on stderr; the script then exits with status 0 (``run_all_gpu.sh``
    reads "no CUDA GPU" as a skip)."""
    import sys

    import torch

    if torch.cuda.is_available() or smoke:
        return True
    hint = " (use --smoke to check the script on CPU)" if smoke is not None else ""
    print(f"{script}: no CUDA GPU available; nothing to benchmark{hint}.", file=sys.stderr)
    return False


def add_profile_ops_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--profile-ops", type=int, default=0, metavar="N",
                   help=f"{what} once more under torch.profiler and print its N most expensive ops "
                        "(self device time; our phase ranges included)")


def profile_ops(run, top: int, title: str) -> str:
    """``run()`` under torch.profiler: the ``top`` ops by self time on the device (CPU time
    without CUDA), as ``#``-prefixed lines under ``title`` (markdown tables skip them)."""
    import torch

    cuda = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                      row_limit=top)
    return "\n".join([f"# {title}", *("# " + line for line in table.splitlines())])
