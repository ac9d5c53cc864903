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


def _defer(module) -> None:
    """Swap an imported ``megatron.core.jit``'s ``jit_fuser`` when it is ``torch.compile``."""
    import torch

    if getattr(module, "jit_fuser", None) is torch.compile:
        module.jit_fuser = compile_on_first_call


class _DeferringLoader(importlib.abc.Loader):
    """The module's own loader, then ``_defer``."""

    def __init__(self, inner):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        self.inner.exec_module(module)
        _defer(module)

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self.inner, name)


class _DeferJitFuser(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core.jit`` with the finders after this one and wraps its loader."""

    def find_spec(self, name, path, target=None):
        if name != _JIT_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _DeferringLoader(spec.loader)
        return spec


def install() -> None:
    """Add the hook once; when megatron-core's jit module is already imported, swap its
    ``jit_fuser`` directly (kernels decorated before that stay as they are)."""
    if _JIT_MODULE in sys.modules:
        _defer(sys.modules[_JIT_MODULE])
    elif not any(isinstance(f, _DeferJitFuser) for f in sys.meta_path):
        sys.meta_path.insert(0, _DeferJitFuser())
