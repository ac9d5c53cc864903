"""GPU proof tests (``pytest -m gpu tests/gpu``): real sizes, bf16/fp16, compiled Triton kernels.

Every module here is marked ``gpu`` and skipped without CUDA (tests/conftest.py registers the
marker), unless ``GPU_KIT_DEVICE=cpu`` asks for the logic check at tiny sizes on CPU
(``gpu_refs.py``; run by tests/test_gpu_kit.py). ``check(quantity, error, bound)`` records a
comparison, ``check.done()`` asserts them all; when ``GPU_KIT_RECORD`` names a file each
comparison is appended to it as a JSON line ``{"test", "quantity", "error", "bound", "ok"}``,
which ``bench/run_all_gpu.sh`` turns into a table of measured errors next to their bounds.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent):  # gpu_refs, and tests/ for helpers of the CPU tests
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

class _Checker:
    """``check(quantity, error, bound)`` records one comparison (NaN never passes);
    ``check.done()`` then asserts that all of them passed, so every error is recorded even
    when an early one fails."""

    def __init__(self, nodeid: str, path: str):
        self.nodeid, self.path, self.failed, self.finished = nodeid, path, [], False

    def __call__(self, quantity: str, error: float, bound: float) -> bool:
        error, bound = float(error), float(bound)
        ok = math.isfinite(error) and error <= bound
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps({"test": self.nodeid, "quantity": quantity, "error": error,
                                    "bound": bound, "ok": ok}) + "\n")
        if not ok:
            self.failed.append(f"{quantity}: error {error:.3e} > bound {bound:.3e}")
        return ok

    def done(self) -> None:
        self.finished = True
        assert not self.failed, "; ".join(self.failed)


@pytest.fixture
def check(request):
    checker = _Checker(request.node.nodeid, os.environ.get("GPU_KIT_RECORD", ""))
    yield checker
    assert checker.finished or not checker.failed, "a test recorded checks but never called done()"


@pytest.fixture(scope="session")
def single_rank():
    """A one-rank process group (nccl on GPU) with megatron-core's groups and seeded RNGs
    (GPU initialisation of megatron-core layers needs its CUDA RNG tracker)."""
    from megatron_k15.initialize import initialize_model_parallel, set_seed

    initialize_model_parallel(1)
    set_seed(1234)
    yield


@pytest.fixture(autouse=True)
def _free_gpu_memory():
    yield
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
