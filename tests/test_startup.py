"""megatron-core imported through megatron_k15 defers its torch.compile decorations (no
TorchDynamo / Inductor import at start-up) and still compiles them when they first run; its
process groups, set up again, do not leak the old ones."""

import subprocess
import sys

import torch

from megatron_k15._startup import compile_on_first_call

PROBE = """
import sys
import megatron_k15
from megatron.core import parallel_state, tensor_parallel
from megatron.core.jit import jit_fuser
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl  # decorated at import
print(jit_fuser.__name__, "torch._dynamo" in sys.modules, "torch._inductor.compile_fx" in sys.modules)
"""


def test_megatron_core_imports_without_dynamo():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["compile_on_first_call", "False", "False"], out


def test_compile_on_first_call_compiles_once_when_called(monkeypatch):
    calls = []

    def fake_compile(fn):
        calls.append(fn)
        return lambda *a, **k: ("compiled", fn(*a, **k))

    monkeypatch.setattr(torch, "compile", fake_compile)

    def add(x, y=1):
        """adds"""
        return x + y

    lazy = compile_on_first_call(add)
    assert calls == [] and lazy.__name__ == "add" and lazy.__doc__ == "adds"
    assert lazy(2, y=3) == ("compiled", 5) and lazy(1) == ("compiled", 2)
    assert calls == [add]  # compiled once, at the first call


def test_reinitialising_model_parallel_frees_the_old_groups():
    """Each initialize_model_parallel call replaces megatron-core's groups; the old ones are
    destroyed, not just forgotten (68 descriptors leaked per call before)."""
    import os

    from megatron_k15.initialize import initialize_model_parallel

    initialize_model_parallel(1)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        initialize_model_parallel(1)
    assert len(os.listdir("/proc/self/fd")) <= before
