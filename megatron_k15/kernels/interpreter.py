"""Faster CPU runs of our Triton kernels under ``TRITON_INTERPRET=1``.

The interpreter builds every integer ``+ - *`` of a kernel twice when ``sanitize_overflow`` is
on (its default): once as asked, once widened to int64 and compared with the int32 range, for a
device assert. Device asserts are emitted only in debug mode, which the interpreter never
enables, so the check is computed and thrown away: about a third of the interpreted time of the
attention kernels (cProfile of the cp=2 SFT test: 47 s of 137 s). Turning the option off when
debug is off changes no result.
"""

from __future__ import annotations

import dataclasses
import os


def import_triton():
    """(triton, triton.language, True), or (None, None, False) where Triton cannot be imported
    (a CPU-only install: the kernels' callers then take their PyTorch paths)."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        return None, None, False
    return triton, tl, True


def interpreting() -> bool:
    """Triton's own reading of TRITON_INTERPRET (a boolean knob)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")


def drop_dead_overflow_checks() -> bool:
    """Make the interpreter skip the overflow checks it would discard; True if they are off."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if not dataclasses.is_dataclass(options) or getattr(options, "debug", True):
        return False
    if getattr(options, "sanitize_overflow", False):
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
    return True
