"""Lets tools run from a source checkout without installing the package."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import megatron_k15  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)
