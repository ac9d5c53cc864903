"""Argument helpers shared by the bench scripts (run as ``python bench/<name>.py``)."""

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
