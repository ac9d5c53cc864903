"""--profile --use-pytorch-profiler and --record-memory-history on a GPU (what CPU tests cannot
see): the trace of the window holds CUDA kernels inside its iteration ranges, and the CUDA
allocator's snapshot is written and readable (pytorch.org/memory_viz's input)."""

from __future__ import annotations

import argparse
import json
import pickle

import torch

from gpu_refs import DEVICE, ON_GPU, gpu_marks

pytestmark = gpu_marks()


def test_profile_window_and_memory_snapshot(tmp_path):
    from megatron_k15.profiling import StepProfiler

    args = argparse.Namespace(profile=True, use_pytorch_profiler=True, profile_step_start=1, profile_step_end=2,
                              profile_ranks=[0], profile_dir=str(tmp_path), tensorboard_dir=None,
                              pytorch_profiler_collect_shapes=False, pytorch_profiler_collect_callstack=False,
                              record_memory_history=ON_GPU, memory_snapshot_path=None)
    profiler = StepProfiler(args, rank=0)
    x = torch.randn(1024, 1024, device=DEVICE)
    for done in range(3):
        with profiler.iteration(done):
            y = x @ x
            del y
    profiler.close()
    trace = tmp_path / "rank0.iterations2-2.pt.trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "iteration 2" for e in events)
    if not ON_GPU:  # CPU logic check: no CUDA kernels or allocator to record
        return
    assert any(e.get("cat") == "kernel" for e in events), "no CUDA kernel in the trace"
    with open(tmp_path / "memory_snapshot.rank0.pickle", "rb") as f:
        snapshot = pickle.load(f)
    assert snapshot["segments"] and "device_traces" in snapshot
