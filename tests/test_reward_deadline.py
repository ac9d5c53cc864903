"""Deadline predicates: the fork-and-kill primitive and the pool of warm server processes."""

import os
import signal
import threading
import time

import pytest

from megatron_k15.rewards.deadline import DeadlineServerPool, run_with_deadline

PREDICATES = '''
import os, sys

def equal(a, b):
    return a == b

def hang(a, b):
    while True:
        pass

def crash(a, b):
    raise ValueError("no")

def noisy(a, b):
    print("chatter on stdout\\n" * 100)
    sys.stdout.flush()
    return True

def whoami(a, b):
    return str(os.getppid()) == a  # the child's parent is the server

def not_here():
    return False
'''


@pytest.fixture
def predicates(tmp_path):
    (tmp_path / "predicates_mod.py").write_text(PREDICATES)
    pools = []

    def make(name, **kw):
        pool = DeadlineServerPool(f"predicates_mod:{name}", pythonpath=[str(tmp_path)], **kw)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def _server_pids(pool):
    return sorted(s.proc.pid for s in pool._idle)


def test_run_with_deadline_kills_python_and_c_level_loops():
    def hang():
        while True:
            pass

    def big_power():  # one C-level call that a signal handler could not interrupt
        return 7 ** (10 ** 12) > 0

    for fn in (hang, big_power):
        t0 = time.monotonic()
        assert run_with_deadline(fn, (), 0.5) is None
        assert time.monotonic() - t0 < 3.0
    assert run_with_deadline(lambda: True, (), 5.0) is True
    assert run_with_deadline(lambda: False, (), 5.0) is False
    assert run_with_deadline(lambda: 1 / 0, (), 5.0) is None


def test_pool_answers_and_survives_hangs_crashes_and_chatter(predicates):
    equal = predicates("equal", max_servers=1)
    assert equal.call(("a", "a"), 5.0) is True
    assert equal.call(("a", "b"), 5.0) is False
    pids = _server_pids(equal)
    assert len(pids) == 1
    for name, want in (("hang", None), ("crash", None), ("noisy", True)):
        pool = predicates(name, max_servers=1)
        for _ in range(2):  # the server outlives its killed or failed child
            t0 = time.monotonic()
            assert pool.call(("x", "y"), 0.5) is want, name
            assert time.monotonic() - t0 < 3.0
        assert len(_server_pids(pool)) == 1
    assert _server_pids(equal) == pids  # one server per pool, reused


def test_each_check_runs_in_a_child_of_the_server(predicates):
    pool = predicates("whoami", max_servers=1)
    assert pool.call(("0", ""), 5.0) is False  # starts the server
    (pid,) = _server_pids(pool)
    assert pool.call((str(pid), ""), 5.0) is True
    assert pool.call((str(os.getpid()), ""), 5.0) is False


def test_threads_share_at_most_max_servers(predicates):
    pool = predicates("equal", max_servers=2)
    seen, errors = set(), []
    lock = threading.Lock()

    def work(k):
        for j in range(5):
            want = (k + j) % 2 == 0
            got = pool.call((str(k), str(k) if want else "other"), 5.0)
            with lock:
                if got is not want:
                    errors.append((k, j, got))
                seen.update(_server_pids(pool))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert 1 <= len(seen) <= 2 and pool._live <= 2


def test_a_server_killed_from_outside_is_replaced(predicates):
    pool = predicates("equal", max_servers=1)
    assert pool.call(("a", "a"), 5.0) is True
    (pid,) = _server_pids(pool)
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    assert pool.call(("a", "a"), 5.0) is True
    (new_pid,) = _server_pids(pool)
    assert new_pid != pid


def test_unusable_predicate_answers_none_at_once_with_one_warning(tmp_path, predicates):
    pool = DeadlineServerPool("predicates_mod:equal", warm="predicates_mod:not_here",
                              pythonpath=[str(tmp_path)])
    (tmp_path / "predicates_mod.py").write_text(PREDICATES)
    with pytest.warns(RuntimeWarning, match="unusable"):
        assert pool.call(("a", "a"), 5.0) is None
    t0 = time.monotonic()
    assert pool.call(("a", "a"), 5.0) is None
    assert time.monotonic() - t0 < 0.1
    assert pool._live == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_a_forked_child_starts_its_own_servers(predicates):
    pool = predicates("equal", max_servers=1)
    assert pool.call(("a", "a"), 5.0) is True
    parent_pids = _server_pids(pool)
    pid = os.fork()
    if pid == 0:  # the parent's servers are not the child's to talk to
        ok = not pool._idle and pool.call(("b", "b"), 5.0) is True and _server_pids(pool) != parent_pids
        pool.close()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _server_pids(pool) == parent_pids and pool.call(("c", "c"), 5.0) is True


def test_descriptors_numbered_past_1024(predicates):
    """A trainer holding many files (datasets, checkpoints, sockets) gets pipe descriptors past
    select()'s 1024 limit: deadline checks, the server pool and the code sandbox still answer."""
    import resource

    from megatron_k15.rewards.code import run_tests

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(soft, hard if hard != resource.RLIM_INFINITY else 4096) < 1200:
        pytest.skip(f"the descriptor limit ({soft}/{hard}) is too low to go past 1024")
    if soft != resource.RLIM_INFINITY and soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    held = []
    try:
        while not held or held[-1] < 1100:
            held.append(os.open(os.devnull, os.O_RDONLY))
        assert run_with_deadline(lambda: True, (), 5.0) is True
        assert predicates("equal", max_servers=1).call(("a", "a"), 5.0) is True
        assert run_tests("print(int(input()) + 1)", [{"input": "1", "output": "2"}], 10.0)["status"] == "ok"
    finally:
        for fd in held:
            os.close(fd)
        if soft != resource.RLIM_INFINITY and soft < 1200:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
