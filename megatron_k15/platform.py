"""Where we run: CUDA + nccl when a GPU is present, otherwise CPU + gloo.

Everything device-specific asks this module, so the same code path runs in CPU tests and
on GPU clusters.
"""

from __future__ import annotations

import os

import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


def default_backend() -> str:
    return "nccl" if has_cuda() else "gloo"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def current_device() -> torch.device:
    if has_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_dtype(bf16: bool = False, fp16: bool = False) -> torch.dtype:
    if bf16:
        return torch.bfloat16
    if fp16:
        return torch.float16
    return torch.float32


def synchronize() -> None:
    if has_cuda():
        torch.cuda.synchronize()


def peak_memory_bytes() -> int:
    """Peak allocated device memory (GPU) or peak resident set size (CPU)."""
    if has_cuda():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
