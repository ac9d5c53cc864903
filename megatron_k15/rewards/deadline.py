"""Run a predicate on untrusted input with a hard wall-clock deadline, outside the trainer.

Symbolic answer checking (sympy) can run for ever on adversarial input, in C loops (huge
integer powers) that no signal handler interrupts, so each check runs in a forked child that
is SIGKILLed at its deadline (:func:`run_with_deadline`). Forking the *trainer* for that is
what this module avoids: a training process holds a CUDA context, NCCL threads and tens of GB
of host memory, so a fork copies its page tables, makes every page it writes afterwards a
copy-on-write fault while the child lives, and a memory limit for the child (address space =
the parent's + 1 GiB) means nothing next to CUDA's reserved virtual range.

:class:`DeadlineServerPool` keeps small warm server processes instead (a fresh interpreter
with only the target's module imported: no torch), started on first use and grown on demand
up to ``max_servers`` so that reward threads check in parallel. A server answers one request
at a time: it forks its child from its own small, hot image (~ms), waits, kills. Protocol,
one line each way: ``[args...]`` as JSON in; ``1`` (true), ``0`` (false) or ``-`` (deadline
passed or the predicate raised) out. A server that stops answering is killed and replaced;
a pool whose warm-up reports the predicate unusable (sympy missing) answers None at once.
"""

from __future__ import annotations

import atexit
import importlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import threading
import time
import warnings
import weakref
from typing import Callable, Optional, Sequence

__all__ = ["run_with_deadline", "DeadlineServerPool", "serve"]

SERVER_START_TIMEOUT_S = 120.0  # a cold interpreter importing sympy on a loaded machine
_REPLY_SLACK_S = 10.0  # beyond a request's own deadline, before its server is declared stuck
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def wait_readable(fd: int, timeout_s: float) -> bool:
    """Whether ``fd`` has data (or its end) within ``timeout_s``. ``poll``, not ``select``:
    select() cannot watch a descriptor numbered 1024 or more, which a trainer holding datasets,
    checkpoints, sockets and sandbox pipes reaches."""
    if not hasattr(select, "poll"):
        return bool(select.select([fd], [], [], max(0.0, timeout_s))[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(max(0.0, timeout_s) * 1000.0))


def limit_memory(extra_bytes: int = 1 << 30) -> None:
    """Cap this process's address space at its current size plus ``extra_bytes`` (best effort)."""
    try:
        import resource

        with open("/proc/self/statm") as f:
            vsz = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        lim = vsz + extra_bytes
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    except Exception:  # noqa: BLE001
        pass


def run_with_deadline(fn: Callable[..., bool], args: Sequence, timeout_s: float) -> Optional[bool]:
    """``bool(fn(*args))`` computed in a forked child that is SIGKILLed after ``timeout_s``.

    Returns None on timeout or error. The kill also stops C-level loops a signal handler could
    not. Without ``os.fork``, a daemon thread is the (best effort) fallback."""
    if hasattr(os, "fork"):
        r, w = os.pipe()
        try:
            pid = os.fork()
        except OSError:
            os.close(r)
            os.close(w)
            return None
        if pid == 0:  # child
            code = b"E"
            try:
                os.close(r)
                signal.signal(signal.SIGALRM, signal.SIG_DFL)
                signal.alarm(max(1, int(math.ceil(timeout_s)) + 1))  # backstop if orphaned
                limit_memory()
                code = b"1" if fn(*args) else b"0"
            except BaseException:  # noqa: BLE001
                code = b"E"
            finally:
                try:
                    os.write(w, code)
                finally:
                    os._exit(0)
        os.close(w)
        try:
            data = os.read(r, 1) if wait_readable(r, timeout_s) else b""
        except (OSError, InterruptedError):
            data = b""
        finally:
            os.close(r)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        return {b"1": True, b"0": False}.get(data)

    box: list = []

    def target():
        try:
            box.append(bool(fn(*args)))
        except BaseException:  # noqa: BLE001
            box.append(None)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    return box[0] if box else None


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def serve(target: str, warm: Optional[str] = None) -> None:
    """A server's main loop (``python -c "...; serve('pkg.mod:fn', 'pkg.mod:warm')"``).

    ``warm()`` runs once (imports, caches) so that every forked child starts hot; a falsy
    return means the predicate cannot work here and the server says ``unavailable`` and ends.
    The server ends when its stdin closes (the pool closed it, or the trainer died)."""
    reply_fd = os.dup(1)  # the protocol's channel; anything the predicate prints goes nowhere
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    fn = _resolve(target)
    ok = True
    if warm:
        try:
            ok = bool(_resolve(warm)())
        except Exception:  # noqa: BLE001
            ok = False
    os.write(reply_fd, b"ready\n" if ok else b"unavailable\n")
    if not ok:
        return
    for line in sys.stdin.buffer:
        try:
            *args, timeout_s = json.loads(line)
            result = run_with_deadline(fn, args, float(timeout_s))
        except (ValueError, TypeError):
            result = None
        os.write(reply_fd, {True: b"1\n", False: b"0\n"}.get(result, b"-\n"))


class _Server:
    """One server process and its two pipes."""

    def __init__(self, target: str, warm: Optional[str], pythonpath: Sequence[str]):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([*pythonpath, _PACKAGE_PARENT]
                                            + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        code = (f"from megatron_k15.rewards.deadline import serve; serve({target!r}, {warm!r})")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                     close_fds=True)
        self._buf = b""
        self.available = self._read_line(SERVER_START_TIMEOUT_S) == b"ready"

    def _read_line(self, timeout_s: float) -> Optional[bytes]:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not wait_readable(fd, left):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line

    def ask(self, args: Sequence, timeout_s: float) -> tuple[Optional[bool], str]:
        """(answer, state): state "ok", "dead" (it had ended before the request reached it)
        or "stuck" (no reply in time)."""
        if self.proc.poll() is not None:
            return None, "dead"
        try:
            self.proc.stdin.write(json.dumps([*args, timeout_s]).encode() + b"\n")
            self.proc.stdin.flush()
        except (OSError, ValueError):
            return None, "dead"
        reply = self._read_line(timeout_s + _REPLY_SLACK_S)
        if reply is None:
            return None, "stuck"
        return {b"1": True, b"0": False}.get(reply), "ok"

    def close(self) -> None:
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        try:
            self.proc.kill()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass


_POOLS: "weakref.WeakSet[DeadlineServerPool]" = weakref.WeakSet()


class DeadlineServerPool:
    """Warm server processes answering ``target(*args)`` with a hard deadline per call.

    ``target`` and ``warm`` are ``"module:function"`` names importable by a fresh interpreter
    (``pythonpath`` entries are put first on its path). Thread-safe: a call takes an idle server
    or starts one (up to ``max_servers``; beyond that it waits for one)."""

    def __init__(self, target: str, warm: Optional[str] = None, *, pythonpath: Sequence[str] = (),
                 max_servers: Optional[int] = None):
        self.target, self.warm, self.pythonpath = target, warm, tuple(pythonpath)
        self.max_servers = max(1, max_servers or (os.cpu_count() or 1))
        self.unavailable = False
        self._cond = threading.Condition()
        self._idle: list[_Server] = []
        self._live = 0
        self._warned = False
        _POOLS.add(self)

    def call(self, args: Sequence, timeout_s: float) -> Optional[bool]:
        """``bool(target(*args))``, or None when the deadline passed, it raised, or no server
        can run it. ``args`` must be JSON values."""
        for _ in range(2):  # a server found dead (killed from outside) is replaced once
            server = self._acquire()
            if server is None:
                return None
            answer, state = server.ask(args, timeout_s)
            self._release(server, state == "ok")
            if state != "dead":
                return answer
        return None

    def _acquire(self) -> Optional[_Server]:
        with self._cond:
            while not self._idle and self._live >= self.max_servers and not self.unavailable:
                self._cond.wait()
            if self.unavailable:
                return None
            if self._idle:
                return self._idle.pop()
            self._live += 1
        try:  # start outside the lock: other threads keep using the idle servers meanwhile
            server = _Server(self.target, self.warm, self.pythonpath)
        except OSError as e:
            server = None
            self._warn(f"cannot start a server for {self.target}: {e}")
        if server is not None and not server.available:
            server.close()
            server = None
            self._warn(f"{self.target}: its server reports the predicate unusable here "
                       f"(warm-up {self.warm} failed); every such check now answers None")
        if server is None:
            with self._cond:
                self._live -= 1
                self.unavailable = True
                self._cond.notify_all()
        return server

    def _release(self, server: _Server, usable: bool) -> None:
        if not usable:
            server.close()
        with self._cond:
            if usable:
                self._idle.append(server)
            else:
                self._live -= 1
            self._cond.notify()

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        """Stop every idle server (a later call starts new ones)."""
        with self._cond:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for server in idle:
            server.close()

    def _forget(self) -> None:
        # in a forked child the servers belong to the parent: drop them without a word to them
        self._cond = threading.Condition()
        self._idle = []
        self._live = 0


def _close_all() -> None:
    for pool in list(_POOLS):
        pool.close()


def _forget_all_in_child() -> None:
    for pool in list(_POOLS):
        pool._forget()


atexit.register(_close_all)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all_in_child)
