"""Argument helpers shared by the bench scripts (run as ``python bench/<name>.py``)."""

from __future__ import annotations

import argparse


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
