"""Process start-up: megatron-core without torch.compile's import bill.

megatron-core binds ``megatron.core.jit.jit_fuser = torch.compile`` and decorates its fusion
kernels (bias-GeLU, bias-SwiGLU, ...) with it while ``megatron.core`` is imported; decorating
imports TorchDynamo and Inductor, about 3 s of CPU per process. Every rank of every launch
pays it (4 ranks sharing 2 cores: 6 s of wall time before any work), although this codebase
never calls those kernels (the model, its fusions and its attention are ours).

``install()`` (run when ``megatron_k15`` is imported, before any ``megatron.core`` import)
adds an import hook that, right after ``megatron.core.jit`` executes, swaps its
``jit_fuser`` for ``compile_on_first_call``: the same ``torch.compile``, applied when a
decorated kernel first runs instead of at import. Nothing else of megatron-core changes; if
its jit module ever looks different, the hook leaves it alone.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

_JIT_MODULE = "megatron.core.jit"


def compile_on_first_call(fn):
    """``torch.compile(fn)``, deferred until ``fn`` is first called."""
    compiled = None

    @functools.wraps(fn)
    def run(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = torch.compile(fn)
        return compiled(*args, **kwargs)

    return run


class _DeferJitFuser(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.jit`` like the next finders would and wraps its loader's
    ``exec_module`` to swap ``jit_fuser`` once the module has run."""

    def find_spec(self, name, path, target=None):
        if name != _JIT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            import torch

            if getattr(module, "jit_fuser", None) is torch.compile:
                module.jit_fuser = compile_on_first_call

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Add the hook once (a no-op when megatron-core is already imported)."""
    if _JIT_MODULE in sys.modules or any(isinstance(f, _DeferJitFuser) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _DeferJitFuser())
