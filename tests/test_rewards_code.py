"""Code sandbox: correct/incorrect programs and hostile programs (each must come back within
its time limit with the right status while the calling process survives)."""

import os
import socket
import sys
import threading
import time
import uuid

import pytest

from megatron_k15.rewards.code import (code_reward, extract_program, normalize_output, run_tests,
                                      sandbox_report, values_match)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX sandbox")

IS_ROOT = os.geteuid() == 0


def _os_isolation() -> bool:
    """Root *and* the kernel lets us create namespaces (a container without CAP_SYS_ADMIN
    does not): only then can the OS-only variants below be enforced by the OS."""
    if not IS_ROOT:
        return False
    from megatron_k15.rewards.code import sandbox_report

    rep = sandbox_report()
    return rep.get("working", False) and rep.get("uid") == 65534 and rep.get("private_network", False)


OS_ISOLATION = _os_isolation()
T = 1.0  # per-test wall limit used below
BOUND = T + 4.0  # generous bound on the whole call

ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


def timed(*args, **kwargs):
    t0 = time.monotonic()
    res = run_tests(*args, **kwargs)
    return res, time.monotonic() - t0


# ---------------------------------------------------------------------------- correctness


def test_correct_program_passes():
    res, dt = timed(ADD, [{"input": "1 2\n", "output": "3\n"}, {"input": "10 -4", "output": "6"}], T)
    assert res["status"] == "ok", res
    assert (res["passed"], res["total"]) == (2, 2)
    assert len(res["results"]) == 2 and dt < BOUND


def test_wrong_answer_is_failed_with_count():
    prog = "a, b = map(int, input().split())\nprint(a * b)\n"
    res = run_tests(prog, [{"input": "2 2", "output": "4"}, {"input": "2 3", "output": "5"}], T)
    assert res["status"] == "failed"
    assert res["passed"] == 1 and res["total"] == 2
    assert [r["status"] for r in res["results"]] == ["ok", "failed"]


def test_whitespace_normalisation():
    prog = "print('1 2   ')\nprint('3')\nprint()\nprint()\n"
    assert run_tests(prog, [{"input": "", "output": "1 2\n3"}], T)["status"] == "ok"
    assert run_tests(prog, [{"input": "", "output": "1 2\r\n3\r\n"}], T)["status"] == "ok"
    # leading and inner whitespace still matter
    assert run_tests(prog, [{"input": "", "output": " 1 2\n3"}], T)["status"] == "failed"
    assert run_tests(prog, [{"input": "", "output": "1  2\n3"}], T)["status"] == "failed"
    assert normalize_output("a  \n\n b\t\n\n\n") == "a\n\n b"


def test_common_ways_to_read_write_and_end_a_program():
    """Idioms of competitive-programming solutions: they must pass when the answer is right
    (exit() and quit() come from the site module, which the sandbox's python -S skips)."""
    ends = ["exit()", "quit()", "exit(0)", "import sys\nsys.exit()", "raise SystemExit"]
    progs = ["a, b = map(int, open(0).read().split())\nprint(a + b)\n",
             "import sys\ninput = sys.stdin.readline\na, b = map(int, input().split())\nprint(a + b)\n",
             "import sys\na, b = map(int, sys.stdin.buffer.read().split())\nsys.stdout.write(f'{a + b}\\n')\n"]
    progs += [f"a, b = map(int, input().split())\nprint(a + b)\n{end}\nprint('never')\n" for end in ends]
    for prog in progs:
        res = run_tests(prog, [{"input": "2 3\n", "output": "5"}, {"input": "-4 4\n", "output": "0"}], 10.0)
        assert res["status"] == "ok", (prog, res)
    assert run_tests("print(1)\nexit(3)\n", [{"input": "", "output": "1"}], 10.0)["status"] == "error"
    # recursion 10^5 deep through C frames (lru_cache) needs more than the default 8 MB stack
    deep = ("import sys\nfrom functools import lru_cache\nsys.setrecursionlimit(10 ** 7)\n@lru_cache(None)\n"
            "def f(n):\n    return 0 if n == 0 else 1 + f(n - 1)\nprint(f(int(input())))\n")
    assert run_tests(deep, [{"input": "100000", "output": "100000"}], 10.0)["status"] == "ok"


def test_checkers_lines_tokens_and_float_tolerance():
    from megatron_k15.rewards.code import outputs_match

    assert outputs_match("1 2  \n\n", "1 2") and not outputs_match("1  2", "1 2")
    assert outputs_match("1\n2\n", "1 2", "tokens") and outputs_match("1   2", "1 2", "tokens")
    assert not outputs_match("1 2 3", "1 2", "tokens") and not outputs_match("1 3", "1 2", "tokens")
    # |got - want| <= tol * max(1, |want|): absolute near 0, relative for large values
    assert outputs_match("0.3333", "0.333333333", float_tolerance=1e-4)
    assert not outputs_match("0.3332", "0.333333333", float_tolerance=1e-4)
    assert outputs_match("1000100", "1e6", float_tolerance=1e-4) and not outputs_match("1000101", "1e6", float_tolerance=1e-4)
    assert outputs_match("YES 0.5000001", "YES 0.5", float_tolerance=1e-6)
    assert not outputs_match("NO 0.5", "YES 0.5", float_tolerance=1e-6)  # words still match exactly
    assert not outputs_match("nan", "1.0", float_tolerance=1.0) and not outputs_match("inf", "1e308", float_tolerance=1.0)
    # integers stay exact under a tolerance (a residue mod 1e9+7 is not "close"); judges split on
    # ASCII whitespace only and read plain decimals only
    assert not outputs_match("999999999", "1000000006", float_tolerance=1e-6)
    assert not outputs_match("1_000.0", "1000.0", float_tolerance=1e-6)
    assert not outputs_match("1\xa02", "1 2", "tokens") and outputs_match("1\r\n2\t", "1 2", "tokens")
    assert outputs_match("-.5", "-0.5000001", float_tolerance=1e-6)
    with pytest.raises(ValueError, match="compare"):
        outputs_match("1", "1", "exact")
    assert run_tests("print(1)", [{"input": "", "output": "1"}], 10.0, compare="exact")["status"] == "invalid"
    assert run_tests("print(1)", [{"input": "", "output": "1"}], 10.0, float_tolerance="1e-6")["status"] == "invalid"
    # through the reward: the record picks the checker
    one_per_line = "```python\na, b = map(int, input().split())\nprint(a)\nprint(b)\n```"
    rec = {"task": "code", "tests": [{"input": "1 2", "output": "1 2"}], "timeout_s": 10.0}
    assert code_reward(one_per_line, rec) == 0.0 and code_reward(one_per_line, dict(rec, compare="tokens")) == 1.0
    third = "```python\nprint(f'{1 / int(input()):.6f}')\n```"
    rec = {"task": "code", "tests": [{"input": "3", "output": "0.333333333"}], "timeout_s": 10.0}
    assert code_reward(third, rec) == 0.0 and code_reward(third, dict(rec, float_tolerance=1e-6)) == 1.0


def test_runtime_and_syntax_errors():
    assert run_tests("raise ValueError('x')", [{"input": "", "output": ""}], T)["status"] == "error"
    res = run_tests("def f(:\n", [{"input": "", "output": ""}], T)
    assert res["status"] == "error" and "SyntaxError" in res["results"][0]["stderr"]
    assert run_tests("import sys\nsys.exit(3)", [{"input": "", "output": ""}], T)["status"] == "error"


def test_stop_on_failure_and_invalid_tests():
    res = run_tests(ADD, [{"input": "1 1", "output": "3"}, {"input": "1 1", "output": "2"}], T,
                    stop_on_failure=True)
    assert res["status"] == "failed" and res["passed"] == 0 and len(res["results"]) == 1
    assert run_tests(ADD, [], T)["status"] == "invalid"
    assert run_tests(ADD, [{"input": "1 2"}], T)["status"] == "invalid"
    assert run_tests(ADD, "nope", T)["status"] == "invalid"  # type: ignore[arg-type]
    assert run_tests(None, [{"input": "", "output": ""}], T)["status"] == "invalid"  # type: ignore


def test_standard_library_is_usable():
    prog = ("import math, collections, heapq, itertools, functools, re, fractions, bisect\n"
            "print(math.comb(5, 2), sum(collections.Counter('aab').values()))\n")
    assert run_tests(prog, [{"input": "", "output": "10 3"}], 5.0)["status"] == "ok"
    # modules that register fork handlers when imported (random, threading and what imports them):
    # a denied os.register_at_fork made every program importing them a runtime error
    import random
    import statistics

    prog = ("import random, statistics, threading, queue, logging, secrets, tempfile\n"
            "random.seed(int(input()))\nxs = [random.randint(0, 99) for _ in range(5)]\n"
            "print(*xs, statistics.median(xs))\n")
    rng = random.Random(11)
    xs = [rng.randint(0, 99) for _ in range(5)]
    want = " ".join(map(str, xs + [statistics.median(xs)]))
    assert run_tests(prog, [{"input": "11\n", "output": want}], 5.0)["status"] == "ok"


def test_judges_thread_idiom():
    """Competitive programmers recurse deeply inside a thread with a big stack; the sandbox
    cannot start threads (RLIMIT_NPROC 0 under the uid drop), so start() runs the target to
    the end; join() and is_alive() then behave as for a finished thread, and an exception in
    the target is reported on stderr while the main program goes on, as in CPython."""
    idiom = ("import sys, threading\nsys.setrecursionlimit(1 << 20)\nthreading.stack_size(1 << 27)\n"
             "def depth(n):\n    return 0 if n == 0 else 1 + depth(n - 1)\n"
             "def main():\n    print(depth(int(input())))\n"
             "t = threading.Thread(target=main)\nt.start()\nt.join()\nprint(t.is_alive())\n")
    res = run_tests(idiom, [{"input": "100000\n", "output": "100000\nFalse"}], 10.0)
    assert res["status"] == "ok", res
    failing = ("import threading\ndef f():\n    raise ValueError('boom')\n"
               "t = threading.Thread(target=f)\nt.start()\nt.join()\nprint('after')\n")
    res = run_tests(failing, [{"input": "", "output": "after"}], 10.0)
    assert res["status"] == "ok" and "ValueError: boom" in res["results"][0]["stderr"], res
    if not OS_ISOLATION:
        return  # threads start for real without the uid drop: nothing below is shimmed
    # threads that only make sense beside the main one fail at once, as before, not inline
    # (a daemon loop or a pool worker would run until the timeout)
    for prog in ("import threading, time\nthreading.Thread(target=time.sleep, args=(100,), daemon=True).start()\n",
                 "from concurrent.futures import ThreadPoolExecutor\nwith ThreadPoolExecutor(2) as ex:\n"
                 "    print(sum(ex.map(abs, [-1, 2])))\n",
                 "import threading\nthreading.Timer(100, print).start()\n"):
        res, dt = timed(prog, [{"input": "", "output": ""}], T)
        assert res["status"] == "error" and "can't start new thread" in res["results"][0]["stderr"], res
        assert dt < BOUND


TWO_SUM = """
from typing import List

class Solution:
    def twoSum(self, nums: List[int], target: int) -> List[int]:
        print("debug", nums)  # printing is allowed and ignored
        seen = {}
        for i, x in enumerate(nums):
            if target - x in seen:
                return [seen[target - x], i]
            seen[x] = i

if __name__ == "__main__":  # a module, not the main program: this does not run (stdin is JSON)
    print(int(input()) + 1)
"""


def test_call_based_tests_call_the_function():
    """LeetCode / APPS style: the function (a method of class Solution, or at the top level) is
    called with each test's arguments and its returned value compared as JSON."""
    tests = [{"input": [[2, 7, 11, 15], 9], "output": [0, 1]}, {"input": [[3, 2, 4], 6], "output": [1, 2]}]
    res = run_tests(TWO_SUM, tests, T, fn_name="twoSum", keep_output=True)
    assert res["status"] == "ok", res
    assert res["results"][0]["returned"] == "[0, 1]" and res["results"][0]["stdout"] == "debug [2, 7, 11, 15]\n"
    assert run_tests(TWO_SUM, [{"input": [[3, 2, 4], 6], "output": [2, 1]}], T, fn_name="twoSum")["status"] == "failed"
    third = "def third(x):\n    return x / 3, 'a'\n"  # a tuple returns as a JSON list
    assert run_tests(third, [{"input": [1], "output": [0.3333, "a"]}], T, fn_name="third")["status"] == "failed"
    assert run_tests(third, [{"input": [1], "output": [0.3333, "a"]}], T, fn_name="third",
                     float_tolerance=1e-3)["status"] == "ok"
    # booleans are not integers, integers are exact, a set is no JSON value, no function is an error
    truth = "def f(x):\n    return x > 0\n"
    assert run_tests(truth, [{"input": [2], "output": 1}], T, fn_name="f")["status"] == "failed"
    assert run_tests(truth, [{"input": [2], "output": True}], T, fn_name="f")["status"] == "ok"
    assert run_tests("def f():\n    return {1}\n", [{"input": [], "output": [1]}], T, fn_name="f")["status"] == "failed"
    res = run_tests(truth, [{"input": [2], "output": True}], T, fn_name="g")
    assert res["status"] == "error" and "defines no function g" in res["results"][0]["stderr"]
    # malformed: arguments not a list, output not JSON, a name that is no identifier
    assert run_tests(truth, [{"input": "2", "output": True}], T, fn_name="f")["status"] == "invalid"
    assert run_tests(truth, [{"input": [2], "output": float("nan")}], T, fn_name="f")["status"] == "invalid"
    assert run_tests(truth, [{"input": [2], "output": True}], T, fn_name="f x")["status"] == "invalid"
    # LeetCode's preamble (List, Optional, deque... without imports), a real module for
    # dataclasses, a solution that replaces sys.stdout, an expected tuple (a list in JSON)
    preamble = "class Solution:\n    def f(self, xs: List[int]) -> Optional[int]:\n        return max(xs, default=None)\n"
    assert run_tests(preamble, [{"input": [[1, 5]], "output": 5}], T, fn_name="f")["status"] == "ok"
    dc = ("from __future__ import annotations\nfrom dataclasses import dataclass\n@dataclass\nclass P:\n"
          "    x: int\ndef f(a):\n    return P(a).x\n")
    assert run_tests(dc, [{"input": [3], "output": 3}], T, fn_name="f")["status"] == "ok"
    quiet = "import io, sys\nsys.stdout = io.StringIO()\ndef f(a):\n    print(a)\n    return (a, a)\n"
    assert run_tests(quiet, [{"input": [3], "output": (3, 3)}], T, fn_name="f")["status"] == "ok"
    # an expected null would pass a function that does nothing
    assert run_tests("def f(a):\n    pass\n", [{"input": [3], "output": None}], T, fn_name="f")["status"] == "invalid"
    rec = {"tests": [{"input": [1, 2], "output": 3}], "fn_name": "add"}
    assert code_reward("```python\ndef add(a, b):\n    return a + b\n```", rec) == 1.0
    assert code_reward("```python\ndef add(a, b):\n    print(a + b)\n```", rec) == 0.0  # printed, returned None


@pytest.mark.parametrize("got,want,tol,same", [
    ([1, [2, 3]], [1, [2, 3]], None, True), ({"a": 1}, {"a": 1}, None, True), ({"a": 1}, {"b": 1}, None, False),
    (1, 1.0, None, True), (1, 2, 0.5, False), (1.2, 1.0, 0.5, True), (True, 1, None, False),
    ("1", 1, None, False), (None, None, None, True), ([1], [1, 2], None, False),
])
def test_values_match(got, want, tol, same):
    assert values_match(got, want, tol) is same


# ---------------------------------------------------------------------------- hostile programs


def test_infinite_loop_times_out():
    res, dt = timed("while True:\n    pass\n", [{"input": "", "output": ""}], T)
    assert res["status"] == "timeout" and dt < BOUND
    res, dt = timed("import time\ntime.sleep(100)\n", [{"input": "", "output": ""}], T)
    assert res["status"] == "timeout" and dt < BOUND


FORK_BOMB = "import os\nwhile True:\n    os.fork()\n"


@pytest.mark.parametrize("guards", [True, False])
def test_fork_bomb(guards):
    if not guards and not OS_ISOLATION:
        pytest.skip("OS-level process limit for the sandbox needs a uid drop (root)")
    res, dt = timed(FORK_BOMB, [{"input": "", "output": ""}], T, python_guards=guards)
    assert res["status"] == "error", res
    assert dt < BOUND
    err = res["results"][0]["stderr"]
    assert ("PermissionError" in err) if guards else ("BlockingIOError" in err or "Resource" in err)


def test_memory_bomb():
    prog = "x = []\nwhile True:\n    x.append(bytearray(50 * 1024 * 1024))\n"
    res, dt = timed(prog, [{"input": "", "output": ""}], T + 2, memory_mb=256)
    assert res["status"] == "memory", res
    assert dt < BOUND + 2
    res = run_tests("x = bytearray(10**10)\n", [{"input": "", "output": ""}], T, memory_mb=256)
    assert res["status"] == "memory"


def test_output_flood():
    res, dt = timed("while True:\n    print('x' * 1000)\n", [{"input": "", "output": ""}], T,
                    output_limit=1 << 16)
    assert res["status"] == "output_limit" and dt < BOUND


@pytest.mark.parametrize("guards", [True, False])
def test_write_outside_directory(tmp_path, guards):
    if not guards and not OS_ISOLATION:
        pytest.skip("OS-level write protection needs the uid drop (root)")
    targets = [tmp_path / "escape.txt", f"/tmp/k15-escape-{uuid.uuid4().hex}.txt",
               f"/dev/shm/k15-escape-{uuid.uuid4().hex}", os.path.join(os.getcwd(), "k15-escape.txt")]
    os.chmod(tmp_path, 0o777)  # even a world-writable target directory must not receive it
    prog = "import os\nn = 0\n"
    for t in targets:
        prog += (f"try:\n    open({str(t)!r}, 'w').write('pwned')\n    n += 1\n"
                 f"except Exception as e:\n    print(type(e).__name__)\n")
    prog += "open('inside.txt', 'w').write('ok')\nprint('inside', open('inside.txt').read())\n"
    res, dt = timed(prog, [{"input": "", "output": ""}], T, python_guards=guards, keep_output=True)
    assert dt < BOUND
    for t in targets:
        assert not os.path.exists(t), t
    assert "inside ok" in res["results"][0]["stdout"]  # writing inside the cwd works


@pytest.mark.parametrize("guards", [True, False])
def test_network_connection_to_loopback_server(guards):
    if not guards and not OS_ISOLATION:
        pytest.skip("network namespace needs root here")
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    arrived = []
    stop = threading.Event()

    def accept_loop():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                arrived.append(conn)
            except OSError:
                pass

    th = threading.Thread(target=accept_loop, daemon=True)
    th.start()
    prog = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\n"
            f"s.sendall(b'hello')\nprint('connected')\n")
    try:
        res, dt = timed(prog, [{"input": "", "output": "connected"}], T, python_guards=guards)
        time.sleep(0.3)
    finally:
        stop.set()
        th.join(2)
        srv.close()
    assert arrived == []
    assert res["status"] == "error", res
    assert dt < BOUND


def test_secret_in_parent_environment_is_invisible(monkeypatch):
    monkeypatch.setenv("K15_SECRET", "hunter2-" + uuid.uuid4().hex)
    secret = os.environ["K15_SECRET"]
    prog = (
        "import os\n"
        "found = 'K15_SECRET' in os.environ or any('hunter2' in v for v in os.environ.values())\n"
        "if SCAN:\n"
        "    for pid in os.listdir('/proc'):\n"
        "        if pid.isdigit():\n"
        "            try:\n"
        "                with open('/proc/%s/environ' % pid, 'rb') as f:\n"
        "                    found = found or b'hunter2' in f.read()\n"
        "            except Exception:\n"
        "                pass\n"
        "print('found' if found else 'none')\n"
    ).replace("SCAN", "True" if OS_ISOLATION else "False")
    res = run_tests(prog, [{"input": "", "output": "none"}], T, keep_output=True)
    assert res["status"] == "ok", res
    assert secret not in repr(res)


@pytest.mark.parametrize("guards", [True, False])
def test_program_that_kills_its_parent(guards):
    if not guards and not OS_ISOLATION:
        pytest.skip("OS-level signal protection needs the uid drop (root)")
    me = os.getpid()
    prog = f"import os, signal\nos.kill(os.getppid(), 9)\nos.kill({me}, 9)\nprint('alive')\n"
    res, dt = timed(prog, [{"input": "", "output": "alive"}, {"input": "", "output": "alive"}], T,
                    python_guards=guards)
    assert res["status"] == "error" and dt < BOUND
    assert os.getpid() == me  # we are still here


def test_killed_supervisor_does_not_take_the_caller_down():
    # without the uid drop and without Python guards the kill reaches the supervisor, which
    # is the sandboxed program's parent; the caller only sees an error
    prog = "import os\nos.kill(os.getppid(), 9)\nimport time\ntime.sleep(30)\n"
    res, dt = timed(prog, [{"input": "", "output": ""}] * 2, T, python_guards=False,
                    drop_privileges=False, isolate_fs=False)
    assert res["status"] == "error" and dt < BOUND
    assert len(res["results"]) < 2


# ---------------------------------------------------------------------------- reward adapter


def test_extract_program_and_code_reward():
    resp = "Here:\n```python\nprint(1)\n```\nBetter:\n```python\n" + ADD + "```\nDone."
    assert extract_program(resp) == ADD
    assert extract_program("print(5)") == "print(5)"
    rec = {"task": "code", "tests": [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "4"}]}
    assert code_reward(resp, rec) == 1.0
    wrong = "```python\nprint(3)\n```"
    assert code_reward(wrong, rec) == 0.0
    assert code_reward(wrong, rec, partial_credit=True) == 0.5
    assert code_reward(wrong, {"task": "code"}) == 0.0


@pytest.mark.skipif(not OS_ISOLATION, reason="needs root and permission to create namespaces")
def test_sandbox_report_as_root():
    rep = sandbox_report()
    assert rep == {"working": True, "uid": 65534, "private_network": True, "private_tmp": True,
                   "private_files": rep["private_files"]}
    assert rep["private_files"] in (True, None)  # None: this package lives under the interpreter's prefix


def _as_nobody(script: str):
    """Run ``script`` as uid 65534 with an interpreter and this checkout that it can read (a
    system python3), or None where that is not possible here."""
    import shutil
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    exe = shutil.which("python3", path="/usr/bin:/usr/local/bin:/bin")
    if os.geteuid() != 0 or exe is None or shutil.which("setpriv") is None or shutil.which("unshare") is None:
        return None
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    # the kernel must allow unprivileged user namespaces with mounts (else the old isolation applies)
    probe = subprocess.run(nobody + ["unshare", "-U", "-r", "-m", "-p", "-f", "true"], capture_output=True)
    if probe.returncode != 0:
        return None
    cmd = nobody + [exe, "-c", f"import sys; sys.path.insert(0, {root!r})\n" + script]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    return res if "SKIP" not in res.stdout else None


def test_non_root_caller_gets_the_same_isolation_through_a_user_namespace():
    """Training jobs on clusters run as ordinary users: the sandbox then becomes root of a
    user namespace and builds the same network, PID and mount isolation, minimal root
    included (this checkout, readable by the caller, is not there for the program)."""
    prog = f"import os\nprint(os.path.exists({os.path.realpath(__file__)!r}), os.getpid())\n"
    res = _as_nobody(
        "try:\n    from megatron_k15.rewards.code import run_tests, sandbox_report\n"
        "except Exception:\n    print('SKIP'); raise SystemExit\n"
        "rep = sandbox_report()\n"
        "print(rep['private_network'], rep['private_tmp'], rep['private_files'])\n"
        f"print(run_tests({prog!r}, [{{'input': '', 'output': 'False 1'}}], 5.0)['status'])\n")
    if res is None:
        pytest.skip("needs root here (to become nobody), setpriv, unprivileged user namespaces, and a "
                    "python3 and checkout nobody can read")
    if "Permission denied" in res.stderr or "No module named" in res.stderr:
        pytest.skip(f"nobody cannot run this checkout here: {res.stderr[-200:]}")
    assert res.stdout.split() == ["True", "True", "True", "ok"], (res.stdout, res.stderr[-2000:])


def test_sandbox_warning_names_what_is_missing():
    from megatron_k15.rewards.code import sandbox_warning

    full = {"working": True, "uid": 65534, "private_network": True, "private_tmp": True, "private_files": True}
    assert sandbox_warning(full) is None
    assert sandbox_warning(dict(full, private_files=None)) is None  # installed under the prefix: unknown
    msg = sandbox_warning(dict(full, private_network=False, private_files=False))
    assert "network, your files" in msg and "/tmp" not in msg
    assert "every code reward will be 0" in sandbox_warning({"working": False})


def test_caller_files_and_processes_are_out_of_reach():
    """The program's root holds the system directories, the interpreter and its own run dir
    only: this test file (a stand-in for the training data next to it) does not exist there,
    and /proc lists no other process (the caller's command line would name the data)."""
    if not OS_ISOLATION:
        pytest.skip("the minimal root needs the caller to be root")
    here = os.path.realpath(__file__)
    prog = (f"import os\nprint(os.path.exists({here!r}), os.path.exists({os.path.dirname(here)!r}))\n"
            "print(sorted(p for p in os.listdir('/proc') if p.isdigit()) == [str(os.getpid())]"
            " if os.path.isdir('/proc') else True)\n"
            "print(open('/dev/stdin').read().strip())\n")  # the program's own input, reopened
    old = os.umask(0o077)  # the caller's umask must not lock nobody out of the new root
    try:
        res = run_tests(prog, [{"input": "in", "output": "False False\nTrue\nin"}], T, python_guards=False)
    finally:
        os.umask(old)
    assert res["status"] == "ok", res


PERMUTATION_CHECKER = """
def check(input, output, expected):
    n = int(input)
    return sorted(map(int, output.split())) == list(range(1, n + 1))
"""
PERMUTATION_TESTS = [{"input": "3\n", "output": "1 2 3\n"}, {"input": "5\n", "output": "1 2 3 4 5\n"}]


def test_custom_checker_accepts_any_right_answer():
    """'Print any permutation of 1..n': the reference lists one; a program printing another is
    wrong to the built-in checkers and right to the record's checker, which sees the test's
    input, the output and the reference; a wrong program stays wrong; a checker that raises
    fails the tests it judges ("error"); with stop_on_failure the run ends at the first
    rejected output."""
    reverse = "n = int(input())\nprint(*range(n, 0, -1))\n"
    ones = "n = int(input())\nprint(*([1] * n))\n"
    assert run_tests(reverse, PERMUTATION_TESTS, T)["status"] == "failed"
    assert run_tests(reverse, PERMUTATION_TESTS, T, checker=PERMUTATION_CHECKER)["passed"] == 2
    assert run_tests(ones, PERMUTATION_TESTS, T, checker=PERMUTATION_CHECKER)["passed"] == 0
    sees = "def check(i, o, e):\n    return i == '3\\n' and o.split() == ['3', '2', '1'] and e == '1 2 3\\n'\n"
    got = run_tests(reverse, PERMUTATION_TESTS, T, checker=sees)
    assert [r["status"] for r in got["results"]] == ["ok", "failed"]
    broken = run_tests(reverse, PERMUTATION_TESTS, T, checker="def check(i, o, e):\n    raise ValueError\n")
    assert broken["status"] == "error" and broken["passed"] == 0
    stopped = run_tests(ones, PERMUTATION_TESTS, T, checker=PERMUTATION_CHECKER, stop_on_failure=True)
    assert len(stopped["results"]) == 1 and stopped["status"] == "failed"
    record = {"tests": PERMUTATION_TESTS, "checker": PERMUTATION_CHECKER}
    assert code_reward("```python\n" + reverse + "```", record) == 1.0
    assert code_reward("```python\n" + ones + "```", record) == 0.0
    # what the checker prints is not its verdict; its names do not clash with the harness's; a
    # __main__ block does not run; a verdict that is not a bool is an error, with its traceback
    noisy = "_case = None\n" + PERMUTATION_CHECKER.replace("n = int(input)", "print('debug'); n = int(input)") + \
        "if __name__ == '__main__':\n    raise SystemExit(3)\n"
    assert run_tests(reverse, PERMUTATION_TESTS, T, checker=noisy)["passed"] == 2
    vague = run_tests(reverse, PERMUTATION_TESTS[:1], T, checker="def check(i, o, e):\n    return 'yes'\n")
    assert vague["status"] == "error" and "must return True or False" in vague["results"][0]["checker"]["stderr"]
    for bad in ("def chk(i, o, e): pass", "def check(i, o): pass", "def check(:", "def check(i, o, e, f): pass",
                "def check(i, o, e, *, strict): pass"):
        assert run_tests(reverse, PERMUTATION_TESTS, T, checker=bad)["status"] == "invalid"
    assert run_tests("def f(x): return x", [{"input": [1], "output": 1}], T, fn_name="f",
                     checker=PERMUTATION_CHECKER)["status"] == "invalid"  # call-based: values, not output
