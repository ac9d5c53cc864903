#!/usr/bin/env python
"""Build verified stdin/stdout tests for code prompts from reference solutions (Kimi k1.5 §2.3).

    python tools/build_code_tests.py --input problems.jsonl --output code_prompts.jsonl \\
        --num-generated 50 --max-solutions 10 --test-agreement 0.7 --problem-pass-rate 0.9 \\
        --min-tests 40 --workers 8

Each line of --input is a code problem: a prompt record with ``solutions`` (Python programs
believed correct) and candidate inputs (``test_inputs``, an ``input_generator`` program that
reads a seed on stdin and prints one input, and/or ``tests`` whose outputs are then checked),
e.g. ``{"id": "p1", "prompt": "Read a and b, print a+b.", "solutions": ["..."],
"input_generator": "import random\\nrandom.seed(int(input()))\\nprint(random.randint(1, 9), 7)"}``.

Every program runs in the code reward's sandbox. An input becomes a test when at least
--test-agreement of the sampled solutions print the same output (the expected output); a
problem is kept when it has at least --min-tests tests and at least --problem-pass-rate of
its solutions pass all of them. Kept problems are written as code prompt records (DESIGN.md
section 5) with ``tests``, in input order, without ``solutions``/``test_inputs``/
``input_generator`` (--keep-solutions keeps the solutions). The output is written under a
temporary name and renamed when complete. A bad line stops the run before any program runs,
with exit code 1, "FILE:LINE: field 'NAME': ..." on stderr and no output file.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections import Counter
from typing import Optional

if importlib.util.find_spec("megatron_k15") is None:  # run from a checkout: tools/ sits next to it
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_k15.data.code_tests import (DROP_DISAGREE, DROP_FEW_TESTS, DROP_NO_INPUTS,  # noqa: E402
                                          BuildSettings, build_problem_tests, validate_code_problem)
from megatron_k15.data.prompts import DataError, read_prompt_records  # noqa: E402
from megatron_k15.files import atomic_file  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="build_code_tests.py",
        description="Tests for code prompts on which sampled reference solutions agree (Kimi k1.5 "
                    "test-case generation).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2] if __doc__ else None,
    )
    d = BuildSettings()
    p.add_argument("--input", required=True, metavar="FILE.jsonl", help="code problems with solutions")
    p.add_argument("--output", required=True, metavar="FILE.jsonl", help="code prompt JSONL to write")
    p.add_argument("--num-generated", type=int, default=d.num_generated, metavar="N",
                   help="inputs asked of each input_generator (seeds 0..N-1)")
    p.add_argument("--max-solutions", type=int, default=d.max_solutions, metavar="N",
                   help="solutions sampled per problem (all when it has fewer)")
    p.add_argument("--test-agreement", type=float, default=d.test_agreement, metavar="P",
                   help="fraction of the sampled solutions that must print the same output")
    p.add_argument("--problem-pass-rate", type=float, default=d.problem_pass_rate, metavar="P",
                   help="fraction of the sampled solutions that must pass every selected test")
    p.add_argument("--min-tests", type=int, default=d.min_tests, metavar="N", help="drop problems with fewer tests")
    p.add_argument("--max-tests", type=int, default=None, metavar="N", help="keep at most N tests per problem")
    p.add_argument("--timeout-s", type=float, default=d.timeout_s, metavar="S",
                   help="wall-clock limit per program run (a record's timeout_s wins)")
    p.add_argument("--memory-mb", type=int, default=d.memory_mb, metavar="MB", help="address-space limit per run")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the solution sampling")
    p.add_argument("--keep-solutions", action="store_true", help="keep the solutions in the output records")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="problems built in parallel (threads)")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for flag in ("test_agreement", "problem_pass_rate"):
        v = getattr(args, flag)
        if not 0.0 < v <= 1.0:
            parser.error(f"--{flag.replace('_', '-')} must be in (0, 1], got {v}")
    if args.test_agreement <= 0.5:
        parser.error(f"--test-agreement {args.test_agreement}: at most half the solutions could then "
                     "outvote the rest; use a value above 0.5")
    for flag in ("num_generated", "max_solutions", "min_tests", "workers"):
        v = getattr(args, flag)
        if v < (0 if flag == "num_generated" else 1):
            parser.error(f"--{flag.replace('_', '-')} must be >= {0 if flag == 'num_generated' else 1}, got {v}")
    if args.max_tests is not None and args.max_tests < args.min_tests:
        parser.error(f"--max-tests {args.max_tests} is below --min-tests {args.min_tests}")
    if args.timeout_s <= 0:
        parser.error(f"--timeout-s must be > 0, got {args.timeout_s}")
    if args.memory_mb < 64:
        parser.error(f"--memory-mb {args.memory_mb}: the Python interpreter alone needs more; use >= 64")


def settings_from(args: argparse.Namespace) -> BuildSettings:
    return BuildSettings(num_generated=args.num_generated, max_solutions=args.max_solutions,
                         test_agreement=args.test_agreement, problem_pass_rate=args.problem_pass_rate,
                         min_tests=args.min_tests, max_tests=args.max_tests, timeout_s=args.timeout_s,
                         memory_mb=args.memory_mb, seed=args.seed, keep_solutions=args.keep_solutions)


def _build(job):
    rec, settings = job
    return build_problem_tests(rec, settings)


def run(args: argparse.Namespace, progress: bool = True) -> Counter:
    """Write ``args.output``; returns the counts. DataError on bad input (no output then)."""
    if not os.path.isfile(args.input):
        raise DataError(args.input, None, None, "no such file (--input)")
    records = list(read_prompt_records(args.input, validate_record=validate_code_problem))
    settings = settings_from(args)
    jobs = [(r, settings) for r in records]
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(jobs), unit="problem", desc="build_code_tests", file=sys.stderr, dynamic_ncols=True)
    results = []
    if args.workers > 1 and len(jobs) > 1:
        # threads: each problem's work is waiting on its sandboxed programs, as in grading
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(args.workers, len(jobs))) as pool:
            for res in pool.map(_build, jobs):  # in input order
                results.append(res)
                bar is not None and bar.update()
    else:
        for job in jobs:
            results.append(_build(job))
            bar is not None and bar.update()
    if bar is not None:
        bar.close()
    counts: Counter = Counter({"kept": 0, DROP_NO_INPUTS: 0, DROP_FEW_TESTS: 0, DROP_DISAGREE: 0})
    kept = []
    for res in results:
        counts.update(res.counts)
        if res.record is None:
            counts[res.reason] += 1
        else:
            kept.append(res.record)
            counts["kept"] += 1
            counts["tests in kept problems"] += len(res.record["tests"])
    counts["problems"] = len(records)
    if not kept:
        raise DataError(args.input, None, None, f"every one of the {len(records)} problems was dropped "
                                                f"({_drops(counts)}); nothing written")
    with atomic_file(args.output) as f:
        for rec in kept:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return counts


def _drops(counts: Counter) -> str:
    return ", ".join(f"{counts[k]} {k}" for k in (DROP_NO_INPUTS, DROP_FEW_TESTS, DROP_DISAGREE))


def main(argv: Optional[list] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    try:
        counts = run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    per = counts["tests in kept problems"] / max(1, counts["kept"])
    print(f"wrote {args.output}: kept {counts['kept']} of {counts['problems']} problems (dropped: {_drops(counts)}); "
          f"{per:.1f} tests per kept problem from {counts['candidate inputs']} candidate inputs; "
          f"{counts['given tests contradicted']} given tests contradicted by the solutions; "
          f"{counts['repeated solutions']} repeated solutions counted once; "
          f"{counts['generator runs failed']} generator and {counts['solution runs failed']} solution runs failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
