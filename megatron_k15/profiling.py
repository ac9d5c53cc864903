"""Profiling a window of training iterations: Megatron-LM's ``--profile`` flags.

A profile of a whole run is too big to open and mostly start-up; what one wants is a few
steady-state iterations. ``--profile`` marks the iterations ``--profile-step-start`` <
n <= ``--profile-step-end`` (n as logged, counting from 1; the defaults 10 and 12 profile
iterations 11 and 12) on the ranks in ``--profile-ranks``:

- ``--use-pytorch-profiler``: ``torch.profiler`` records CPU ops (and CUDA kernels on a GPU)
  over the window and writes ``rank{R}.iterations{a}-{b}.pt.trace.json`` (open it in Perfetto
  or chrome://tracing) and a ``.summary.txt`` table of the ops' total times, to
  ``--profile-dir`` (default ``<--tensorboard-dir>/profile``), each file written atomically.
- without it (GPU only): the window is bracketed by ``cudaProfilerStart/Stop`` with NVTX
  ranges for every op, for ``nsys profile --capture-range=cudaProfilerApi
  --capture-range-end=stop``.
- ``--record-memory-history`` (GPU only, with or without ``--profile``): the CUDA caching
  allocator records every allocation with its stack from the first iteration on; the snapshot
  is dumped after the window's end (or when the run ends first, or fails: an out-of-memory
  error is what one records it for) to ``--memory-snapshot-path``; open it in
  https://pytorch.org/memory_viz.

The counts are absolute iteration numbers: a run resumed inside the window profiles what is
left of it. Each iteration is a ``iteration {n}`` range and the trainers mark their phases
with ``phase(name)`` (rollout, score, logprobs, train; forward / backward of each
microbatch, grad sync, optimizer), which costs nothing while no profiler is recording.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Iterator, Optional

import torch

from megatron_k15.files import atomic_path, write_text_atomic

DEFAULT_STEP_START, DEFAULT_STEP_END = 10, 12


def add_profile_args(p) -> None:
    g = p.add_argument_group("profiling")
    g.add_argument("--profile", action="store_true",
                   help="profile iterations --profile-step-start+1 .. --profile-step-end on --profile-ranks "
                        "(nsys ranges on a GPU; --use-pytorch-profiler for torch.profiler traces)")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="with --profile: torch.profiler over the window, a Chrome/Perfetto trace and an op "
                        "summary per rank in --profile-dir")
    g.add_argument("--profile-step-start", type=int, default=None,
                   help=f"iterations done when profiling starts (default {DEFAULT_STEP_START})")
    g.add_argument("--profile-step-end", type=int, default=None,
                   help=f"iterations done when profiling stops (default {DEFAULT_STEP_END})")
    g.add_argument("--profile-ranks", type=int, nargs="+", default=None,
                   help="global ranks that profile (default: 0)")
    g.add_argument("--profile-dir", default=None,
                   help="where --use-pytorch-profiler writes (default: <--tensorboard-dir>/profile)")
    g.add_argument("--pytorch-profiler-collect-shapes", action="store_true",
                   help="record the input shapes of every op (bigger traces)")
    g.add_argument("--pytorch-profiler-collect-callstack", action="store_true",
                   help="record the Python stack of every op (much bigger traces)")
    g.add_argument("--record-memory-history", action="store_true",
                   help="GPU: record the CUDA allocator's history from the first iteration and dump a "
                        "snapshot after --profile-step-end (or at the run's end) to --memory-snapshot-path")
    g.add_argument("--memory-snapshot-path", default=None,
                   help="the memory snapshot's file, one per profiled rank: {rank} is replaced by the rank "
                        "(default: <profile dir>/memory_snapshot.rank{rank}.pickle)")


def check_profile_args(args, world_size: int) -> Optional[str]:
    """The problem with the profiling flags, or None; fills in the window's defaults."""
    if not hasattr(args, "profile"):
        return None
    window_flags = ("profile_step_start", "profile_step_end", "profile_ranks", "profile_dir")
    if not args.profile:
        for dest in ("use_pytorch_profiler", "pytorch_profiler_collect_shapes", "pytorch_profiler_collect_callstack",
                     *(() if args.record_memory_history else window_flags)):
            value = getattr(args, dest)
            if value is not None and value is not False:  # 0 is a value given
                return f"--{dest.replace('_', '-')} applies to --profile; add --profile or drop it"
    if args.memory_snapshot_path and not args.record_memory_history:
        return "--memory-snapshot-path applies to --record-memory-history; add it or drop the path"
    if not args.profile and not args.record_memory_history:
        return None
    cuda = torch.cuda.is_available()
    if args.record_memory_history and not cuda:
        return ("--record-memory-history records the CUDA allocator and this process sees no GPU; drop it "
                "(--profile --use-pytorch-profiler shows CPU time)")
    if args.profile_step_start is None:
        args.profile_step_start = DEFAULT_STEP_START
    if args.profile_step_end is None:
        args.profile_step_end = max(DEFAULT_STEP_END, args.profile_step_start + 1)
    if args.profile_ranks is None:
        args.profile_ranks = [0]
    start, end = args.profile_step_start, args.profile_step_end
    if start < 0:
        return f"--profile-step-start must be >= 0, got {start}"
    if end <= start:
        return (f"--profile-step-end {end} must be larger than --profile-step-start {start} (the window is "
                f"iterations start+1 .. end)")
    train_iters = getattr(args, "train_iters", None)
    if args.profile and train_iters is not None and start >= train_iters:
        return (f"--profile-step-start {start} is not below --train-iters {train_iters}: no iteration would be "
                f"profiled; lower it (e.g. --profile-step-start {max(0, train_iters - 2)})")
    bad = [r for r in args.profile_ranks if not 0 <= r < world_size]
    if bad:
        return f"--profile-ranks {' '.join(map(str, bad))}: not ranks of this run (world size {world_size})"
    if args.profile and not args.use_pytorch_profiler and not cuda:
        return ("--profile without --use-pytorch-profiler brackets the window for nsys (CUDA profiler API) "
                "and this process sees no GPU; add --use-pytorch-profiler")
    if args.use_pytorch_profiler and profile_dir(args) is None:
        return ("--use-pytorch-profiler writes a trace per rank: give --profile-dir DIR (or --tensorboard-dir DIR: "
                "it goes to DIR/profile)")
    if args.record_memory_history:
        if args.memory_snapshot_path is None and profile_dir(args) is None:
            return ("--record-memory-history writes a snapshot per rank: give --memory-snapshot-path FILE, "
                    "--profile-dir DIR or --tensorboard-dir DIR")
        if args.memory_snapshot_path and len(set(args.profile_ranks)) > 1 and "{rank}" not in args.memory_snapshot_path:
            return (f"--memory-snapshot-path {args.memory_snapshot_path}: --profile-ranks has several ranks, which "
                    "would overwrite one file; put {rank} in the path (e.g. snapshot.rank{rank}.pickle)")
    return None


def profile_dir(args) -> Optional[str]:
    if getattr(args, "profile_dir", None):
        return args.profile_dir
    tb = getattr(args, "tensorboard_dir", None)
    return os.path.join(tb, "profile") if tb else None


def phase(name: str):
    """A named range in the profile (``record_function``; an NVTX range under nsys); nothing
    while no profiler is recording."""
    if torch.autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return nullcontext()


class StepProfiler:
    """The trainers' hook: ``with profiler.iteration(done):`` around each iteration's work
    (``done``: iterations finished before it), ``close()`` when the loop ends (it writes a
    window cut short by the end of the run)."""

    def __init__(self, args, rank: int):
        self.rank = rank
        on_rank = rank in (getattr(args, "profile_ranks", None) or [0])
        self.profile = bool(getattr(args, "profile", False)) and on_rank
        self.torch_profiler = self.profile and bool(args.use_pytorch_profiler)
        self.memory = bool(getattr(args, "record_memory_history", False)) and on_rank
        self.start = getattr(args, "profile_step_start", None) or 0
        self.end = getattr(args, "profile_step_end", None) or 0
        self.dir = profile_dir(args)
        self.shapes = bool(getattr(args, "pytorch_profiler_collect_shapes", False))
        self.stack = bool(getattr(args, "pytorch_profiler_collect_callstack", False))
        self.snapshot_path = getattr(args, "memory_snapshot_path", None)
        self._prof = None      # torch.profiler.profile while the window is open
        self._nvtx = None      # emit_nvtx while nsys's window is open
        self._first = None     # the first profiled iteration (as logged)
        self._last = None
        self._memory_on = False

    def _open(self, done: int) -> None:
        self._first = done + 1
        if self.torch_profiler:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities, record_shapes=self.shapes,
                                                with_stack=self.stack)
            self._prof.start()
        else:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
            self._nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=self.shapes)
            self._nvtx.__enter__()

    def _close_window(self) -> None:
        if self._prof is not None:
            prof, self._prof = self._prof, None
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            prof.stop()
            stem = os.path.join(self.dir, f"rank{self.rank}.iterations{self._first}-{self._last}")
            with atomic_path(stem + ".pt.trace.json") as tmp:
                prof.export_chrome_trace(tmp)
            sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=40)
            write_text_atomic(stem + ".summary.txt", f"rank {self.rank}, iterations {self._first}-{self._last}\n"
                              + table + "\n")
            print(f"[profile] rank {self.rank}: iterations {self._first}-{self._last} -> {stem}.pt.trace.json",
                  flush=True)
        if self._nvtx is not None:
            nvtx, self._nvtx = self._nvtx, None
            torch.cuda.synchronize()
            nvtx.__exit__(None, None, None)
            torch.cuda.cudart().cudaProfilerStop()

    def _dump_memory(self) -> None:
        if not self._memory_on:
            return
        self._memory_on = False
        path = self.snapshot_path or os.path.join(self.dir, "memory_snapshot.rank{rank}.pickle")
        path = path.replace("{rank}", str(self.rank))
        with atomic_path(path) as tmp:
            torch.cuda.memory._dump_snapshot(tmp)
        torch.cuda.memory._record_memory_history(enabled=None)
        print(f"[profile] rank {self.rank}: CUDA memory snapshot -> {path}", flush=True)

    @contextmanager
    def iteration(self, done: int) -> Iterator[None]:
        """Profile the iteration after ``done`` finished ones if it is in the window. An
        exception (an out-of-memory error, say) still writes what was recorded, then goes on."""
        if self.memory and not self._memory_on and done < self.end:
            torch.cuda.memory._record_memory_history(max_entries=1_000_000)
            self._memory_on = True
        inside = self.profile and self.start <= done < self.end
        if inside and self._first is None:
            self._open(done)
        try:
            if self._prof is None and self._nvtx is None:
                yield
            else:
                with phase(f"iteration {done + 1}"):
                    yield
                self._last = done + 1
        except BaseException:
            if self._prof is not None or self._nvtx is not None:
                self._last = done + 1
            try:
                self.close()
            except Exception as e:  # the original error matters more
                print(f"[profile] rank {self.rank}: could not write the profile: {e}", flush=True)
            raise
        if done + 1 >= self.end:
            self._close_window()
            self._dump_memory()

    def close(self) -> None:
        """The run ended: write what an unfinished window recorded."""
        if self._last is not None or self._prof is not None or self._nvtx is not None:
            if self._last is None:
                self._last = self._first
            self._close_window()
        self._dump_memory()
