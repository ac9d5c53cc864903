"""How fast the sandboxed code reward grades responses, per --reward-workers (no GPU needed).

    python bench/code_reward.py [--responses 32] [--tests 10] [--workers 1,2,4,8]

Each RL iteration grades every finished response; a code response runs once per test in the
sandbox (a fresh, isolated interpreter each time), so grading time grows with responses x
tests and, on a node's many cores, shrinks with ``--reward-workers`` (threads, each waiting on
its sandbox processes). The table prints responses/s and program runs/s per worker count, on
the same mix as RL sees: right answers (every test runs) and wrong ones (the reward stops at
the first failed test), half each, graded through the trainer's own path
(``rewards.reasoning.grade_responses``, what train_rl and evaluate call).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_k15.rewards.reasoning import grade_responses  # noqa: E402

RIGHT = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
WRONG = "```python\na, b = map(int, input().split())\nprint(a - b)\n```"


def jobs_for(responses: int, tests: int) -> tuple[list, int]:
    """Grading jobs (response, record, tags, prompt_open) and the program runs they make."""
    record = {"id": "sum", "task": "code", "prompt": "a+b",
              "tests": [{"input": f"{i} {i + 1}\n", "output": f"{2 * i + 1}\n"} for i in range(1, tests + 1)]}
    jobs = [(RIGHT if j % 2 == 0 else WRONG, record, None, False) for j in range(responses)]
    runs = sum(tests if j % 2 == 0 else 1 for j in range(responses))  # wrong: stops at test 1
    return jobs, runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--responses", type=int, default=32, help="responses graded per measurement")
    p.add_argument("--tests", type=int, default=10, help="tests per problem")
    p.add_argument("--workers", default="1,2,4,8", help="comma-separated --reward-workers values")
    args = p.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]
    if args.responses < 2 or args.tests < 1 or any(w < 1 for w in workers):
        p.error("--responses >= 2, --tests >= 1 and every --workers value >= 1")
    jobs, runs = jobs_for(args.responses, args.tests)
    print(f"{args.responses} responses (half right, half wrong) x {args.tests} tests = {runs} program runs; "
          f"{os.cpu_count()} CPUs")
    print(f"{'workers':>8} {'seconds':>9} {'responses/s':>12} {'runs/s':>8} {'mean reward':>12}")
    for w in workers:
        t0 = time.perf_counter()
        graded = grade_responses(jobs, w)
        dt = time.perf_counter() - t0
        mean = sum(r for _, r in graded) / len(graded)
        if abs(mean - 0.5) > 1e-9:  # half the responses are right: anything else is a broken sandbox
            print(f"error: mean reward {mean}, expected 0.5 (see megatron_k15.rewards.code.sandbox_report())",
                  file=sys.stderr)
            return 1
        print(f"{w:>8} {dt:>9.2f} {args.responses / dt:>12.1f} {runs / dt:>8.1f} {mean:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
