"""Verifiable reward for code: run a Python program against stdin/stdout tests in a sandbox.

``run_tests(program, tests, timeout_s)`` runs the program once per test with ``test["input"]``
on stdin and compares its stdout with ``test["output"]`` (trailing spaces on each line and
trailing blank lines ignored; ``compare="tokens"`` and ``float_tolerance`` give the checkers
of judges, see :func:`outputs_match`; a prompt record sets them with the same field names).

Problems with more than one right answer (a Codeforces "checker", a judge's "special judge"):
``checker`` is Python source defining ``check(input, output, expected) -> bool`` (the test's
stdin, what the program printed, the test's reference output). After the program has run
on the tests, the checker runs on each output in the same sandbox (it is dataset code, and it
reads untrusted output; standard library only; its wall limit is at least
``CHECKER_MIN_TIMEOUT_S``); a test passes when it returns True. A checker that raises, returns
anything but True/False, or runs out of time fails the test ("error", its traceback in the
result's ``checker`` entry).

Call-based tests (LeetCode / APPS / TACO style, ``fn_name``): the program defines a function
(top level, or a method of ``class Solution``); each test calls it with ``test["input"]``, a
JSON list of positional arguments, and compares the returned value with ``test["output"]``
as JSON values (:func:`values_match`; tuples are lists). What the program prints is ignored.
APPS and TACO store most expected values wrapped in a one-element list; their records carry
``wrapped_outputs``, and a test whose output is ``[v]`` then also passes on ``v`` (their
checker's rule, kept to one-element lists: ``[1, 2]`` never accepts ``1``).

Process layout::

    caller (this process)
      └─ supervisor  (python -I -S, own session; runs every test of one call, reports JSON lines)
           └─ sandboxed program, one per test (own session; limits applied before exec)

The program's parent is the supervisor, never the caller, so ``os.kill(os.getppid(), 9)`` can
at worst end the supervisor; the caller then reports status "error" and carries on.

What is enforced where (see ``sandbox_report()`` for what this machine allows):

OS level, always (POSIX):
  - RLIMIT_CPU (CPU seconds), RLIMIT_AS (address space), RLIMIT_FSIZE (file size),
    RLIMIT_NOFILE, RLIMIT_CORE=0, RLIMIT_STACK = the memory limit (a judge's stack: deep
    recursion through C frames, e.g. an lru_cache'd DFS, needs more than 8 MB), and
    RLIMIT_NPROC=0: no new process or thread (effective for a non-root uid, so after the uid
    drop below). Threads are not allowed on purpose: any task limit above 0 would also let a
    program that gets past the Python guards fork a process into a new session, which the
    process-group kill at the end of its test would not reach (that needs a PID namespace,
    not done). Instead a ``threading.Thread`` that cannot start runs its target inside
    ``start()`` (the bootstrap's shim), so the judges' ``threading.stack_size(...);
    Thread(target=main).start()`` idiom for deep recursion works; only a program that needs
    two threads at once cannot run;
  - own session/process group, SIGKILLed as a whole at the end of each test, and
    PR_SET_PDEATHSIG so it dies with the supervisor;
  - wall-clock limit and an output cap enforced by the supervisor (the child is killed);
  - an empty environment (``env={}``) and ``python -I -S`` (no user site, no PYTHON* vars);
  - a fresh temporary directory per test as cwd.
OS level, when the caller is root (as on our machines and CI):
  - a private network namespace (``unshare(CLONE_NEWNET)``): no interface but a down
    loopback, so no connection can be made anywhere, including 127.0.0.1;
  - a PID namespace of its own, the program being its PID 1: it sees and can signal no other
    process, and anything it starts dies with it;
  - a private mount namespace with a minimal root (``minimal_root``): only the system
    directories (/usr, /bin, /lib*, /etc) and the interpreter's prefix, read-only, a few
    devices, fresh tmpfs for /tmp, /var/tmp and /dev/shm, the run dir, and the procfs of its
    PID namespace; none of the caller's files (datasets, tests, checkpoints, code) exists
    there, so no program can look its expected output up. Where that root cannot be built,
    the older isolation applies: /tmp and friends fresh, the rest of the file system
    readable (then keep data files ``chmod o-r``);
  - the program runs as ``nobody`` (uid/gid 65534): it cannot signal the caller or
    supervisor, cannot write files owned by root, and RLIMIT_NPROC applies to it.
  A caller that is not root (a training job on a cluster) first becomes root of a user
  namespace (``enter_user_namespace``, where the kernel allows unprivileged ones) and gets the
  same network, PID and mount isolation and minimal root; only the drop to ``nobody`` is
  missing (the program runs as the caller's uid, which RLIMIT_NPROC then limits).
Python level (best effort, bypassable by a determined program; defence in depth only):
  - os.fork/system/exec*/spawn*/kill/killpg/setsid and friends raise PermissionError;
  - importing socket, ssl, subprocess, multiprocessing, ctypes, pty raises ImportError;
  - open()/os.open() for writing, and remove/rename/mkdir..., are refused outside the cwd.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

__all__ = ["run_tests", "code_reward", "extract_program", "normalize_output", "outputs_match",
           "values_match", "sandbox_report", "sandbox_warning"]

DEFAULT_MEMORY_MB = 1024
DEFAULT_OUTPUT_LIMIT = 1 << 20  # bytes of stdout per test
DEFAULT_FILE_SIZE_LIMIT = 16 << 20
NOBODY = 65534

# ----------------------------------------------------------------------------------------
# Program run inside the sandbox before the user's code (Python-level guards).

_BOOTSTRAP = r'''
import sys, os, posix, builtins, io

def _deny(*a, **k):
    raise PermissionError("operation not permitted in the sandbox")

import signal as _signal
if hasattr(_signal, "pidfd_send_signal"):
    _signal.pidfd_send_signal = _deny
for _m in (os, posix):
    for _n in ("fork", "forkpty", "vfork", "system", "popen", "execv", "execve", "execl",
               "execle", "execlp", "execlpe", "execvp", "execvpe", "spawnv", "spawnve", "spawnl",
               "spawnle", "spawnlp", "spawnlpe", "spawnvp", "spawnvpe", "posix_spawn",
               "posix_spawnp", "kill", "killpg", "setsid", "setpgid", "setuid", "setgid",
               "setreuid", "setregid", "chroot", "chdir", "fchdir", "unshare", "setns",
               "pidfd_open", "link", "symlink", "mkfifo", "mknod"):
        if hasattr(_m, _n):
            setattr(_m, _n, _deny)

_BLOCKED = {"socket", "_socket", "ssl", "_ssl", "subprocess", "_posixsubprocess",
            "multiprocessing", "_multiprocessing", "ctypes", "_ctypes", "pty", "pwd"}

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _BLOCKED:
            raise ImportError("import of %r is not allowed in the sandbox" % name)
        return None

sys.meta_path.insert(0, _Blocker())

_ROOT = os.path.realpath(os.getcwd())
_real_open = io.open
_real_os_open = os.open

def _inside(path):
    try:
        p = os.path.realpath(os.fsdecode(path))
    except Exception:
        return False
    return p == _ROOT or p.startswith(_ROOT + os.sep)

def _guard(path):
    if not isinstance(path, int) and not _inside(path):
        raise PermissionError("writing outside the sandbox directory is not allowed: %r" % (path,))

def _open(file, mode="r", *args, **kwargs):
    if any(c in mode for c in "wax+"):
        _guard(file)
    return _real_open(file, mode, *args, **kwargs)

_WFLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def _os_open(path, flags, *args, **kwargs):
    if flags & _WFLAGS:
        _guard(path)
    return _real_os_open(path, flags, *args, **kwargs)

builtins.open = io.open = _open
os.open = _os_open

def _wrap_path_fn(fn, nargs):
    def wrapped(*args, **kwargs):
        for p in args[:nargs]:
            _guard(p)
        return fn(*args, **kwargs)
    return wrapped

for _n, _k in (("remove", 1), ("unlink", 1), ("rmdir", 1), ("mkdir", 1), ("makedirs", 1),
               ("rename", 2), ("replace", 2), ("truncate", 1), ("chmod", 1), ("chown", 1),
               ("utime", 1), ("removedirs", 1), ("renames", 2)):
    if hasattr(os, _n):
        setattr(os, _n, _wrap_path_fn(getattr(os, _n), _k))

# exit()/quit() come from the site module, which -S skips; programs end early with them
# ("print(-1); exit()"), so they must exist as in a normal interpreter
builtins.exit = builtins.quit = sys.exit

# a new thread's stack defaults to RLIMIT_STACK, here the whole memory limit (for the main
# thread's deep recursion): where threads can start at all (a root caller without the uid
# drop), give them the usual 8 MB unless the program asks otherwise
import _thread, threading
_thread.stack_size(8 << 20)

# Where no thread can start (RLIMIT_NPROC=0), a plain (non-daemon) Thread runs its target to
# the end inside start(), on the calling thread; afterwards it is finished: join() returns,
# is_alive() is False. That is exactly the judges' idiom "threading.stack_size(big);
# Thread(target=main).start()" for deep recursion (the main thread's stack here is already
# the memory limit). Threads that only make sense beside the main one (daemon threads, timers,
# thread-pool workers, which would run forever or out of order inline) still fail at once.
_real_thread_start = threading.Thread.start

def _thread_start(self):
    try:
        return _real_thread_start(self)
    except RuntimeError as e:
        target = getattr(self, "_target", None)
        if ("can't start new thread" not in str(e) or self.daemon or isinstance(self, threading.Timer)
                or getattr(target, "__module__", "").startswith("concurrent.futures")):
            raise
    self._started.set()
    self.join = lambda timeout=None: None
    self.is_alive = lambda: False
    try:
        self.run()
    except SystemExit:
        pass
    except BaseException:
        threading.excepthook(threading.ExceptHookArgs((*sys.exc_info(), self)))

threading.Thread.start = _thread_start

_prog = sys.argv[1]
with _real_open(_prog, "rb") as _f:
    _src = _f.read()
sys.argv = ["solution.py"]
sys.path = [p for p in sys.path if p and not p.startswith(os.path.dirname(_prog))]
_code = compile(_src, "solution.py", "exec")
del _f, _src, _m, _n, _k
exec(_code, {"__name__": "__main__", "__builtins__": builtins, "__file__": "solution.py"})
'''

# The program of a call-based test (``fn_name``): the solution is executed as a module (so its
# ``if __name__ == "__main__":`` part does not run), its function is called with the test's
# arguments (stdin, a JSON list) and the returned value printed as JSON after a marker line.
_CALL_HARNESS = r'''
import json, os, sys, types
if hasattr(sys, "set_int_max_str_digits"):
    sys.set_int_max_str_digits(0)  # a huge integer result still encodes
_dumps, _write, _out_fd = json.dumps, os.write, os.dup(1)  # before the solution can replace them
_args = json.loads(sys.stdin.read())
with open(%(solution)r, "rb") as _f:
    _src = _f.read()
# a real module (dataclasses and pickling look it up in sys.modules), with what LeetCode's
# Python 3 preamble imports (List, Optional, deque, heapq, ... used without an import)
_mod = types.ModuleType("solution")
_mod.__file__ = "solution.py"
sys.modules["solution"] = _mod
exec("from typing import *\nimport collections, heapq, bisect, math, functools, itertools, string, re\n"
     "from collections import *\nfrom heapq import *\nfrom bisect import *\nfrom functools import *\n"
     "from itertools import *\nfrom math import *", _mod.__dict__)
exec(compile(_src, "solution.py", "exec"), _mod.__dict__)
_fn = getattr(_mod, %(fn)r, None)
if not callable(_fn) and isinstance(getattr(_mod, "Solution", None), type):
    _fn = getattr(_mod.Solution(), %(fn)r, None)
if not callable(_fn):
    sys.stderr.write("the solution defines no function %(fn)s (at the top level or in class Solution)\n")
    sys.exit(1)
_out = _fn(*_args)
for _s in (sys.stdout, sys.__stdout__):
    try:
        _s.flush()
    except Exception:
        pass
_write(_out_fd, ("\n" + %(marker)r + _dumps(_out, default=repr) + "\n").encode("utf-8", "surrogatepass"))
'''

# ----------------------------------------------------------------------------------------
# Supervisor: forks one sandboxed child per test and reports a JSON line per test.

_SUPERVISOR = r'''
import json, os, select, signal, sys, time, resource

RUN = sys.argv[1]
with open(os.path.join(RUN, "config.json")) as f:
    CFG = json.load(f)
os.umask(0o022)  # the new root's directories must be traversable by nobody whatever the caller's umask

try:
    import ctypes
    LIBC = ctypes.CDLL(None, use_errno=True)
except Exception:
    LIBC = None

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x10000000, 0x40000000, 0x20000000
MS_BIND, MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV = 4096, 16384, 1 << 18, 2, 4
MS_RDONLY, MS_NOEXEC, MS_REMOUNT, MS_MOVE = 1, 8, 32, 8192
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, ST_RELATIME = 1024, 2048, 1 << 21, 4096
# what a Python program needs from the host, read-only: binaries, shared libraries, /etc
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
DEVICES = ("null", "zero", "full", "random", "urandom")
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38


def _c(fn, *args):
    if LIBC is None:
        return False
    args = [a.encode() if isinstance(a, str) else a for a in args]
    return getattr(LIBC, fn)(*args) == 0


def _mount(src, dst, fstype, flags, data):
    if LIBC is None:
        return False
    enc = lambda s: None if s is None else s.encode()
    return LIBC.mount(enc(src), enc(dst), enc(fstype), ctypes.c_ulong(flags), enc(data)) == 0


def _bind(src, dst, read_only):
    """Bind ``src`` at ``dst`` (created: a directory, or an empty file for a device); a
    symbolic link is copied as a link (merged-/usr systems: /bin -> usr/bin)."""
    os.makedirs(os.path.dirname(dst), 0o755, exist_ok=True)
    if os.path.islink(src):
        os.symlink(os.readlink(src), dst)
        return True
    if os.path.isdir(src):
        os.makedirs(dst, 0o755, exist_ok=True)
    else:
        open(dst, "w").close()
    if not _mount(src, dst, None, MS_BIND | MS_REC, None):
        return False
    # keep the source's nodev / noexec / atime flags (locked in a user namespace: a remount
    # that drops them is refused); statvfs's ST_* bits equal the MS_* ones but for relatime
    f = os.statvfs(src).f_flag
    kept = (f & (MS_NODEV | MS_NOEXEC | MS_NOATIME | MS_NODIRATIME)) | (MS_RELATIME if f & ST_RELATIME else 0)
    return not read_only or _mount(None, dst, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | kept, None)


def minimal_root(with_proc):
    """Switch to a new root holding only the system directories and the interpreter
    (read-only), a few devices, fresh tmpfs for /tmp, /var/tmp and /dev/shm and the run dir:
    none of the caller's files (datasets, checkpoints, code) is reachable. ``with_proc`` (the
    process is PID 1 of its own PID namespace): a procfs of that namespace, which shows no
    other process (a shared procfs would lead through /proc/<pid>/root of another process
    of the same uid back to the host's files), and /dev/stdin & co. Returns True on success."""
    new = os.path.join(RUN, "root%d" % os.getpid())
    os.mkdir(new, 0o755)
    if not _mount("tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=755"):
        return False
    for d in SYSTEM_DIRS:
        if os.path.lexists(d) and not _bind(d, new + d, True):
            return False
    prefix = CFG["python_prefix"]
    if not any(prefix == d or prefix.startswith(d + "/") for d in SYSTEM_DIRS):
        if not _bind(prefix, new + prefix, True):
            return False
    for dev in DEVICES:
        if os.path.exists("/dev/" + dev) and not _bind("/dev/" + dev, new + "/dev/" + dev, False):
            return False
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        os.makedirs(new + d, 0o755, exist_ok=True)
        if not _mount("tmpfs", new + d, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=1777"):
            return False
    os.makedirs(new + RUN, 0o755, exist_ok=True)
    if not _mount(RUN, new + RUN, None, MS_BIND, None):  # not recursive: the new root stays out
        return False
    if with_proc:
        os.makedirs(new + "/proc", 0o555, exist_ok=True)
        if _mount("proc", new + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None):
            for name, target in (("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                                 ("stderr", "/proc/self/fd/2"), ("fd", "/proc/self/fd")):
                os.symlink(target, new + "/dev/" + name)
    os.chdir(new)
    if not _mount(new, "/", None, MS_MOVE, None):
        return False
    os.chroot(".")
    os.chdir("/")
    return True


def isolate_fs(own_pid_namespace):
    """In a private mount namespace: a minimal root (``minimal_root``), or where that cannot
    be built, fresh tmpfs over world-writable dirs with the run dir and the interpreter
    re-attached with bind mounts. Returns True on success."""
    if not _c("unshare", CLONE_NEWNS):
        return False
    if not _mount(None, "/", None, MS_REC | MS_PRIVATE, None):
        return False
    try:
        if minimal_root(own_pid_namespace):
            return True
    except OSError:
        pass
    # 1. the interpreter: overmount its first non-traversable ancestor (e.g. /root, 0700)
    #    with an empty tmpfs and re-bind just the path to the interpreter
    prefix = CFG["python_prefix"]
    parts = prefix.strip("/").split("/")
    blocked = None
    for i in range(1, len(parts)):
        d = "/" + "/".join(parts[:i])
        if not (os.stat(d).st_mode & 0o001):
            blocked = i
            break
    if blocked is not None:
        anc = "/" + "/".join(parts[:blocked])
        child = anc.rstrip("/") + "/" + parts[blocked]
        for j in range(blocked + 1, len(parts)):
            if not (os.stat("/" + "/".join(parts[:j + 1])).st_mode & 0o001):
                return False
        fd = os.open(child, os.O_RDONLY | os.O_DIRECTORY)
        if not _mount("tmpfs", anc, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755"):
            return False
        os.mkdir(child, 0o755)
        if not _mount("/proc/self/fd/%d" % fd, child, None, MS_BIND | MS_REC, None):
            return False
        os.close(fd)
    # 2. world-writable directories become private throwaway tmpfs; the run dir (usually in
    #    /tmp) is re-attached at the same path
    run_fd = os.open(RUN, os.O_RDONLY | os.O_DIRECTORY)
    for d in ("/tmp", "/var/tmp", "/dev/shm", "/run/lock"):
        if os.path.isdir(d) and not os.path.islink(d):
            if not _mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=1777"):
                return False
    if not os.path.isdir(RUN):
        os.makedirs(RUN, 0o755)
        if not _mount("/proc/self/fd/%d" % run_fd, RUN, None, MS_BIND | MS_REC, None):
            return False
    os.close(run_fd)
    return True


def enter_user_namespace():
    """A caller that is not root becomes root of a new user namespace (its uid and gid mapped
    to 0), which may build the same namespaces and minimal root as a root caller; the program
    then runs as the caller's own uid (no drop to nobody: unmapped). Returns True on success."""
    uid, gid = os.getuid(), os.getgid()
    if not _c("unshare", CLONE_NEWUSER):
        return False
    try:
        for path, text in (("/proc/self/setgroups", "deny"), ("/proc/self/uid_map", "0 %d 1" % uid),
                           ("/proc/self/gid_map", "0 %d 1" % gid)):
            with open(path, "w") as f:
                f.write(text)
    except OSError:
        return False
    return True


def child(i, inp_fd, out_w, err_w, work):
    os.dup2(inp_fd, 0)
    os.dup2(out_w, 1)
    os.dup2(err_w, 2)
    os.setsid()
    if LIBC is not None:
        LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    real_root = root = os.geteuid() == 0
    if not root and CFG["isolate_fs"]:
        root = enter_user_namespace()
    netns = False
    if CFG["isolate_network"]:
        netns = _c("unshare", CLONE_NEWNET)
        if not netns and not root:
            netns = _c("unshare", CLONE_NEWUSER | CLONE_NEWNET)
    if CFG["require_network_isolation"] and not netns:
        os.write(2, b"SANDBOX: network namespace unavailable\n")
        os._exit(126)
    # the program as PID 1 of its own PID namespace: it sees and can signal no other process
    # (its procfs shows itself only), and whatever it starts dies with it; this process stays
    # outside, waits, and ends the way the program did
    pidns = root and CFG["isolate_fs"] and _c("unshare", CLONE_NEWPID)
    if pidns:
        pid = os.fork()
        if pid:
            for fd in (0, 1, 2):  # the pipes reach EOF when the program ends
                os.close(fd)
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
                os.kill(os.getpid(), os.WTERMSIG(status))
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        if LIBC is not None:
            LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    fs_iso = root and CFG["isolate_fs"] and isolate_fs(pidns)
    drop = real_root and CFG["drop_privileges"] and fs_iso
    os.chdir(work)
    cpu = int(CFG["timeout_s"]) + 1
    mem = CFG["memory_mb"] << 20
    limits = [(resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (mem, mem)),
              (resource.RLIMIT_FSIZE, (CFG["file_size_limit"],) * 2),
              (resource.RLIMIT_NOFILE, (64, 64)), (resource.RLIMIT_CORE, (0, 0)),
              # a judge's stack (the memory limit, like Codeforces' 256 MB) for recursion
              # through C frames, e.g. an lru_cache'd DFS; it counts against RLIMIT_AS
              (resource.RLIMIT_STACK, (mem, mem))]
    for res, lim in limits:
        try:
            resource.setrlimit(res, lim)
        except (ValueError, OSError):
            pass
    if drop:
        os.setgroups([])
        os.setgid(CFG["uid"])
        os.setuid(CFG["uid"])
    if LIBC is not None:
        LIBC.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    try:  # after the uid drop, so that execve itself is not refused
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    except (ValueError, OSError):
        pass
    os.closerange(3, 1 << 16)
    exe = CFG["python"]
    argv = [exe, "-I", "-S", "-B"]
    if CFG["python_guards"]:
        argv.append(os.path.join(RUN, "bootstrap.py"))
    os.execve(exe, argv + [os.path.join(RUN, "program.py")], {})


def run_one(i):
    work = os.path.join(RUN, "t%d" % i)
    os.mkdir(work, 0o700)
    if os.geteuid() == 0 and CFG["drop_privileges"]:
        os.chown(work, CFG["uid"], CFG["uid"])
        # its own input only (open("/dev/stdin") reopens it as the program's uid)
        os.chown(os.path.join(RUN, "in%d" % i), CFG["uid"], CFG["uid"])
    inp_fd = os.open(os.path.join(RUN, "in%d" % i), os.O_RDONLY)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            child(i, inp_fd, out_w, err_w, work)
        except BaseException as e:
            try:  # fd 2 is the stderr pipe (child closes err_w itself)
                os.write(2, ("SANDBOX: setup failed: %r\n" % (e,)).encode())
            finally:
                os._exit(126)
        os._exit(126)
    for fd in (inp_fd, out_w, err_w):
        os.close(fd)
    deadline = t0 + CFG["timeout_s"]
    out, err = bytearray(), bytearray()
    cap = CFG["output_limit"]
    reason = None
    open_fds = {out_r, err_r}
    status = None
    while True:
        now = time.monotonic()
        if now >= deadline:
            reason = "timeout"
            break
        if open_fds:
            r, _, _ = select.select(list(open_fds), [], [], min(0.05, deadline - now))
            for fd in r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.discard(fd)
                elif fd == out_r:
                    out += chunk
                    if len(out) > cap:
                        reason = "output_limit"
                else:
                    if len(err) < 65536:
                        err += chunk
            if reason:
                break
        wpid, st = os.waitpid(pid, os.WNOHANG)
        if wpid:
            status = st
            # drain what is left in the pipes without blocking
            for fd in list(open_fds):
                while True:
                    r, _, _ = select.select([fd], [], [], 0)
                    if not r:
                        break
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        break
                    if fd == out_r:
                        out += chunk
                        if len(out) > cap:
                            reason = "output_limit"
                            break
                    elif len(err) < 65536:
                        err += chunk
            break
        if not open_fds:
            time.sleep(0.005)
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if status is None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
    elapsed = time.monotonic() - t0
    os.close(out_r)
    os.close(err_r)
    code = os.waitstatus_to_exitcode(status)
    err_text = err.decode("utf-8", "replace")
    if reason is None:
        if code < 0 and -code in (signal.SIGXCPU, signal.SIGKILL):
            reason = "timeout"
        elif "MemoryError" in err_text or "Cannot allocate memory" in err_text:
            reason = "memory"
        elif code == 126 and err_text.startswith("SANDBOX:"):
            reason = "sandbox_error"
        elif code != 0:
            reason = "error"
    return {
        "status": reason or "done",
        "exit_code": code,
        "time_s": round(elapsed, 4),
        "stdout": out[:cap].decode("utf-8", "replace"),
        "stderr": err_text[-2000:],
    }


def main():
    for i in range(len(CFG["tests"])):
        res = run_one(i)
        sys.stdout.write(json.dumps(res) + "\n")
        sys.stdout.flush()
        if CFG["stop_on_failure"] and res["status"] != "done":
            break


main()
'''


# ----------------------------------------------------------------------------------------
# Caller side


def normalize_output(text: str) -> str:
    """Strip trailing whitespace on each line and trailing blank lines; unify newlines."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    lines = [ln.rstrip() for ln in lines]
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


COMPARE_MODES = ("lines", "tokens")
_WS = re.compile(r"[ \t\n\r\f\v]+")  # ASCII whitespace only, as judges split tokens
_INTEGER = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


# A custom checker runs as the sandboxed program of a second round of tests, one run per test
# input: its stdin is one JSON object {"input", "pairs": [[output, expected], ...], "strict"},
# and it writes a JSON list of verdicts (true: accepted) to the saved stdout fd, while whatever
# the checker prints goes to stderr. The source runs in a namespace of its own (as module
# "checker": no __main__ block runs). Strict (the reward): a check that raises or returns
# anything but True/False fails the run, with its traceback; otherwise (build_code_tests'
# votes) such a pair is only rejected.
_CHECKER_HARNESS = r'''
import json as _json, os as _os, sys as _sys
_verdict_fd = _os.dup(1)
_sys.stdout = _sys.stderr
_case = _json.loads(_sys.stdin.read())
_ns = {"__name__": "checker", "__builtins__": __builtins__}
exec(compile(%(source)r, "checker.py", "exec"), _ns)
_verdicts = []
for _got, _want in _case["pairs"]:
    try:
        _v = _ns["check"](_case["input"], _got, _want)
    except Exception:
        if _case["strict"]:
            raise
        _v = None
    _ok = _v is True or (type(_v) is int and _v == 1)
    if _case["strict"] and not _ok and not (_v is False or (type(_v) is int and _v == 0)):
        raise TypeError("check() must return True or False, got %%r" %% (_v,))
    _verdicts.append(_ok)
_os.write(_verdict_fd, _json.dumps(_verdicts).encode())
'''
# A checker may take longer than the program (verifying can cost as much as solving), and it
# also starts Python and decodes up to the output limit of JSON: its wall limit per output.
CHECKER_MIN_TIMEOUT_S = 5.0


def checker_verdicts(checker: str, cases: list[tuple[str, list[tuple[str, str]]]], timeout_s: float,
                     memory_mb: int = DEFAULT_MEMORY_MB) -> list[Optional[list[bool]]]:
    """For each ``(input, [(output, expected), ...])``: whether ``checker`` accepts each output
    against its expected one, all pairs of an input in one sandboxed run (wall limit
    ``timeout_s``, at least ``CHECKER_MIN_TIMEOUT_S``); None for an input whose run failed."""
    if not cases:
        return []
    tests = [{"input": json.dumps({"input": inp, "pairs": [list(p) for p in pairs], "strict": False}),
              "output": ""} for inp, pairs in cases]
    res = run_tests(_CHECKER_HARNESS % {"source": checker}, tests, max(timeout_s, CHECKER_MIN_TIMEOUT_S),
                    memory_mb=memory_mb, keep_output=True)
    out: list[Optional[list[bool]]] = [None] * len(cases)
    for k, r in enumerate(res["results"][:len(cases)]):
        if r["status"] in ("ok", "failed"):  # it ran to the end ("failed": not the unused "" output)
            try:
                verdicts = json.loads(r.get("stdout", ""))
            except ValueError:
                continue
            if isinstance(verdicts, list) and len(verdicts) == len(cases[k][1]):
                out[k] = [v is True for v in verdicts]
    return out


def custom_checker_error(source: Any) -> Optional[str]:
    """Why ``source`` is not a custom checker (Python defining ``check(input, output,
    expected)`` at top level), else None."""
    if source is None:
        return None
    if not isinstance(source, str) or not source.strip():
        return f"expected Python source defining check(input, output, expected), got {source!r:.60}"
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError as e:
        return f"does not parse: {e.msg} (line {e.lineno})"
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if not defs:
        return "defines no top-level function check(input, output, expected)"
    a = defs[-1].args  # the last definition is the one that runs
    positional = len(a.posonlyargs) + len(a.args)
    required = positional - len(a.defaults)
    if (positional < 3 and a.vararg is None) or required > 3 or None in a.kw_defaults:
        return "check() must take (input, output, expected): three positional arguments, no other required ones"
    return None


def checker_error(compare: Any, float_tolerance: Any) -> Optional[tuple[str, str]]:
    """``(field, why)`` when ``compare`` / ``float_tolerance`` are not a checker, else None."""
    if compare not in COMPARE_MODES:
        return "compare", f"must be one of {COMPARE_MODES}, got {compare!r}"
    if float_tolerance is not None and (isinstance(float_tolerance, bool) or not isinstance(float_tolerance, (int, float))
                                        or not 0 <= float_tolerance < math.inf):
        return "float_tolerance", f"must be a number >= 0, got {float_tolerance!r}"
    return None


def _tokens(text: str) -> list[str]:
    return [t for t in _WS.split(text) if t]


def outputs_match(got: str, want: str, compare: str = "lines", float_tolerance: Optional[float] = None) -> bool:
    """Whether a program's output ``got`` answers ``want``, as a judge's checker decides.

    ``lines``: equal after :func:`normalize_output` (trailing spaces and blank lines ignored).
    ``tokens``: equal sequences of tokens split on ASCII whitespace (Codeforces' default
    checker: "1 2" on one line or two, with any spacing). ``float_tolerance`` (implies
    ``tokens``): where the expected token is a decimal number (a point or an exponent; an
    integer such as a residue mod 1e9+7 must match exactly), a decimal ``got`` also matches
    when ``|got - want| <= tol * max(1, |want|)`` (testlib's absolute-or-relative error)."""
    error = checker_error(compare, float_tolerance)
    if error:
        raise ValueError(" ".join(error))
    if got == want:
        return True
    if compare == "lines" and float_tolerance is None:
        return normalize_output(got) == normalize_output(want)
    a, b = _tokens(got), _tokens(want)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        if (float_tolerance is None or _INTEGER.fullmatch(y) or not _DECIMAL.fullmatch(y)
                or not _DECIMAL.fullmatch(x)):
            return False
        if not _within_tolerance(float(x), float(y), float_tolerance):
            return False
    return True


def _within_tolerance(got: float, want: float, tol: float) -> bool:
    """testlib's absolute-or-relative error: |got - want| <= tol * max(1, |want|), both finite."""
    return math.isfinite(got) and math.isfinite(want) and abs(got - want) <= tol * max(1.0, abs(want))


def values_match(got: Any, want: Any, float_tolerance: Optional[float] = None) -> bool:
    """Whether a call-based test's returned value ``got`` (decoded from JSON) equals ``want``:
    lists element by element, objects key by key, booleans only to booleans, integers
    exactly; with ``float_tolerance`` a float within ``tol * max(1, |want|)`` of a number."""
    if isinstance(got, bool) or isinstance(want, bool):
        return isinstance(got, bool) and isinstance(want, bool) and got == want
    if isinstance(got, (int, float)) and isinstance(want, (int, float)):
        if got == want:
            return True
        if float_tolerance is None or not (isinstance(got, float) or isinstance(want, float)):
            return False
        return _within_tolerance(got, want, float_tolerance)
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(values_match(a, b, float_tolerance) for a, b in zip(got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(values_match(got[k], want[k], float_tolerance) for k in want)
    return type(got) is type(want) and got == want


def split_returned(stdout: str, marker: str) -> tuple[str, Optional[str]]:
    """A call-based run's output: (what the program printed, the returned value's JSON or
    None when the call did not return)."""
    at = stdout.rfind(marker)
    if at < 0:
        return stdout, None
    return stdout[:max(0, at - 1)], stdout[at + len(marker):].strip()


def returned_value_matches(got: Any, want: Any, float_tolerance: Optional[float] = None,
                           wrapped_outputs: bool = False) -> bool:
    """:func:`values_match`, and with ``wrapped_outputs`` (APPS / TACO records) a ``want`` of
    ``[v]`` also accepts ``v``."""
    if values_match(got, want, float_tolerance):
        return True
    return wrapped_outputs and isinstance(want, list) and len(want) == 1 and values_match(got, want[0], float_tolerance)


def _returned_matches(stdout: str, want: Any, marker: str, float_tolerance: Optional[float],
                      wrapped_outputs: bool) -> bool:
    _, text = split_returned(stdout, marker)
    if text is None:
        return False
    try:
        return returned_value_matches(json.loads(text), want, float_tolerance, wrapped_outputs)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to decode or compare
        return False


def _python_prefix() -> str:
    exe = os.path.realpath(sys.executable)
    base = os.path.realpath(sys.base_prefix)
    return base if exe.startswith(base + os.sep) else os.path.dirname(os.path.dirname(exe))


def is_json_value(x: Any) -> bool:
    """Whether ``x`` is plain JSON (what a call-based test's arguments and result must be)."""
    try:
        json.dumps(x, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True


def _valid_tests(tests: Any, call_based: bool = False) -> bool:
    """stdin tests: ``{"input": str, "output": str}``; call-based: ``{"input": [args],
    "output": any JSON value}``."""
    if not isinstance(tests, list) or not tests:
        return False
    for t in tests:
        if not isinstance(t, dict) or "output" not in t:
            return False
        if call_based:  # (a None output would pass a function that does nothing)
            if (not isinstance(t.get("input"), list) or t["output"] is None or not is_json_value(t["input"])
                    or not is_json_value(t["output"])):
                return False
        elif not isinstance(t.get("input", ""), str) or not isinstance(t["output"], str):
            return False
    return True


def fn_name_error(fn_name: Any) -> Optional[str]:
    """Why ``fn_name`` cannot name a call-based test's function, else None."""
    if fn_name is not None and (not isinstance(fn_name, str) or not fn_name.isidentifier()):
        return f"expected a Python function name, got {fn_name!r}"
    return None


def run_tests(
    program: str,
    tests: list[dict],
    timeout_s: float,
    *,
    memory_mb: int = DEFAULT_MEMORY_MB,
    output_limit: int = DEFAULT_OUTPUT_LIMIT,
    file_size_limit: int = DEFAULT_FILE_SIZE_LIMIT,
    stop_on_failure: bool = False,
    isolate_network: bool = True,
    require_network_isolation: bool = False,
    isolate_fs: bool = True,
    drop_privileges: bool = True,
    keep_output: bool = False,
    python_guards: bool = True,
    compare: str = "lines",
    float_tolerance: Optional[float] = None,
    fn_name: Optional[str] = None,
    wrapped_outputs: bool = False,
    checker: Optional[str] = None,
) -> dict:
    """Run ``program`` on each test; returns ``{"passed", "total", "status", "results"}``.

    ``timeout_s`` is the wall-clock limit per test (CPU limit: ``int(timeout_s) + 1`` s).
    ``compare`` / ``float_tolerance``: how an output is judged (:func:`outputs_match`).
    ``fn_name``: call-based tests (module docstring); the returned values are judged by
    :func:`values_match` (with ``float_tolerance``; ``wrapped_outputs``: an output ``[v]`` also
    accepts ``v``, see :func:`returned_value_matches`); with ``keep_output`` each result holds
    ``stdout`` (what the program printed) and ``returned`` (the value's JSON, if it returned).
    ``checker``: a custom checker's source (module docstring; stdin tests only), which then
    judges each output instead of ``compare`` / ``float_tolerance``.
    ``status``: "ok" (all pass), "failed" (some wrong answer), or the first non-answer
    problem among "timeout", "memory", "output_limit", "error" (runtime error, crash or a
    killed supervisor), "invalid" (malformed program/tests). Never raises.
    """
    if (not isinstance(program, str) or fn_name_error(fn_name) or not _valid_tests(tests, fn_name is not None)
            or checker_error(compare, float_tolerance) or custom_checker_error(checker)
            or (checker is not None and fn_name is not None)):
        total = len(tests) if isinstance(tests, list) else 0
        return {"passed": 0, "total": total, "status": "invalid", "results": []}
    total = len(tests)
    if fn_name is not None:  # as JSON sees them: tuples are lists, dict keys strings
        tests = [{**t, "output": json.loads(json.dumps(t["output"]))} for t in tests]
    timeout_s = float(timeout_s)
    results: list[dict] = []
    sup = None
    try:
        with tempfile.TemporaryDirectory(prefix="k15sbx-") as run_dir:
            os.chmod(run_dir, 0o755)
            prefix = _python_prefix()
            cfg = {
                "tests": [{} for _ in tests],
                "timeout_s": timeout_s,
                "memory_mb": int(memory_mb),
                "output_limit": int(output_limit),
                "file_size_limit": int(file_size_limit),
                "stop_on_failure": bool(stop_on_failure),
                "isolate_network": bool(isolate_network),
                "require_network_isolation": bool(require_network_isolation),
                "isolate_fs": bool(isolate_fs),
                "drop_privileges": bool(drop_privileges),
                "python_guards": bool(python_guards),
                "uid": NOBODY,
                "python": os.path.realpath(sys.executable),
                "python_prefix": prefix,
            }
            files = {"config.json": json.dumps(cfg), "bootstrap.py": _BOOTSTRAP,
                     "supervisor.py": _SUPERVISOR, "program.py": program}
            marker = f"\x00k15-returned-{os.urandom(8).hex()}:"
            if fn_name is not None:  # the harness runs; it executes the solution and calls fn_name
                files["solution.py"] = program
                files["program.py"] = _CALL_HARNESS % {"solution": os.path.join(run_dir, "solution.py"),
                                                       "fn": fn_name, "marker": marker}
            for name, text in files.items():
                path = os.path.join(run_dir, name)
                with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
                    f.write(text)
                os.chmod(path, 0o600 if name in ("config.json", "supervisor.py") else 0o644)
            for i, t in enumerate(tests):
                path = os.path.join(run_dir, f"in{i}")
                with open(path, "w", encoding="utf-8", errors="surrogatepass") as f:
                    f.write(json.dumps(t["input"]) if fn_name is not None else t.get("input", ""))
                os.chmod(path, 0o600)
            budget = total * (timeout_s + 2.0) + 10.0
            with tempfile.TemporaryFile() as errf:
                sup = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-B", os.path.join(run_dir, "supervisor.py"),
                     run_dir],
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errf,
                    cwd=run_dir, env={}, start_new_session=True,
                )
                try:
                    if fn_name is not None:
                        judge = lambda got, want: _returned_matches(got, want, marker, float_tolerance,  # noqa: E731
                                                                     bool(wrapped_outputs))
                    elif checker is not None:  # every finished run passes on to the checker
                        judge = lambda got, want: True  # noqa: E731
                    else:
                        judge = lambda got, want: outputs_match(got, want, compare, float_tolerance)  # noqa: E731
                    results = _collect(sup, tests, time.monotonic() + budget, stop_on_failure, judge)
                finally:
                    _killpg(sup.pid)
                    sup.stdout.close()
                    sup.wait()
                errf.seek(0)
                sup_err = errf.read()[-2000:].decode("utf-8", "replace")
            stopped = stop_on_failure and results and results[-1]["status"] != "ok"
            sup_failed = len(results) < total and not stopped
    except Exception as e:  # noqa: BLE001 - the reward never raises
        return {"passed": 0, "total": total, "status": "error", "results": results,
                "error": f"{type(e).__name__}: {e}"}
    finally:
        if sup is not None and sup.poll() is None:
            _killpg(sup.pid)

    if checker is not None:
        _apply_checker(checker, tests, results, timeout_s, memory_mb, stop_on_failure,
                       isolate_network=isolate_network, require_network_isolation=require_network_isolation,
                       isolate_fs=isolate_fs, drop_privileges=drop_privileges, python_guards=python_guards)
    passed = 0
    first_problem = None
    for r in results:
        passed += r["status"] == "ok"
        if not keep_output:
            r.pop("stdout", None)
        elif fn_name is not None and "stdout" in r:
            r["stdout"], r["returned"] = split_returned(r["stdout"], marker)
        if r["status"] not in ("ok", "failed") and first_problem is None:
            first_problem = r["status"]
    if sup_failed and len(results) < total:
        first_problem = first_problem or "error"
    if passed == total:
        status = "ok"
    elif first_problem is not None:
        status = first_problem
    else:
        status = "failed"
    out = {"passed": passed, "total": total, "status": status, "results": results}
    if sup_failed and sup_err:
        out["supervisor_stderr"] = sup_err
    return out


def _apply_checker(checker: str, tests: list[dict], results: list[dict], timeout_s: float, memory_mb: int,
                   stop_on_failure: bool, **sandbox) -> None:
    """Judge the finished runs (status "ok" so far) with the custom checker, in the sandbox:
    "ok" when it accepts, "failed" when it rejects, "error" when it fails itself."""
    done = [i for i, r in enumerate(results) if r["status"] == "ok"]
    if not done:
        return
    cases = [{"input": json.dumps({"input": tests[i].get("input", ""), "strict": True,
                                   "pairs": [[results[i].get("stdout", ""), tests[i]["output"]]]}),
              "output": "[true]"} for i in done]
    verdicts = run_tests(_CHECKER_HARNESS % {"source": checker}, cases, max(timeout_s, CHECKER_MIN_TIMEOUT_S),
                         memory_mb=memory_mb, stop_on_failure=stop_on_failure, keep_output=False,
                         **sandbox)["results"]
    for k, i in enumerate(done):
        status = verdicts[k]["status"] if k < len(verdicts) else "error"
        results[i]["status"] = status if status in ("ok", "failed") else "error"
        if results[i]["status"] == "error":  # the checker's own failure: its status and traceback
            results[i]["checker"] = {"status": status, "stderr": verdicts[k].get("stderr", "") if k < len(verdicts)
                                     else "no verdict"}
    if stop_on_failure:  # as if the run had stopped at the first rejected output
        bad = next((k for k, i in enumerate(done) if results[i]["status"] != "ok"), None)
        if bad is not None:
            del results[done[bad] + 1:]


def _collect(sup: subprocess.Popen, tests: list[dict], deadline: float, stop_on_failure: bool, judge):
    """Read the supervisor's JSON lines as they come, judging each test's output."""
    from megatron_k15.rewards.deadline import wait_readable

    results: list[dict] = []
    fd = sup.stdout.fileno()
    buf = b""
    while len(results) < len(tests):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        if not wait_readable(fd, remaining):
            break
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf and len(results) < len(tests):
            line, buf = buf.split(b"\n", 1)
            try:
                r = json.loads(line)
            except ValueError:
                return results
            t = tests[len(results)]
            if r.get("status") == "done":
                r["status"] = "ok" if judge(r.get("stdout", ""), t["output"]) else "failed"
            elif r.get("status") == "sandbox_error":
                r["status"] = "error"
            results.append(r)
            if stop_on_failure and r["status"] != "ok":
                return results
    return results


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


# ----------------------------------------------------------------------------------------
# Reward adapter

_FENCE_RE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_ANY_FENCE_RE = re.compile(r"```[^\n`]*\n(.*?)```", re.DOTALL)


def extract_program(response: str) -> str:
    """The last ```python fenced block of a response (else the last fenced block, else all)."""
    if not isinstance(response, str):
        return ""
    blocks = _FENCE_RE.findall(response) or _ANY_FENCE_RE.findall(response)
    return blocks[-1] if blocks else response


def code_reward(response: str, record: dict, *, timeout_s: float = 4.0,
                partial_credit: bool = False) -> float:
    """1.0 when the program in ``response`` passes all of ``record["tests"]`` (else 0.0);
    with ``partial_credit`` the fraction of tests passed. The record's ``timeout_s``,
    ``compare`` and ``float_tolerance`` set the limit and the checker (:func:`outputs_match`),
    or its ``checker`` a custom one (module docstring); its ``fn_name`` makes the tests
    call-based (:func:`returned_value_matches`, with its ``wrapped_outputs``)."""
    try:
        tests = record.get("tests") if isinstance(record, dict) else None
        program = extract_program(response)
        if not program.strip() or not tests:
            return 0.0
        res = run_tests(program, tests, record.get("timeout_s", timeout_s), stop_on_failure=not partial_credit,
                        compare=record.get("compare", "lines"), float_tolerance=record.get("float_tolerance"),
                        fn_name=record.get("fn_name"), wrapped_outputs=bool(record.get("wrapped_outputs")),
                        checker=record.get("checker"))
        if res["total"] == 0:
            return 0.0
        if partial_credit:
            return res["passed"] / res["total"]
        return 1.0 if res["status"] == "ok" else 0.0
    except Exception:  # noqa: BLE001
        return 0.0


def sandbox_warning(report: dict) -> Optional[str]:
    """A line for the user when the sandbox on this machine lacks an isolation that code
    rewards rely on (``sandbox_report()``'s result), else None."""
    if not report.get("working"):
        return "warning: the code sandbox does not work on this machine; every code reward will be 0"
    missing = [what for key, what in (("private_network", "network"), ("private_files", "your files"),
                                      ("private_tmp", "/tmp")) if report.get(key) is False]
    if not missing:
        return None
    return ("warning: sandboxed code-test programs can reach " + ", ".join(missing) + " on this machine "
            "(no permission for the namespaces the sandbox uses; rewards/code.py): keep prompt and test "
            "files unreadable to other users")


def sandbox_report() -> dict:
    """What the sandbox enforces on this machine, probed with a tiny program run without the
    Python-level guards: the uid it runs as, whether it has a private network namespace
    (only ``lo`` visible), whether /tmp is a private tmpfs, and whether the caller's files are
    out of reach (this module's source cannot be seen; None when it is installed under the
    interpreter's prefix or a system directory, which the sandbox shows)."""
    marker = f"k15-probe-{os.getpid()}-{time.monotonic_ns()}"
    source = os.path.realpath(__file__)
    shown = [os.path.realpath(_python_prefix()), "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/etc"]
    probe = (
        "import os, socket\n"
        "print(os.getuid())\n"
        "print(int([name for _, name in socket.if_nameindex()] == ['lo']))\n"
        f"print(int(not os.path.exists('/tmp/{marker}')))\n"
        f"print(int(not os.path.exists({source!r})))\n"
    )
    with open(os.path.join(tempfile.gettempdir(), marker), "w"):
        pass
    try:
        res = run_tests(probe, [{"input": "", "output": ""}], 5.0, keep_output=True,
                        python_guards=False)
    finally:
        os.remove(os.path.join(tempfile.gettempdir(), marker))
    lines = (res["results"][0].get("stdout", "") if res["results"] else "").split()
    if len(lines) != 4:
        return {"working": False, "detail": res}
    private_files = None if any(source.startswith(d + os.sep) for d in shown) else lines[3] == "1"
    return {"working": True, "uid": int(lines[0]), "private_network": lines[1] == "1",
            "private_tmp": lines[2] == "1", "private_files": private_files}
